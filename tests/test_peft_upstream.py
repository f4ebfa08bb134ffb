"""PEFT's own weight-tying tests, ported onto tie_guard's merge.

Each case rebuilds the setup of one upstream huggingface/peft test (named in the case id: ``FILE::CLASS::TEST[...]``)
on a tiny random model from a real transformers config class, makes it non-trivial (real optimizer steps, or
``init_lora_weights=False``), merges it with :func:`tie_guard.safe_merge_and_unload` and compares the result with
expectations computed here, independently of tie_guard:

* logits of the merged model vs the adapter model on a probe batch (fp32, max |Δ| ≤ 1e-4), policy ``"untie"``;
* every tied member's merged weight vs a value built by hand from the adapter's own tensors: the pre-PEFT weight
  (``torch.equal``), a ``modules_to_save`` copy (``torch.equal``), trainable-token rows (``torch.equal``) or
  ``W + Σ scaling · B @ A`` in float64 (atol 1e-6);
* members with equal values share one Parameter after the merge (what upstream asserts after ``merge_and_unload``),
  members with different values do not;
* save → reload, both through tie_guard's ``output_dir`` and through the user's own ``merged.save_pretrained(d)`` +
  ``AutoModel*.from_pretrained(d)``: the same weights bit for bit and the same logits;
* the train/eval mode of every module of the merged model equals what PEFT's own ``merge_and_unload()`` returns,
  and nothing of the adapter model (weights, logits, modes, active adapters) changes.

Upstream setups that the installed PEFT (0.21.2) does not support are not ported.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from conftest import VOCAB, tiny_model, train_adapter_a_little, untied_llama
from peft import LoKrConfig, LoraConfig, TrainableTokensConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForMaskedLM,
    OPTConfig,
    OPTForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from tie_guard import TiedMergeError, UnsupportedAdapterError, find_tied_groups, safe_merge_and_unload
from tie_guard.probe import make_probe_ids, probe_logits

FP32_TOL = 1e-4  # max |Δlogit| merged vs adapter model (fp32)
LORA_ATOL = 1e-6  # merged weight vs the float64 hand merge W + s·B@A


# ----------------------------------------------------------------------------------------------------------------
# Tiny models (real config classes; hidden 32, vocab 256, 2 layers)
# ----------------------------------------------------------------------------------------------------------------


def _seeded(build: Callable) -> Callable:
    def make():
        torch.manual_seed(0)
        return build().eval()

    return make


def _llama_declared_untied_but_shared():
    """tie_word_embeddings=False, yet lm_head.weight is embed_tokens.weight (upstream's
    ``get_lm_model(tie_weights=True, config_tie_word_embeddings=False)``)."""
    m = untied_llama()
    m.lm_head.weight = m.model.embed_tokens.weight
    return m


def _opt_flag_off_but_shared():
    """OPT built tied, then ``config.tie_word_embeddings = False`` (upstream's
    ``test_get_modules_tied_returns_empty_when_tying_disabled``)."""
    m = MODELS["opt"][0]()
    m.config.tie_word_embeddings = False
    return m


# name → (factory, Auto class used to reload, tie-group member names)
MODELS: dict[str, tuple[Callable, type, list[str]]] = {
    "llama": (lambda: tiny_model("llama_tied"), AutoModelForCausalLM, ["model.embed_tokens.weight", "lm_head.weight"]),
    "llama_untied": (untied_llama, AutoModelForCausalLM, ["model.embed_tokens.weight", "lm_head.weight"]),
    "llama_shared_flag_off": (_llama_declared_untied_but_shared, AutoModelForCausalLM,
                              ["model.embed_tokens.weight", "lm_head.weight"]),
    "gemma3": (lambda: tiny_model("gemma3_text"), AutoModelForCausalLM, ["model.embed_tokens.weight", "lm_head.weight"]),
    "gpt2": (lambda: tiny_model("gpt2"), AutoModelForCausalLM, ["transformer.wte.weight", "lm_head.weight"]),
    "opt": (_seeded(lambda: OPTForCausalLM(OPTConfig(
        vocab_size=VOCAB, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, dropout=0.1))),
        AutoModelForCausalLM, ["model.decoder.embed_tokens.weight", "lm_head.weight"]),
    "opt_flag_off": (_opt_flag_off_but_shared, AutoModelForCausalLM,
                     ["model.decoder.embed_tokens.weight", "lm_head.weight"]),
    "bart": (_seeded(lambda: BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64))),
        AutoModelForSeq2SeqLM,
        ["model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
         "lm_head.weight"]),
    "t5": (_seeded(lambda: T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0))),
        AutoModelForSeq2SeqLM, ["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                                "lm_head.weight"]),
    "bert": (_seeded(lambda: BertForMaskedLM(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64))),
        AutoModelForMaskedLM, ["bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"]),
}

# short names for the expectations below
LE, LH = MODELS["llama"][2]
OE, OH = MODELS["opt"][2]
BART_ALL = MODELS["bart"][2]
T5_ALL = MODELS["t5"][2]
BERT_BIASES = ["cls.predictions.decoder.bias", "cls.predictions.bias"]


def lora(**kw) -> LoraConfig:
    """LoRA as the upstream tests configure it, plus dropout (active in training) and r=4."""
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, **kw})


# ----------------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One ported setup.

    ``expect`` maps a parameter name of the merged model to how its value is computed by hand:
    ``"base"`` (the pre-PEFT weight), ``("copy", module)`` (the module's ``modules_to_save`` copy),
    ``("tokens", module)`` (pre-PEFT weight with the module's trainable-token rows), ``("lora", module)``
    (``W + Σ s·B@A`` over the merged adapters present on the module) or ``("cat", module, [(adapter, w), ...])``
    (``W + Σ w·s·B@A`` over the source adapters of an ``add_weighted_adapter(..., "cat")``).
    ``keep_tied``: ``None`` (no keep_tied run), ``"refuse"`` (the two sides differ: TiedMergeError), or the member
    whose merged value the one shared matrix must hold.
    """

    id: str
    model: str
    config: object
    expect: dict
    extra: list = field(default_factory=list)  # (adapter name, config) added with add_adapter
    train: list | None = None  # adapter-name groups trained in turn (default: each adapter alone)
    active: list | None = None  # active adapters at merge time (default: the first)
    adapter_names: list | None = None  # passed to safe_merge_and_unload
    after: Callable | None = None  # e.g. add_weighted_adapter / delete_adapter, after training
    keep_tied: str | None = None
    plain_merge_changes_input: bool | None = None  # report.plain_merge_changes_input_embeddings
    steps: int = 1  # optimizer steps per adapter (lr 5e-2: every trained tensor moves)


