"""The PEFT setups that reach tied weights, shared by the setup-matrix tests and the README compatibility table."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from conftest import VOCAB, tiny_model, train_adapter_a_little
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tie_guard import TiedMergeError, safe_merge_and_unload
from tie_guard.probe import make_probe_ids, probe_logits

# name → LoraConfig kwargs (r=4 everywhere; q_proj is always a LoRA target so every adapter has a LoRA part)
SETUPS: dict[str, dict] = {
    "lora lm_head": dict(target_modules=["q_proj", "lm_head"]),
    "lora lm_head, use_dora": dict(target_modules=["q_proj", "lm_head"], use_dora=True),
    "lora lm_head, use_rslora": dict(target_modules=["q_proj", "lm_head"], use_rslora=True),
    "lora lm_head + embed_tokens": dict(target_modules=["q_proj", "lm_head", "embed_tokens"]),
    "lora lm_head, ensure_weight_tying": dict(target_modules=["q_proj", "lm_head"], ensure_weight_tying=True),
    "lora lm_head + embed_tokens, ensure_weight_tying": dict(
        target_modules=["q_proj", "lm_head", "embed_tokens"], ensure_weight_tying=True),
    "modules_to_save lm_head": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "modules_to_save lm_head, ensure_weight_tying": dict(
        target_modules=["q_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True),
    "modules_to_save embed_tokens": dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
    "modules_to_save embed_tokens, ensure_weight_tying": dict(
        target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True),
    "modules_to_save both": dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]),
    "modules_to_save both, ensure_weight_tying": dict(
        target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"], ensure_weight_tying=True),
    "trainable tokens (list)": dict(target_modules=["q_proj"], trainable_token_indices=[1, 5, 9]),
    "trainable tokens (list), ensure_weight_tying": dict(
        target_modules=["q_proj"], trainable_token_indices=[1, 5, 9], ensure_weight_tying=True),
    "trainable tokens (dict: embed_tokens)": dict(
        target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 5, 9]}),
    "trainable tokens (dict: embed_tokens + lm_head)": dict(
        target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 5, 9], "lm_head": [1, 5, 9]}),
    "trainable tokens (dict: both), ensure_weight_tying": dict(
        target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 5, 9], "lm_head": [1, 5, 9]},
        ensure_weight_tying=True),
}


def build(setup: str, arch: str = "llama_tied"):
    base = tiny_model(arch)
    base_embed = base.get_input_embeddings().weight.detach().clone()
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, **SETUPS[setup]))
    train_adapter_a_little(pm, steps=4)
    return pm, base_embed


def _rows_changed(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a != b).any(dim=1).sum())


def _reload_diff(model, probe, reference) -> float:
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        reloaded = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        return (probe_logits(reloaded, probe) - reference).abs().max().item()


def measure(setup: str, arch: str = "llama_tied") -> dict:
    """Numbers for one setup: PEFT's plain merge beside tie_guard's 'untie' and 'keep_tied'."""
    pm, base_embed = build(setup, arch)
    probe = make_probe_ids(VOCAB)
    adapter = probe_logits(pm, probe)
    row = {"setup": setup, "arch": arch}

    plain = build(setup, arch)[0].merge_and_unload()  # same seeds: an identical adapter model (PEFT merges in place)
    row["plain"] = {
        "embed_rows_changed": _rows_changed(plain.get_input_embeddings().weight, base_embed),
        "logit_diff": (probe_logits(plain, probe) - adapter).abs().max().item(),
        "reload_logit_diff": _reload_diff(plain, probe, adapter),
        "tie_flag": bool(plain.config.tie_word_embeddings),
    }
    for policy in ("untie", "keep_tied"):
        with tempfile.TemporaryDirectory() as d:
            try:
                merged, rep = safe_merge_and_unload(pm, policy, output_dir=Path(d) / "m", probe_input_ids=probe)
            except TiedMergeError as exc:
                row[policy] = {"outcome": "refused", "message": str(exc)}
                continue
            reloaded = AutoModelForCausalLM.from_pretrained(Path(d) / "m", dtype=torch.float32)
            row[policy] = {
                "outcome": "verified" if rep.verified else "failed",
                "embed_rows_changed": _rows_changed(merged.get_input_embeddings().weight, base_embed),
                "logit_diff": rep.max_abs_logit_diff,
                "tolerance": rep.logit_tolerance,
                "reload_logit_diff": (probe_logits(reloaded, probe) - adapter).abs().max().item(),
                "tied_after": merged.get_input_embeddings().weight is merged.get_output_embeddings().weight,
                "reload_tied": reloaded.get_input_embeddings().weight is reloaded.get_output_embeddings().weight,
                "tie_flag": bool(merged.config.tie_word_embeddings),
                "adapter_trains_input": any(e.trained_by_adapter for e in rep.input_embeddings),
            }
    row["adapter_unchanged"] = True
    return row


def record(row: dict, name: str = "compat.jsonl") -> None:
    """Append a measured row to $TIE_GUARD_RESULTS/<name> (used to render the README tables)."""
    out = os.environ.get("TIE_GUARD_RESULTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(Path(out) / name, "a") as f:
            f.write(json.dumps(row) + "\n")


# What TRL's SFTTrainer builds when clone_chat_template adds tokens to a tied model: PEFT 0.21 stacks trainable
# tokens over a modules_to_save copy, and that layer cannot run forward (tie_guard reports it at train start).
TRL_CLONE_LAYOUTS = {
    "trainable tokens embed_tokens + modules_to_save lm_head": dict(
        target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 5, 9]}, modules_to_save=["lm_head"]),
    "... with ensure_weight_tying": dict(
        target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 5, 9]}, modules_to_save=["lm_head"],
        ensure_weight_tying=True),
}
