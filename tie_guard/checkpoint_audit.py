"""Audit a merged checkpoint made by any tool against its base (and optionally its adapter)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .groups import find_tied_groups
from .init_rewrites import classify_rewrite, find_init_rewrites, numerical_rank
from .probe import ProbeRun, logit_tolerance, make_probe_ids, model_dtype
from .tie_config import tie_flags

#: Architectures whose common runtimes/converters always tie the output head to the input embedding
#: (llama.cpp's Gemma graphs read the head from ``token_embd``; GGUF converters for Gemma drop ``lm_head``).
HEAD_ALWAYS_TIED = {"gemma", "gemma2", "gemma3", "gemma3_text"}


@dataclass
class AuditReport:
    """Findings of :func:`audit_checkpoint`. ``sound`` is False when any ``problems`` were found.

    Attributes:
        input_embedding_rows_changed: vocabulary rows of the input embedding that differ from the base.
        input_embedding_max_abs_change: largest |Δ| of any input-embedding element.
        changed_tokens: up to 10 most-changed rows as ``{"id", "token", "max_abs_change"}``.
        tie_flags: ``tie_word_embeddings`` per config level of the checkpoint.
        stored_keys: whether the checkpoint stores the input and output embedding tensors.
        max_abs_logit_diff / logit_tolerance: merged vs base + adapter (with an adapter only).
        base_rewritten_by_init: the LoRA init that rewrote the tied input embedding (``"pissa"``, ``"olora"``,
            ``"kasa"``, ... from the adapter's config, or recognised from the weights by
            :func:`tie_guard.init_rewrites.classify_rewrite`), else ``None``.
        runtimes: what common runtimes will do with the checkpoint, in words.
        problems: each problem with its fix; empty when sound.
    """

    merged: str
    base: str
    adapter: str | None = None
    input_embedding_rows_changed: int = 0
    input_embedding_max_abs_change: float = 0.0
    adapter_trains_input_embedding: bool | None = None
    changed_tokens: list = field(default_factory=list)
    tie_flags: dict = field(default_factory=dict)
    stored_keys: dict = field(default_factory=dict)
    max_abs_logit_diff: float | None = None
    logit_tolerance: float | None = None
    base_rewritten_by_init: str | None = None
    runtimes: list = field(default_factory=list)
    problems: list = field(default_factory=list)

    @property
    def sound(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "sound": self.sound}


def _stored_keys(merged_dir: Path) -> set[str]:
    keys: set[str] = set()
    for f in sorted(merged_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            keys |= set(st.keys())
    return keys


def audit_checkpoint(merged_dir: str, merged, base, tokenizer=None, adapter_model=None, adapter_dir=None) -> AuditReport:
    """Compare a loaded merged checkpoint with its base (and base + adapter).

    Args:
        merged_dir: the checkpoint directory (its safetensors keys and config are read).
        merged / base: the loaded models (not modified).
        tokenizer: used to name changed tokens.
        adapter_model: the base wrapped with the adapter (a ``PeftModel``), or ``None``.
    Raises:
        ValueError: ``base`` cannot be where ``merged`` comes from (:func:`check_same_architecture`).
    """
    rep = AuditReport(merged=str(merged_dir), base=str(getattr(base, "name_or_path", "")), adapter=adapter_dir)
    check_same_architecture(merged, base)
    e_m = merged.get_input_embeddings().weight.detach()
    e_b = base.get_input_embeddings().weight.detach()
    diff = (e_m.float() - e_b.float()).abs().amax(dim=1)
    rep.input_embedding_rows_changed = int((diff > 0).sum())
    rep.input_embedding_max_abs_change = float(diff.max()) if diff.numel() else 0.0
    top = torch.argsort(diff, descending=True)[: min(10, rep.input_embedding_rows_changed)]
    rep.changed_tokens = [
        {"id": int(i), "token": tokenizer.convert_ids_to_tokens(int(i)) if tokenizer is not None else None,
         "max_abs_change": float(diff[i])} for i in top
    ]
    rewrites = []
    if adapter_model is not None:
        groups = find_tied_groups(adapter_model)
        rep.adapter_trains_input_embedding = any(m.touched_by for g in groups for m in g.input_members)
        rewrites = find_init_rewrites(adapter_model, groups)
    if rep.input_embedding_rows_changed:
        rep.base_rewritten_by_init = rewrites[0].init if rewrites else classify_rewrite(e_b, e_m)
    if rep.base_rewritten_by_init:
        rep.problems.append(
            f"input embeddings differ from the base in {rep.input_embedding_rows_changed} of {e_b.shape[0]} rows "
            f"(max |Δ| {rep.input_embedding_max_abs_change:.3g}) by a {rep.base_rewritten_by_init} rewrite: that "
            "LoRA init rewrote the tied matrix inside get_peft_model, so the checkpoint's input embedding is the "
            "rewritten one, not the pretrained one. Fix: re-merge with tie_guard.safe_merge_and_unload(..., "
            "original_base=<the base loaded again>) to restore it, or retrain with the head untied before "
            "get_peft_model (or a plain init).")
    elif rep.input_embedding_rows_changed and not rep.adapter_trains_input_embedding:
        changed = (f"input embeddings changed in {rep.input_embedding_rows_changed} of {e_b.shape[0]} rows (max |Δ| "
                   f"{rep.input_embedding_max_abs_change:.3g})"
                   + (" although the adapter does not train them" if adapter_model is not None else ""))
        evidence = _plain_merge_evidence(e_b, e_m, adapter_model)
        if evidence:
            rep.problems.append(f"{changed}: a plain merge wrote an output-embedding delta into a tied matrix "
                                f"({evidence}). Fix: re-merge from the adapter with `tie-guard merge` (tie_policy "
                                "untie).")
        else:
            rep.problems.append(f"{changed}, by a change that is no low-rank adapter delta: the merged checkpoint does "
                                "not come from this base" + (" + adapter" if adapter_model is not None else "")
                                + ". Fix: verify against the base it was merged from.")

    cfg = json.loads((Path(merged_dir) / "config.json").read_text())
    rep.tie_flags = tie_flags(merged.config)
    keys = _stored_keys(Path(merged_dir))
    in_name = _param_name(merged, merged.get_input_embeddings())
    out_mod = merged.get_output_embeddings()
    out_name = _param_name(merged, out_mod) if out_mod is not None else None
    rep.stored_keys = {in_name: in_name in keys, **({out_name: out_name in keys} if out_name else {})}
    says_tied = any(rep.tie_flags.values())
    head_differs = out_name is not None and not torch.equal(out_mod.weight, merged.get_input_embeddings().weight)
    if out_name and not says_tied and out_name not in keys:
        rep.problems.append(f"config says untied but {out_name} is not stored: from_pretrained will initialise it "
                            "randomly. Fix: save with tie_word_embeddings=True or store the head.")
    if out_name and says_tied and out_name in keys and head_differs:
        rep.problems.append(
            f"config says tied ({', '.join(k for k, v in rep.tie_flags.items() if v)}) but {out_name} is stored "
            "with values different from the input embedding: transformers ≥ 5.4 keeps both (with a warning), older "
            "versions and any later tie_weights() (resize_token_embeddings, FSDP2 prepare) replace it by the input "
            "embedding. Fix: set tie_word_embeddings=False on every config level (tie-guard merge does).")
    model_type = cfg.get("text_config", {}).get("model_type", cfg.get("model_type"))
    if head_differs and model_type in HEAD_ALWAYS_TIED:
        rep.runtimes.append(
            f"{model_type}: llama.cpp/GGUF converters always tie Gemma's head to the input embedding, so the merged "
            f"{out_name} is dropped there and the model will compute a different function than in transformers.")
    elif head_differs:
        rep.runtimes.append("untied head stored separately: runtimes that read lm_head (transformers, vLLM, "
                            "llama.cpp with output.weight) use the merged head.")
    else:
        rep.runtimes.append("head equals the input embedding: tied and untied runtimes compute the same.")

    if adapter_model is not None:
        vocab = e_m.shape[0]
        probe = make_probe_ids(vocab)
        ref = ProbeRun(adapter_model, probe)
        rep.max_abs_logit_diff, max_abs_logit = ProbeRun(merged, probe).compare(ref)
        rep.logit_tolerance = logit_tolerance(model_dtype(merged), max_abs_logit)
        if rep.max_abs_logit_diff > rep.logit_tolerance:
            rep.problems.append(f"merged logits differ from base + adapter by {rep.max_abs_logit_diff:.3g} "
                                f"(tolerance {rep.logit_tolerance:.3g}): the checkpoint is not the trained model. "
                                "Fix: re-merge with `tie-guard merge`.")
    return rep


def check_same_architecture(merged, base) -> None:
    """Raise ``ValueError`` (a usage error: exit 2 in the CLI) naming both sides when ``base`` cannot be the model
    ``merged`` was merged from: another model class, or a parameter of another shape (the input embedding first).
    """
    e_m, e_b = merged.get_input_embeddings().weight, base.get_input_embeddings().weight
    if type(merged).__name__ != type(base).__name__ or e_m.shape != e_b.shape:
        raise ValueError(
            f"the base ({type(base).__name__}, input embedding {tuple(e_b.shape)}) does not match the merged checkpoint "
            f"({type(merged).__name__}, input embedding {tuple(e_m.shape)}). Fix: pass the base it was merged from "
            "(after resize_token_embeddings if the adapter was trained with added tokens).")
    b_shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
    for n, p in merged.named_parameters():
        if n in b_shapes and b_shapes[n] != tuple(p.shape):
            raise ValueError(f"{n} is {tuple(p.shape)} in the merged checkpoint but {b_shapes[n]} in the base. Fix: "
                             "pass the base it was merged from.")


def _plain_merge_evidence(e_b: torch.Tensor, e_m: torch.Tensor, adapter_model=None) -> str | None:
    """Why the change ``e_m − e_b`` (vocab × hidden) looks like PEFT's plain merge of a head delta, or ``None``:
    with the adapter, the merged input embedding equals the base plus the adapter's output-embedding delta (within
    fp32 rounding of the weights); without it, the change is low-rank (numerical rank ≤ 256 and below half the
    hidden size), as a LoRA delta is, where other weights would differ at full rank."""
    if adapter_model is not None:
        from .effective import effective_weight
        from .peft_layout import iter_base_parameters

        out_mod = adapter_model.get_output_embeddings()
        for bp in iter_base_parameters(adapter_model):
            if bp.attr == "weight" and bp.parts and bp.parts[0].wrapper is out_mod:
                head = effective_weight(bp.param, bp.parts).materialize().float()
                if head.shape == e_m.shape and torch.allclose(e_m.float(), head, rtol=1e-5, atol=1e-6):
                    return "it equals the base's head plus the adapter's head delta"
    rank = numerical_rank(e_m.float() - e_b.float())
    if rank <= min(256, e_b.shape[1] // 2):
        return f"the change has rank {rank}, as a LoRA delta has"
    return None


def _param_name(model, module) -> str:
    for name, mod in model.named_modules():
        if mod is module:
            return f"{name}.weight"
    return "?"
