"""Shared fixtures: tiny random models from real transformers config classes, real SmolLM2 weights, offline W&B."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from packaging.version import Version  # noqa: E402
from transformers import (  # noqa: E402
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

VOCAB = 256
HIDDEN = 32

_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2)

# name → (factory, input-embedding name, output-embedding name)
TINY = {
    "gemma2": (lambda: Gemma2ForCausalLM(Gemma2Config(**_COMMON, head_dim=8)), "model.embed_tokens.weight",
               "lm_head.weight"),
    "gemma3_text": (lambda: Gemma3ForCausalLM(Gemma3TextConfig(**_COMMON, head_dim=8)), "model.embed_tokens.weight",
                    "lm_head.weight"),
    "llama_tied": (lambda: LlamaForCausalLM(LlamaConfig(**_COMMON, tie_word_embeddings=True)),
                   "model.embed_tokens.weight", "lm_head.weight"),
    "qwen2_tied": (lambda: Qwen2ForCausalLM(Qwen2Config(**_COMMON, tie_word_embeddings=True)),
                   "model.embed_tokens.weight", "lm_head.weight"),
    "gpt2": (lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64,
                                                bos_token_id=0, eos_token_id=0)),
             "transformer.wte.weight", "lm_head.weight"),
}


def tiny_model(name: str, seed: int = 0):
    """A tiny random model of architecture ``name`` (see ``TINY``), deterministic for ``seed``."""
    torch.manual_seed(seed)
    return TINY[name][0]().eval()


def untied_llama(seed: int = 0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**_COMMON, tie_word_embeddings=False)).eval()


def train_adapter_a_little(peft_model, steps: int = 5, lr: float = 5e-2, seed: int = 0, vocab: int = VOCAB):
    """Real optimizer steps on random token batches so every trainable tensor moves away from its init."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    peft_model.train()
    for _ in range(steps):
        ids = torch.randint(0, vocab, (4, 16), generator=gen)
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.eval()
    return peft_model


# PEFT < 0.19 (measured with 0.18.1) applies ensure_weight_tying to modules_to_save only (0.19+ also to LoRA targets
# and trainable tokens), keeps a modules_to_save pair as two trained copies, and fails building
# modules_to_save=["lm_head"] with it (PEFT_0_18_ENSURE_TYING_ERROR).
PEFT_TIES_MODULES_TO_SAVE_ONLY = Version(peft.__version__) < Version("0.19")
PEFT_0_18_ENSURE_TYING_ERROR = "'Embedding' object has no attribute 'modules_to_save'"


@pytest.fixture(scope="session")
def smollm2_dir():
    """Local safetensors checkpoint of real SmolLM2-135M-Instruct, converted once from the packaged GGUF."""
    from tie_guard.packaged import packaged_checkpoint

    return packaged_checkpoint("smollm2-135m-instruct")


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
    d = tmp_path / "wandb_root"
    d.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(d))
    monkeypatch.setenv("WANDB_MODE", "offline")
    yield d
    import wandb

    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()  # drop wandb's process-wide settings (WANDB_DIR is per test)
