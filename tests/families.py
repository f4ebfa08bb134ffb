"""Every way transformers ties weights, as tiny random models built from the real config classes.

name → ``Family(build, head_targets, reload_class)``: ``head_targets`` are the LoRA targets that put an adapter
on the output embedding (plus one attention projection, so every adapter also has an untied LoRA part).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from conftest import HIDDEN, TINY, VOCAB
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForMaskedLM,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    MarianConfig,
    MarianMTModel,
    OPTConfig,
    OPTForCausalLM,
    PegasusConfig,
    PegasusForConditionalGeneration,
    RobertaConfig,
    RobertaForMaskedLM,
    T5Config,
    T5ForConditionalGeneration,
)


@dataclass(frozen=True)
class Family:
    """A tied architecture: ``build(dropout)`` returns a fresh model (seed 0) with that dropout probability."""

    build: Callable[[float], torch.nn.Module]
    head_targets: tuple[str, ...]
    kind: str  # "decoder-only", "encoder-decoder", "masked LM", "VLM"


_SEQ2SEQ = dict(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
_BERTLIKE = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=80)


def _decoder_only(name: str) -> Callable[[float], torch.nn.Module]:
    def build(dropout: float):
        model = TINY[name][0]()
        for key in ("attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
            if hasattr(model.config, key):
                setattr(model.config, key, dropout)
        return model
    return build


def _t5(dropout):
    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=2,
                                               num_heads=4, decoder_start_token_id=0, dropout_rate=dropout))


def _gemma3_vlm(dropout):
    cfg = Gemma3Config(
        text_config=dict(vocab_size=VOCAB + 4, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_dropout=dropout),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, boi_token_index=VOCAB + 1, eoi_token_index=VOCAB + 2, image_token_index=VOCAB + 3,
    )
    return Gemma3ForConditionalGeneration(cfg)


FAMILIES: dict[str, Family] = {
    **{name: Family(_decoder_only(name), ("lm_head", "q_proj" if name != "gpt2" else "c_attn"), "decoder-only")
       for name in ("llama_tied", "qwen2_tied", "gemma2", "gemma3_text", "gpt2")},
    "opt": Family(lambda d: OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, word_embed_proj_dim=HIDDEN,
                                                     num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                                                     max_position_embeddings=64, dropout=d, pad_token_id=1)),
                  ("lm_head", "q_proj"), "decoder-only"),
    "t5": Family(_t5, ("lm_head", "q"), "encoder-decoder"),
    "bart": Family(lambda d: BartForConditionalGeneration(BartConfig(**_SEQ2SEQ, dropout=d)),
                   ("lm_head", "q_proj"), "encoder-decoder"),
    "marian": Family(lambda d: MarianMTModel(MarianConfig(**_SEQ2SEQ, decoder_vocab_size=VOCAB, dropout=d,
                                                          share_encoder_decoder_embeddings=True)),
                     ("lm_head", "q_proj"), "encoder-decoder"),
    "pegasus": Family(lambda d: PegasusForConditionalGeneration(PegasusConfig(**_SEQ2SEQ, dropout=d)),
                      ("lm_head", "q_proj"), "encoder-decoder"),
    "bert": Family(lambda d: BertForMaskedLM(BertConfig(**_BERTLIKE, hidden_dropout_prob=d)),
                   ("decoder", "query"), "masked LM"),
    "roberta": Family(lambda d: RobertaForMaskedLM(RobertaConfig(**_BERTLIKE, hidden_dropout_prob=d, pad_token_id=1)),
                      ("decoder", "query"), "masked LM"),
    "gemma3_vlm": Family(_gemma3_vlm, ("lm_head",), "VLM"),
}


def build_family(name: str, dropout: float = 0.0, seed: int = 0) -> torch.nn.Module:
    """A fresh tiny model of family ``name`` (seed ``seed``) with every tie-group bias made non-zero, in eval mode
    when ``dropout == 0`` and in train mode (dropout active) otherwise."""
    torch.manual_seed(seed)
    model = FAMILIES[name].build(dropout)
    with torch.no_grad():  # zero-initialised tied biases (BERT's cls.predictions.bias) would hide a lost tie
        for pname, p in model.named_parameters():
            if pname.endswith("bias") and not p.any():
                p.normal_()
    return model.train() if dropout else model.eval()