T_INIT = "tests/test_initialization.py::TestWeightTying::"
T_TT = "tests/test_trainable_tokens.py::TestTrainableTokens::"
T_CUSTOM = "tests/test_custom_models.py::TestPeftCustomModel::"
T_REG = "tests/regression/test_state_dict.py::"

CASES: list[Case] = []

# --- TestWeightTying: modules_to_save, ensure_weight_tying=True: one shared copy for both sides
for mts in (["lm_head"], ["embed_tokens"], ["lm_head", "embed_tokens"]):
    CASES.append(Case(f"{T_INIT}test_weight_tying_tied_model_lora[{'-'.join(mts)}]", "llama",
                      lora(target_modules=["q_proj"], modules_to_save=mts, ensure_weight_tying=True),
                      {LE: ("copy", "model.embed_tokens"), LH: ("copy", "lm_head")}))
# --- ... ensure_weight_tying=False on a tied model: only the named side gets a copy
CASES += [
    Case(f"{T_INIT}test_alt_weight_tying_tied_model_lora[lm_head-True]", "llama",
         lora(target_modules=["q_proj"], modules_to_save=["lm_head"]),
         {LE: "base", LH: ("copy", "lm_head")}, keep_tied=LH),
    Case(f"{T_INIT}test_alt_weight_tying_tied_model_lora[embed_tokens-True]", "llama",
         lora(target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
         {LE: ("copy", "model.embed_tokens"), LH: "base"}, keep_tied=LE),
    Case(f"{T_INIT}test_alt_weight_tying_tied_model_lora[embed_tokens-lm_head-True]", "llama",
         lora(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]),
         {LE: ("copy", "model.embed_tokens"), LH: ("copy", "lm_head")}, keep_tied="refuse"),
    Case(f"{T_INIT}test_alt_weight_tying_tied_model_lora[lm_head-False]", "llama_untied",
         lora(target_modules=["q_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True),
         {LE: "base", LH: ("copy", "lm_head")}),
    Case(f"{T_INIT}test_weight_tying_tied_model_no_embed_lora", "llama",
         lora(target_modules=["q_proj"], ensure_weight_tying=True), {LE: "base", LH: "base"}),
    Case(f"{T_INIT}test_weight_tying_tied_model_lokr", "llama",
         LoKrConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
         {LE: ("copy", "model.embed_tokens"), LH: "base"}, keep_tied=LE),
]
# --- LoRA on the tied modules, ensure_weight_tying=True: one shared (transposed) LoRA
for tm in (["lm_head"], ["embed_tokens"], ["lm_head", "embed_tokens"]):
    CASES.append(Case(f"{T_INIT}test_weight_tying_tied_model_target_modules_lora[{'-'.join(tm)}]", "llama",
                      lora(target_modules=["q_proj", *tm], ensure_weight_tying=True, init_lora_weights=False),
                      {LE: ("lora", "model.embed_tokens"), LH: ("lora", "lm_head")}, steps=0))
CASES += [
    Case(f"{T_INIT}test_weight_tying_tied_model_target_modules_str_lora[.*(embed_tokens|lm_head)$]", "llama",
         lora(target_modules=r".*(embed_tokens|lm_head)$", ensure_weight_tying=True, init_lora_weights=False),
         {LE: ("lora", "model.embed_tokens"), LH: ("lora", "lm_head")}, steps=0),
    Case(f"{T_INIT}test_weight_tying_tied_model_target_modules_all_linear_lora[all-linear]", "llama",
         lora(target_modules="all-linear", ensure_weight_tying=True), {LE: "base", LH: "base"}),
    # ensure_weight_tying=False on a tied model: each side its own LoRA
    Case(f"{T_INIT}test_alt_weight_tying_tied_model_target_modules_lora[lm_head-True]", "llama",
         lora(target_modules=["q_proj", "lm_head"]), {LE: "base", LH: ("lora", "lm_head")}, keep_tied=LH,
         plain_merge_changes_input=True),
    Case(f"{T_INIT}test_alt_weight_tying_tied_model_target_modules_lora[embed_tokens-True]", "llama",
         lora(target_modules=["q_proj", "embed_tokens"]), {LE: ("lora", "model.embed_tokens"), LH: "base"},
         keep_tied=LE),
    Case(f"{T_INIT}test_alt_weight_tying_tied_model_target_modules_lora[embed_tokens-lm_head-True]", "llama",
         lora(target_modules=["q_proj", "embed_tokens", "lm_head"]),
         {LE: ("lora", "model.embed_tokens"), LH: ("lora", "lm_head")}, keep_tied="refuse"),
]
# --- encoder-decoder with a shared embedding (upstream's get_seq2seq_lm_model is BART's layout)
# (test_weight_tying_enc_dec_modules_to_save_lora is not ported: on PEFT 0.21.2 its BART adapter model cannot run
# forward, the encoder's embed_tokens copy being the lm_head Linear: "mat1 and mat2 shapes cannot be multiplied")
for tm in (["lm_head"], ["embed_tokens"], ["lm_head", "embed_tokens"]):
    CASES.append(Case(f"{T_INIT}test_weight_tying_enc_dec_target_modules_lora[{'-'.join(tm)}]", "bart",
                      lora(target_modules=["q_proj", *tm], ensure_weight_tying=True, init_lora_weights=False),
                      {n: ("lora", n.rpartition(".")[0]) for n in BART_ALL}, steps=0))
CASES.append(Case(f"{T_INIT}test_weight_tying_enc_dec_no_tied_module_targeted_warns[linear]", "bart",
                  lora(target_modules=["q_proj", "fc1"], ensure_weight_tying=True), {n: "base" for n in BART_ALL}))
# --- physically shared, but the config says tie_word_embeddings=False (regression test for PEFT issue #2944)
CASES += [
    Case(f"{T_INIT}test_ensure_weight_tying_not_tying_when_model_config_tie_false[lm_head]",
         "llama_shared_flag_off", lora(target_modules=["q_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True),
         {LE: "base", LH: ("copy", "lm_head")}),
    Case(f"{T_INIT}test_ensure_weight_tying_not_tying_when_model_config_tie_false[embed_tokens]",
         "llama_shared_flag_off",
         lora(target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True),
         {LE: ("copy", "model.embed_tokens"), LH: "base"}),
    Case(f"{T_INIT}test_ensure_weight_tying_not_tying_when_model_config_tie_false_target_modules[lm_head]",
         "llama_shared_flag_off", lora(target_modules=["q_proj", "lm_head"], ensure_weight_tying=True),
         {LE: "base", LH: ("lora", "lm_head")}),
    Case(f"{T_INIT}test_ensure_weight_tying_not_tying_when_model_config_tie_false_target_modules"
         "[lm_head-embed_tokens]", "llama_shared_flag_off",
         lora(target_modules=["q_proj", "lm_head", "embed_tokens"], ensure_weight_tying=True),
         {LE: ("lora", "model.embed_tokens"), LH: ("lora", "lm_head")}),
]

# --- test_trainable_tokens.py (upstream uses opt-125m, whose lm_head is tied to model.decoder.embed_tokens).
# Not ported: test_targeting_both_embedding_and_tied_layer_explicitly and test_multiple_trainable_token_adapters_same_
# model (TrainableTokensConfig targeting lm_head): PEFT 0.21.2 raises "TrainableTokensLayer wraps an unknown layer
# type" in get_peft_model.
TT_BOTH = {OE: ("tokens", "model.decoder.embed_tokens"), OH: ("tokens", "model.decoder.embed_tokens")}
CASES += [
    Case(f"{T_TT}test_weight_tying_applied_when_model_is_tied[mapping]", "opt",
         lora(target_modules="all-linear", trainable_token_indices={"embed_tokens": [0, 1, 3]}), TT_BOTH),
    Case(f"{T_TT}test_weight_tying_applied_when_model_is_tied_standalone[mapping]", "opt",
         TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[0, 1, 3]), TT_BOTH),
    Case(f"{T_TT}test_weight_tying_applied_when_model_is_tied_encoder_decoder", "t5",
         lora(target_modules="all-linear", trainable_token_indices={"shared": [0, 1, 3]}),
         {n: ("tokens", "shared") for n in T5_ALL}),
    Case(f"{T_TT}test_weight_tying_bc_different_indices_treated_separately", "opt",
         lora(target_modules="all-linear", trainable_token_indices={"lm_head": [1, 2], "embed_tokens": [3, 4]}),
         {OE: ("tokens", "model.decoder.embed_tokens"), OH: ("tokens", "lm_head")}, keep_tied="refuse"),
    Case(f"{T_TT}test_ensure_weight_tying_applied_with_same_indices[trainable_token_indices0-True]", "opt",
         lora(target_modules="all-linear", trainable_token_indices=[1, 2], ensure_weight_tying=True), TT_BOTH),
    Case(f"{T_TT}test_ensure_weight_tying_applied_with_same_indices[trainable_token_indices3-False]", "opt",
         lora(target_modules="all-linear", trainable_token_indices={"lm_head": [1, 2], "embed_tokens": [1, 2]}),
         TT_BOTH),
    Case(f"{T_TT}test_scaled_embedding_with_lora", "gemma3",
         lora(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [0, 1, 3]}),
         {LE: ("tokens", "model.embed_tokens"), LH: ("tokens", "model.embed_tokens")}),
    Case(f"{T_TT}test_embed_scale_is_applied", "gemma3",
         TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[0, 1, 3]),
         {LE: ("tokens", "model.embed_tokens"), LH: ("tokens", "model.embed_tokens")}),
]

# --- test_decoder_models.py / test_tuners_utils.py
T_WARN = "tests/test_tuners_utils.py::TestBaseTunerWarnForTiedEmbeddings::"
CASES += [
    Case("tests/test_decoder_models.py::TestDecoderModels::test_merge_and_unload_fixes_tie_word_embeddings_config",
         "llama", lora(target_modules=["embed_tokens"], init_lora_weights=False),
         {LE: ("lora", "model.embed_tokens"), LH: "base"}, keep_tied=LE, steps=0),
    Case(f"{T_WARN}test_warn_for_tied_embeddings_merge", "llama", lora(target_modules=["lm_head"]),
         {LE: "base", LH: ("lora", "lm_head")}, keep_tied=LH, plain_merge_changes_input=True),
    Case(f"{T_WARN}test_no_warn_for_untied_embeddings_merge", "llama_untied", lora(target_modules=["lm_head"]),
         {LE: "base", LH: ("lora", "lm_head")}, plain_merge_changes_input=False),
    Case(f"{T_WARN}test_no_warn_for_no_target_module_merge", "llama", lora(target_modules=["q_proj"]),
         {LE: "base", LH: "base"}, plain_merge_changes_input=False),
]

# --- test_other.py::TestGetModuleNamesTiedWithEmbedding (LoraConfig() defaults: the attention projections)
T_OTHER = "tests/test_other.py::TestGetModuleNamesTiedWithEmbedding::"
CASES += [
    Case(f"{T_OTHER}test_get_modules_tied_to_embedding_peft[peft-internal-testing/opt-125m-mapping]", "opt",
         LoraConfig(init_lora_weights=False), {OE: "base", OH: "base"}, steps=0),
    Case(f"{T_OTHER}test_get_modules_tied_to_embedding_peft[peft-internal-testing/tiny-random-BertModel-mapping]",
         "bert", LoraConfig(init_lora_weights=False),
         {n: "base" for n in MODELS["bert"][2] + BERT_BIASES}, steps=0),
    Case(f"{T_OTHER}test_get_modules_tied_to_embedding_peft[peft-internal-testing/tiny-random-t5-mapping]", "t5",
         LoraConfig(init_lora_weights=False), {n: "base" for n in T5_ALL}, steps=0),
    Case(f"{T_OTHER}test_get_modules_tied_returns_empty_when_tying_disabled[peft-internal-testing/opt-125m]",
         "opt_flag_off", lora(target_modules=["q_proj", "lm_head"]), {OE: "base", OH: ("lora", "lm_head")}),
]


# --- test_custom_models.py: several adapters on a tied model
def _weighted(adapters, weights, name, kind="cat"):
    def run(pm):
        pm.add_weighted_adapter(adapters, weights, adapter_name=name, combination_type=kind)
        pm.set_adapter(name)

    return run


def _delete(name):
    return lambda pm: pm.delete_adapter(name)


CASES += [
    Case(f"{T_CUSTOM}test_delete_adapter_multiple_adapters_with_trainable_token_indices[merge adapter2]", "opt",
         lora(target_modules=["q_proj"], trainable_token_indices=[0, 1]),
         {OE: ("tokens", "model.decoder.embed_tokens"), OH: ("tokens", "model.decoder.embed_tokens")},
         extra=[("adapter1", lora(target_modules=["q_proj"])),
                ("adapter2", lora(target_modules=["q_proj"], trainable_token_indices=[1, 3]))],
         after=_delete("default"), adapter_names=["adapter2"]),
    Case(f"{T_CUSTOM}test_delete_adapter_multiple_adapters_with_trainable_token_indices[merge adapter1]", "opt",
         lora(target_modules=["q_proj"], trainable_token_indices=[0, 1]), {OE: "base", OH: "base"},
         extra=[("adapter1", lora(target_modules=["q_proj"])),
                ("adapter2", lora(target_modules=["q_proj"], trainable_token_indices=[1, 3]))],
         active=["adapter2"], adapter_names=["adapter1"]),
    Case(f"{T_CUSTOM}test_multiple_adapters_no_needless_copy_modules_to_save[default]", "opt",
         lora(modules_to_save=["embed_tokens"]), {OE: ("copy", "model.decoder.embed_tokens"), OH: "base"},
         extra=[("other", lora(modules_to_save=["lm_head"]))], keep_tied=OE),
    Case(f"{T_CUSTOM}test_multiple_adapters_no_needless_copy_modules_to_save[other]", "opt",
         lora(modules_to_save=["embed_tokens"]), {OE: "base", OH: ("copy", "lm_head")},
         extra=[("other", lora(modules_to_save=["lm_head"]))], adapter_names=["other"], keep_tied=OH),
    Case(f"{T_CUSTOM}test_multiple_adapters_mixed_modules_to_save_merging_adapters", "llama",
         lora(target_modules=["q_proj"], modules_to_save=["lm_head"]), {LE: "base", LH: ("copy", "lm_head")},
         extra=[("other", lora(target_modules=["q_proj"]))], after=_weighted(["default", "other"], [1.0, 1.0],
                                                                             "merged", "linear"),
         keep_tied=LH),
    Case(f"{T_CUSTOM}test_add_weighted_adapter_cat_with_rank_pattern[lm_head]", "llama",
         lora(target_modules=["q_proj", "lm_head"], rank_pattern={"lm_head": 2}),
         {LE: "base", LH: ("cat", "lm_head", [("default", 0.7), ("other", 0.3)])},
         extra=[("other", lora(target_modules=["q_proj", "lm_head"], rank_pattern={"lm_head": 6}))],
         after=_weighted(["default", "other"], [0.7, 0.3], "merged"), keep_tied=LH),
    Case(f"{T_CUSTOM}test_add_weighted_adapter_negative_weight_negates_adapter[lm_head]", "llama",
         lora(target_modules=["lm_head"], init_lora_weights=False),
         {LE: "base", LH: ("cat", "lm_head", [("default", -1.0)])},
         after=_weighted(["default"], [-1.0], "negative"), steps=0, keep_tied=LH),
    # test_active_adapter: merge an inactive adapter, or both at once, on a tied head
    Case(f"{T_CUSTOM}test_active_adapter[lm_head, merge the inactive one]", "llama",
         lora(target_modules=["q_proj", "lm_head"]), {LE: "base", LH: ("lora", "lm_head")},
         extra=[("b", lora(target_modules=["q_proj", "lm_head"]))], adapter_names=["b"], keep_tied=LH),
    Case(f"{T_CUSTOM}test_active_adapter[lm_head, merge both]", "llama",
         lora(target_modules=["q_proj", "lm_head"]), {LE: "base", LH: ("lora", "lm_head")},
         extra=[("b", lora(target_modules=["q_proj", "lm_head"]))], adapter_names=["default", "b"], keep_tied=LH),
]

# --- tests/regression/test_state_dict.py, OPT (tied) cases
CASES += [
    Case(f"{T_REG}lora_modules_to_save_tied", "opt", lora(task_type="CAUSAL_LM", r=8, modules_to_save=["lm_head"]),
         {OE: "base", OH: ("copy", "lm_head")}, keep_tied=OH),
    Case(f"{T_REG}lora_target_embedding", "opt", lora(task_type="CAUSAL_LM", r=8, target_modules=["embed_tokens"]),
         {OE: ("lora", "model.decoder.embed_tokens"), OH: "base"}, keep_tied=OE),
    Case(f"{T_REG}lora_trainable_tokens", "opt", lora(task_type="CAUSAL_LM", r=8, trainable_token_indices=[0, 1, 3]),
         TT_BOTH),
    Case(f"{T_REG}trainable_tokens", "opt", TrainableTokensConfig(task_type="CAUSAL_LM", token_indices=[0, 1, 3]),
         TT_BOTH),
    Case(f"{T_REG}lora_multi_adapter", "opt", lora(task_type="CAUSAL_LM", r=8), {OE: "base", OH: "base"},
         extra=[("default2", lora(task_type="CAUSAL_LM", r=8))], train=[["default", "default2"]]),
]


# ----------------------------------------------------------------------------------------------------------------
# Building a case and computing its expectations by hand
# ----------------------------------------------------------------------------------------------------------------


def _set_active(pm, names: list[str]) -> None:
    pm.base_model.set_adapter(names if len(names) > 1 else names[0])


def build(case: Case, steps: int | None = None):
    """(peft model, pre-PEFT parameters by every name incl. tied duplicates, merged adapter names)."""
    base = MODELS[case.model][0]()
    snapshot = {n: p.detach().clone() for n, p in base.named_parameters(remove_duplicate=False)}
    pm = get_peft_model(base, case.config)
    for name, cfg in case.extra:
        pm.add_adapter(name, cfg)
    steps = case.steps if steps is None else steps
    if steps:
        groups = case.train or [[n] for n in pm.peft_config]
        for i, group in enumerate(groups):
            _set_active(pm, group)
            train_adapter_a_little(pm, steps=steps, seed=i)
    first = next(iter(pm.peft_config))
    _set_active(pm, case.active or [first])
    if case.after is not None:
        case.after(pm)
    pm.eval()
    names = case.adapter_names or list(pm.active_adapters)
    return pm, snapshot, names


def _layer(pm, path: str):
    return pm.get_base_model().get_submodule(path)


def _lora_delta(layer, adapter: str) -> torch.Tensor:
    """scaling · B @ A in float64, shaped like the base weight (embeddings: (B @ A)ᵀ)."""
    s = layer.scaling[adapter]
    if adapter in layer.lora_A:
        return s * (layer.lora_B[adapter].weight.double() @ layer.lora_A[adapter].weight.double())
    return s * (layer.lora_embedding_B[adapter].double() @ layer.lora_embedding_A[adapter].double()).T


def _token_adapter(layer):
    return getattr(layer, "token_adapter", layer)  # TrainableTokensWrapper or a standalone TrainableTokensLayer


def expected_value(spec, name: str, pm, snapshot: dict, names: list[str]) -> tuple[torch.Tensor, bool]:
    """(expected merged value, whether it must match bit for bit)."""
    w0 = snapshot[name]
    if spec == "base":
        return w0, True
    kind, path = spec[0], spec[1]
    layer = _layer(pm, path)
    if kind == "copy":
        (adapter,) = [n for n in names if n in layer.modules_to_save]
        return layer.modules_to_save[adapter].weight.detach(), True
    if kind == "tokens":
        ta = _token_adapter(layer)
        want = w0.clone()
        for adapter in names:
            if adapter in ta.trainable_tokens_delta:
                want[ta.token_indices[adapter]] = ta.trainable_tokens_delta[adapter].detach()
        return want, True
    if kind == "lora":
        deltas = [_lora_delta(layer, a) for a in names if a in layer.scaling]
        assert deltas, f"case expects LoRA on {path} for {names}"
        return (w0.double() + sum(deltas)).float(), False
    if kind == "cat":  # add_weighted_adapter(..., combination_type="cat"): Σ wᵢ · sᵢ · Bᵢ @ Aᵢ of the sources
        return (w0.double() + sum(w * _lora_delta(layer, a) for a, w in spec[2])).float(), False
    raise ValueError(spec)


def _matches(got: torch.Tensor, want: torch.Tensor, exact: bool) -> bool:
    if got.shape != want.shape:
        return False
    if exact:
        return torch.equal(got, want)
    return bool(((got.double() - want.double()).abs().max() <= LORA_ATOL).item())


def modes(model) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


def trainable(model) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _peft_reference(pm, names: list[str], rebuild: Callable | None = None):
    """Logits of the adapter model with ``names`` active, and the module modes of PEFT's own merge_and_unload,
    both on a copy (the user's model is left alone). ``rebuild()`` makes an identical copy (same seeds) where
    ``deepcopy`` fails: ensure_weight_tying's transposed LoRA tensors are not graph leaves."""
    try:
        ref = copy.deepcopy(pm)
    except RuntimeError:
        if rebuild is None:
            raise
        ref = rebuild()
    if list(ref.active_adapters) != names:
        _set_active(ref, names)
    probe = make_probe_ids(VOCAB)
    logits = probe_logits(ref, probe)
    try:
        merged = ref.merge_and_unload(adapter_names=names)
    except KeyError:
        # PEFT 0.21.2's TrainableTokensLayer.merge raises KeyError for a merged adapter without tokens on that
        # layer; unload() leaves every module in the same mode merge_and_unload() would.
        merged = ref.unload()
    return probe, logits, modes(merged)


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _check_weights(model, expected: dict, where: str) -> None:
    bad = [n for n, (want, exact) in expected.items() if not _matches(model.get_parameter(n), want, exact)]
    assert not bad, f"{where}: {bad} differ from the values computed by hand"


def _check_tie_structure(model, expected: dict, members: list[str], where: str, equal_must_share: bool,
                         copies: frozenset = frozenset()) -> None:
    """Members with different expected values never share storage; with ``equal_must_share`` members with equal
    values are one Parameter (upstream: 'merging and unloading restores the weight-tying') unless tie_guard made one
    of them an equal copy because the saved config cannot re-tie it (``copies``: ``MergeReport.saved_copies``)."""
    members = [n for n in members if n in expected]
    for i, a in enumerate(members):
        for b in members[i + 1:]:
            pa, pb = model.get_parameter(a), model.get_parameter(b)
            same_value = torch.equal(expected[a][0], expected[b][0])
            if not same_value:
                assert not _shares(pa, pb), f"{where}: {a} and {b} hold different values but share storage"
            elif equal_must_share and not {a, b} & copies:
                assert pa is pb, f"{where}: {a} and {b} hold equal values but are no longer tied"


def _reload_and_check(auto_cls, d, merged, merged_logits, probe, expected_from_merged: dict, where: str):
    reloaded = auto_cls.from_pretrained(d, dtype=torch.float32)
    assert reloaded.training is False  # from_pretrained returns eval mode
    diff = (probe_logits(reloaded, probe) - merged_logits).abs().max().item()
    assert diff <= FP32_TOL, f"{where}: logits after reload differ from the merged model's by {diff:.3g}"
    _check_weights(reloaded, expected_from_merged, where)
    return reloaded


# ----------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one intra-op thread is faster than two on a shared machine (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _params(cases):
    out = []
    for c in cases:
        out.append(pytest.param(c, "untie", id=f"{c.id}-untie"))
        if c.keep_tied is not None:
            out.append(pytest.param(c, "keep_tied", id=f"{c.id}-keep_tied"))
    return out


@pytest.mark.parametrize("case, policy", _params(CASES))
def test_upstream_setup_merges_exactly(case: Case, policy: str, tmp_path):
    pm, snapshot, names = build(case)
    probe, adapter_logits, peft_modes = _peft_reference(pm, names, lambda: build(case)[0])
    expected = {n: expected_value(spec, n, pm, snapshot, names) for n, spec in case.expect.items()}
    members = MODELS[case.model][2]
    auto_cls = MODELS[case.model][1]
    before_modes, before_active, before_trainable = modes(pm), list(pm.active_adapters), trainable(pm)
    before_logits = probe_logits(pm, probe)

    if policy == "keep_tied" and case.keep_tied == "refuse":
        with pytest.raises(TiedMergeError, match="untie"):
            safe_merge_and_unload(pm, policy, adapter_names=case.adapter_names, probe_input_ids=probe)
        assert torch.equal(probe_logits(pm, probe), before_logits)
        return

    merged, report = safe_merge_and_unload(pm, policy, adapter_names=case.adapter_names,
                                           output_dir=tmp_path / "tg", probe_input_ids=probe)
    assert report.verified

    # the adapter model is untouched: logits, modes, active adapters
    assert torch.equal(probe_logits(pm, probe), before_logits)
    assert modes(pm) == before_modes
    assert list(pm.active_adapters) == before_active
    assert trainable(pm) == before_trainable
    # the merged model comes back in the modes PEFT's own merge_and_unload returns
    assert modes(merged) == peft_modes
    if case.plain_merge_changes_input is not None:
        assert report.plain_merge_changes_input_embeddings is case.plain_merge_changes_input

    merged_logits = probe_logits(merged, probe)
    if policy == "untie":
        diff = (merged_logits - adapter_logits).abs().max().item()
        assert diff <= FP32_TOL, f"merged logits differ from the adapter model's by {diff:.3g}"
        _check_weights(merged, expected, "merged")
        copies = frozenset(n for c in report.saved_copies for n in c["names"])
        _check_tie_structure(merged, expected, members, "merged", equal_must_share=True, copies=copies)
    else:
        # one shared matrix holding the adapted side's merged value; every other expectation unchanged
        want = expected[case.keep_tied]
        tied = [n for n in members if n in expected]
        shared = merged.get_parameter(tied[0])
        assert all(merged.get_parameter(n) is shared for n in tied), "keep_tied: the group is no longer one matrix"
        _check_weights(merged, {**expected, **{n: want for n in tied}}, "merged (keep_tied)")

    # save → reload: by tie_guard (output_dir) and by the user (save_pretrained + from_pretrained)
    on_merged = {n: (merged.get_parameter(n).detach(), True) for n in expected}
    user_dir = tmp_path / "user"
    merged.save_pretrained(user_dir)
    for d, where in ((tmp_path / "tg", "tie_guard output_dir"), (user_dir, "user save_pretrained")):
        reloaded = _reload_and_check(auto_cls, d, merged, merged_logits, probe, on_merged, where)
        _check_tie_structure(reloaded, on_merged, members, where, equal_must_share=False)
        shared = sorted(sorted(g.names) for g in find_tied_groups(reloaded) if g.physical)
        assert shared == sorted(report.shared_after_reload), f"{where}: reload shares {shared}"


def test_bert_tied_decoder_bias_survives_merge_and_reload(tmp_path):
    """Port of test_other.py::TestGetModuleNamesTiedWithEmbedding[tiny-random-BertModel]: transformers declares
    ``cls.predictions.decoder.bias`` tied to ``cls.predictions.bias``; after a merge that does not touch the head,
    both reloads must bring back the trained-model bias, not zeros."""
    case = next(c for c in CASES if c.model == "bert")
    pm, snapshot, names = build(case)
    with torch.no_grad():  # a non-zero bias, as after MLM pretraining (BERT initialises it to zeros)
        bias = pm.get_base_model().cls.predictions.bias
        bias.copy_(torch.linspace(-1, 1, bias.numel()))
    probe, adapter_logits, _ = _peft_reference(pm, names)
    merged, report = safe_merge_and_unload(pm, output_dir=tmp_path / "tg", probe_input_ids=probe)
    want = torch.linspace(-1, 1, VOCAB)
    merged.save_pretrained(tmp_path / "user")
    for d in (tmp_path / "tg", tmp_path / "user"):
        reloaded = AutoModelForMaskedLM.from_pretrained(d, dtype=torch.float32)
        for n in BERT_BIASES:
            assert torch.equal(reloaded.get_parameter(n), want), f"{d.name}: {n} lost on reload"
        diff = (probe_logits(reloaded, probe) - adapter_logits).abs().max().item()
        assert diff <= FP32_TOL, f"{d.name}: logits after reload differ by {diff:.3g}"


MODE_CASES = {
    # TestBaseTunerWarnForTiedEmbeddings::test_warn_for_tied_embeddings_merge on models with dropout (0.1)
    "gpt2": Case(f"{T_WARN}test_warn_for_tied_embeddings_merge[gpt2]", "gpt2", lora(target_modules=["lm_head"]),
                 {"transformer.wte.weight": "base", "lm_head.weight": ("lora", "lm_head")}),
    "opt": Case(f"{T_WARN}test_warn_for_tied_embeddings_merge[opt]", "opt", lora(target_modules=["lm_head"]),
                {OE: "base", OH: ("lora", "lm_head")}),
    "t5": Case(f"{T_TT}test_weight_tying_applied_when_model_is_tied_encoder_decoder[t5, lm_head LoRA]", "t5",
               lora(target_modules=["lm_head"]),
               {**{n: "base" for n in T5_ALL[:3]}, "lm_head.weight": ("lora", "lm_head")}),
}


@pytest.mark.parametrize("state", ["training", "as_get_peft_model_returns_it"])
@pytest.mark.parametrize("model", list(MODE_CASES))
def test_merge_keeps_modes_and_matches_peft(model: str, state: str, tmp_path):
    """Dropout active: the user merges straight after training (model in train mode), or right after
    ``get_peft_model`` (root in train mode, base in eval mode). tie_guard compares in eval mode, leaves every
    module of the adapter model in its mode, and returns the merged model in the modes PEFT's own
    ``merge_and_unload`` returns it in."""
    case = MODE_CASES[model]
    if state == "training":
        pm, snapshot, names = build(case, steps=2)
        pm.train()
    else:
        case = Case(case.id, case.model, LoraConfig(**{**case.config.to_dict(), "init_lora_weights": False}),
                    case.expect)
        base = MODELS[case.model][0]()
        snapshot = {n: p.detach().clone() for n, p in base.named_parameters(remove_duplicate=False)}
        pm, names = get_peft_model(base, case.config), ["default"]
    before = modes(pm)
    probe, adapter_logits, peft_modes = _peft_reference(pm, names)
    expected = {n: expected_value(spec, n, pm, snapshot, names) for n, spec in case.expect.items()}

    merged, report = safe_merge_and_unload(pm, output_dir=tmp_path / "tg", probe_input_ids=probe)
    assert modes(pm) == before, "the adapter model's train/eval modes changed"
    assert modes(merged) == peft_modes, "the merged model's modes differ from PEFT's merge_and_unload"
    diff = (probe_logits(merged, probe) - adapter_logits).abs().max().item()
    assert diff <= FP32_TOL
    _check_weights(merged, expected, "merged")


def test_lokr_on_tied_head_is_refused_by_name_or_merged_exactly(tmp_path):
    """TestWeightTying::test_weight_tying_tied_model_target_modules_lokr: LoKr on a tied lm_head (PEFT warns 'no
    implementation exists to tie the adapters'). Either an exact merge (input embeddings bit-identical, logits
    equal) or a refusal naming LoKr before any work; never a crash or a silent wrong merge."""
    case = Case(f"{T_INIT}test_weight_tying_tied_model_target_modules_lokr", "llama",
                LoKrConfig(r=4, target_modules=["q_proj", "lm_head"]), {LE: "base"})
    pm, snapshot, names = build(case)
    probe, adapter_logits, _ = _peft_reference(pm, names)
    before = probe_logits(pm, probe)
    try:
        merged, report = safe_merge_and_unload(pm, output_dir=tmp_path / "tg", probe_input_ids=probe)
    except UnsupportedAdapterError as exc:
        assert "lokr" in str(exc).lower() and "Fix" in str(exc)
        assert not (tmp_path / "tg").exists()
    else:
        assert torch.equal(merged.get_parameter(LE), snapshot[LE])
        assert (probe_logits(merged, probe) - adapter_logits).abs().max().item() <= FP32_TOL
    assert torch.equal(probe_logits(pm, probe), before)


@pytest.mark.parametrize("kind", ["modules_to_save", "trainable_token_indices"])
def test_two_active_adapters_on_the_same_tied_module_are_refused(kind):
    """test_custom_models.py::test_multiple_active_adapters_with_same_{modules_to_save,trainable_token_indices}
    _raises, on a tied model: merging both at once is refused with PEFT's ValueError, and the adapter model keeps
    its active adapter and its outputs."""
    extra = {"modules_to_save": ["lm_head"]} if kind == "modules_to_save" else {"trainable_token_indices": [1, 5]}
    case = Case("", "llama", lora(target_modules=["q_proj"], **extra), {},
                extra=[("other", lora(target_modules=["q_proj"], **extra))])
    pm, _, _ = build(case)
    probe = make_probe_ids(VOCAB)
    before = probe_logits(pm, probe)
    with pytest.raises(ValueError, match="Only one adapter can be set at a time"):
        safe_merge_and_unload(pm, adapter_names=["default", "other"], probe_input_ids=probe)
    assert list(pm.active_adapters) == ["default"]
    assert torch.equal(probe_logits(pm, probe), before)
