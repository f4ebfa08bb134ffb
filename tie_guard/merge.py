"""Verified merge of a PEFT adapter into a model with tied weights."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from .atomic import atomic_directory, check_destination, write_json_atomic
from .effective import all_finite, effective_weight
from .errors import MergeVerificationError, TiedMergeError, UnsupportedAdapterError
from .groups import TieGroup, UnionFind, find_tied_groups, physical_components
from .init_rewrites import resolve_init_rewrites
from .module_copy import shallow_module_copy
from .peft_defects import layout_defects
from .peft_layout import BaseParameter, PeftModel, is_peft_wrapper, iter_base_parameters
from .probe import ProbeRun, check_probe_ids, logit_tolerance, make_probe_ids, model_dtype
from .tie_config import (RELOAD_KEEPS_DIFFERING_TIES, declared_ties, fold_untie_side_effects, forget_ties,
                         set_tie_flags, tie_flags, ties_on_reload)

TiePolicy = Literal["untie", "keep_tied", "error"]
TIE_POLICIES = ("untie", "keep_tied", "error")
REPORT_NAME = "tie_guard_merge_report.json"


@dataclass
class EmbeddingCheck:
    """What the merge did to one input embedding (vocab × hidden), compared with the base model's weight.

    Attributes:
        name: canonical parameter name.
        equals_base: the merged weight equals the base (pre-merge) weight bit for bit. Required when the adapter
            does not train this embedding; when it does (``trained_by_adapter``), False is expected and what the
            merged model must match is the trained value, which the logit check verifies.
        trained_by_adapter: the adapter itself changes this input embedding (LoRA on it, trainable tokens,
            a ``modules_to_save`` copy).
        rows_changed: vocabulary rows that differ from the base weight (-1 when the shapes differ).
        max_abs_change: largest |Δ| from the base weight of any element (0.0 when equal).
    """

    name: str
    equals_base: bool
    trained_by_adapter: bool
    rows_changed: int
    max_abs_change: float


@dataclass
class MergeReport:
    """Everything measured by :func:`safe_merge_and_unload`.

    Attributes:
        tie_policy: ``"untie"``, ``"keep_tied"`` or ``"error"``.
        adapter_names: adapters merged.
        dtype: dtype of the merged model, e.g. ``"torch.float32"``.
        groups_before: tie groups of the adapter model (rows as in ``TieGroup.as_rows``).
        actions: what was done to ties and configs, in words.
        plain_merge_changes_input_embeddings: a plain PEFT ``merge_and_unload()`` would write an adapter delta into
            a tied input embedding on this model.
        probe_shape: shape of the probe batch (batch, seq).
        max_abs_logit_diff: max |logit_merged − logit_adapter| on the probe batch.
        logit_tolerance: the bound used for this dtype (see :mod:`tie_guard.probe`).
        logits_match: ``max_abs_logit_diff <= logit_tolerance``: the merged model computes what the adapter model
            computes. Required for ``"untie"``/``"error"``; with ``"keep_tied"`` usually False when a tied group was
            adapted on one side (the shift is the price of keeping one matrix).
        input_embeddings: one :class:`EmbeddingCheck` per input embedding.
        tie_flags_after: ``tie_word_embeddings`` at each config level of the merged model.
        shared_after_reload: the members of the tie groups that share one tensor in the merged model, which is
            also what a reload of its saved checkpoint shares (e.g. ``[["model.embed_tokens.weight",
            "lm_head.weight"]]`` for ``keep_tied``; ``[]`` after an untie on a two-member group).
        saved_copies: members that were one tensor before the merge and are now separate equal copies because the
            saved config does not re-tie them (``{"names": [...], "copy_of": name, "nbytes": int}``), e.g. BART's
            encoder/decoder ``embed_tokens`` after an untie of ``lm_head``.
        output_dir: where the merged model was saved (``None`` when not saved).
        reload_max_abs_logit_diff: max |logit_reloaded − logit_merged| after save → reload.
        reload_input_embeddings_match_merged: every input embedding after reload equals the merged model's
            bit for bit (which the in-memory check compared with the pre-merge value).
        verified: every check the policy requires passed (``False`` only inside a
            :class:`MergeVerificationError`): for ``"untie"``/``"error"`` logits match and untrained input
            embeddings are bit-identical; for ``"keep_tied"`` the tie holds and save → reload is exact; always
            the reload checks when saving.
        base_rewritten_by_init: tied base weights a LoRA init (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ, KaSA) rewrote
            inside ``get_peft_model``, one dict per rewrite (see :class:`tie_guard.init_rewrites.InitRewrite`): the
            adapter model's input embeddings are then not the pretrained ones; ``restored`` says whether the merge
            brought them back.
        warnings: risks that remain after a verified merge, each with its fix.
        failures: the checks that failed, in words.
        seconds: wall time of each phase: ``probe_adapter`` (adapter logits on the probe), ``merge`` (building
            the merged model and resolving ties), ``verify``, ``save``, ``reload``.
    """

    tie_policy: str
    adapter_names: list[str]
    dtype: str
    groups_before: list[dict] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    plain_merge_changes_input_embeddings: bool = False
    probe_shape: list[int] = field(default_factory=list)
    max_abs_logit_diff: float = float("nan")
    logit_tolerance: float = float("nan")
    logits_match: bool = False
    input_embeddings: list[EmbeddingCheck] = field(default_factory=list)
    tie_flags_after: dict = field(default_factory=dict)
    shared_after_reload: list[list[str]] = field(default_factory=list)
    saved_copies: list[dict] = field(default_factory=list)
    output_dir: str | None = None
    reload_max_abs_logit_diff: float | None = None
    reload_input_embeddings_match_merged: bool | None = None
    verified: bool = False
    base_rewritten_by_init: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    @property
    def untrained_input_embeddings_bit_identical(self) -> bool:
        """Every input embedding the adapter does not train is bit-identical to its pre-merge value, and to the
        pretrained value where a LoRA init had rewritten it (``base_rewritten_by_init``)."""
        return (all(e.equals_base for e in self.input_embeddings if not e.trained_by_adapter)
                and all(r["restored"] == "original" for r in self.base_rewritten_by_init))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["untrained_input_embeddings_bit_identical"] = self.untrained_input_embeddings_bit_identical
        return d


# ----------------------------------------------------------------------------------------------------------------
# Building the merged model without touching the adapter model
# ----------------------------------------------------------------------------------------------------------------


def _share_clone(m: nn.Module, replace: dict[int, nn.Module], memo: dict[int, nn.Module]) -> nn.Module:
    """Copy the module tree (not the tensors) of ``m``, substituting ``replace[id(module)]`` for PEFT wrappers."""
    if id(m) in memo:
        return memo[id(m)]
    if id(m) in replace:
        memo[id(m)] = replace[id(m)]
        return memo[id(m)]
    new = shallow_module_copy(m)
    memo[id(m)] = new
    for name, child in m._modules.items():
        new._modules[name] = None if child is None else _share_clone(child, replace, memo)
    return new


def _detach_configs(model: nn.Module) -> None:
    """Give the cloned tree its own configs (nested identity kept) and its own tie records."""
    memo: dict = {}
    for module in model.modules():
        cfg = module.__dict__.get("config")
        if isinstance(cfg, PretrainedConfig):
            module.config = copy.deepcopy(cfg, memo)
        if isinstance(module, PreTrainedModel):
            if isinstance(getattr(module, "all_tied_weights_keys", None), dict):
                module.all_tied_weights_keys = dict(module.all_tied_weights_keys)
            if getattr(module, "generation_config", None) is not None:
                module.generation_config = copy.deepcopy(module.generation_config)


def _replacement(bps: list[BaseParameter], inplace: bool = False) -> nn.Module:
    """A plain module computing what the wrapped module computes: a shallow copy of the base module whose
    parameters are the effective (merged) weights; untouched parameters are shared, not copied. With ``inplace``
    (only for modules whose weights are not tied), PEFT's own in-place merge is used instead and the base module
    itself is returned: no copy."""
    base_module = bps[0].module
    parts = bps[0].parts
    if inplace and len(parts) == 1 and parts[0].kind in ("lora", "dora", "lora_variant") and parts[0].adapter_names:
        return _merge_in_place(bps, parts[0])
    new = shallow_module_copy(base_module)
    for attr, p in base_module._parameters.items():
        if p is None:
            continue
        eff = effective_weight(p, parts, attr)
        if eff.kind == "zero" and eff.base is p:
            continue  # untouched: keep the very same Parameter (its ties stay intact)
        value = eff.materialize()
        if not all_finite(value):
            raise MergeVerificationError(
                f"The merged {bps[0].module_path}.{attr} contains NaN/Inf: the adapter "
                f"({', '.join(pt.describe() for pt in parts)}) is broken. Fix: retrain or restore the adapter from "
                "an earlier checkpoint; nothing was merged."
            )
        new._parameters[attr] = nn.Parameter(value, requires_grad=False)
    return new


def _merge_in_place(bps: list[BaseParameter], part) -> nn.Module:
    """PEFT's own in-place ``merge(safe_merge=False)`` of ``part`` into its base module, which is returned.

    ``safe_merge=True`` would clone each weight, and the clone's allocation stays resident (measured on
    SmolLM2-135M: +0.49 × the head's bytes of RSS for its 60 q/v projections; torch 2.13, peft 0.21). Instead the
    adapter's own tensors are checked for NaN/Inf before anything is written, and the merged weight after."""
    wrapper, names = part.wrapper, list(part.adapter_names)
    broken = [n for n, p in wrapper.named_parameters() if not n.startswith("base_layer.")
              and any(f".{a}." in f".{n}." for a in names) and not all_finite(p)]
    if broken:
        raise MergeVerificationError(
            f"{bps[0].module_path}: the adapter's {', '.join(broken)} contain NaN/Inf: the adapter is broken. "
            "Fix: retrain or restore the adapter from an earlier checkpoint; nothing was merged into this layer."
        )
    wrapper.merge(safe_merge=False, adapter_names=names)
    for attr, p in bps[0].module._parameters.items():
        if p is not None and not all_finite(p):
            raise MergeVerificationError(
                f"The merged {bps[0].module_path}.{attr} contains NaN/Inf (the adapter's delta overflows "
                f"{p.dtype}). The adapter model was being merged in place (inplace=True) and is no longer usable; "
                "the base checkpoint on disk is untouched. Fix: merge in a wider dtype (float32)."
            )
    return bps[0].module


def _build_merged(peft_model: PeftModel, base_params: list[BaseParameter], inplace: bool = False,
                  tied: frozenset = frozenset()) -> nn.Module:
    by_wrapper: dict[int, list[BaseParameter]] = {}
    for bp in base_params:
        if bp.parts:
            by_wrapper.setdefault(id(bp.parts[0].wrapper), []).append(bp)
    replace = {key: _replacement(bps, inplace and not any(bp.name in tied for bp in bps))
               for key, bps in by_wrapper.items()}
    merged = _share_clone(peft_model.get_base_model(), replace, {})
    _detach_configs(merged)
    # Parameters of the adapter model's base are frozen; a merged model starts frozen too.
    return merged


# ----------------------------------------------------------------------------------------------------------------
# Tie resolution
# ----------------------------------------------------------------------------------------------------------------


def _set_param(model: nn.Module, name: str, param: nn.Parameter) -> None:
    mod_path, _, attr = name.rpartition(".")
    module = model.get_submodule(mod_path) if mod_path else model
    module._parameters[attr] = param


def _equal_classes(model: nn.Module, names: list[str]) -> list[list[str]]:
    """Partition ``names`` by parameter value: same object, or bit-equal tensors."""
    classes: list[tuple[torch.Tensor, list[str]]] = []
    for n in names:
        p = model.get_parameter(n)
        for rep, members in classes:
            if p is rep or (p.shape == rep.shape and p.dtype == rep.dtype and torch.equal(p, rep)):
                members.append(n)
                break
        else:
            classes.append((p, [n]))
    return [members for _, members in classes]


def _tie_source(g: TieGroup, declared: dict[str, str]) -> str:
    """The member every other member of ``g`` is tied to: the declared tie source (``model.shared.weight`` for BART,
    ``model.embed_tokens.weight`` for Llama), else the first input embedding, else the first member."""
    names = set(g.names)
    sources = sorted({s for t, s in declared.items() if t in names and s in names and s not in declared})
    if sources:
        return sources[0]
    return g.input_members[0].name if g.input_members else g.names[0]


def _resolve_ties(merged: nn.Module, groups: list[TieGroup], policy: str, report: MergeReport) -> None:
    """Decide, per tie group, which members share one tensor in the merged model, set the config's tie flags to
    match, then give the merged model exactly the layout a reload of its saved checkpoint will have
    (:func:`_match_reload_layout`), so that ``save_pretrained`` by tie_guard or by the user reloads exactly."""
    declared = declared_ties(merged)
    untie = False
    for g in groups:
        names = list(g.names)
        source = _tie_source(g, declared)
        classes = _equal_classes(merged, names)
        if len(classes) == 1:
            # Equal values: one shared Parameter (re-tie if the merge produced separate equal copies).
            keep = merged.get_parameter(source)
            for n in names:
                if merged.get_parameter(n) is not keep:
                    _set_param(merged, n, keep)
            if g.touched:
                report.actions.append(f"{g.label}: adapter leaves {', '.join(names)} equal; kept them tied")
            continue
        if policy == "keep_tied":
            chosen = _keep_tied_value(merged, g, classes)
            for n in names:
                _set_param(merged, n, chosen)
            report.actions.append(
                f"{g.label}: kept {', '.join(names)} tied; the shared matrix holds the adapted side's merged value"
            )
            continue
        # untie: each class of equal values keeps one storage; the tie source's class stays the source.
        for members in classes:
            keep = merged.get_parameter(members[0])
            for n in members[1:]:
                _set_param(merged, n, keep)
        others = [n for n in names if n not in next(c for c in classes if source in c)]
        untie = True
        if g.status == "declared_not_tied":
            report.actions.append(f"{g.label}: config declares {', '.join(names)} tied but they hold different "
                                  "values; recorded them as untied so a reload keeps each")
        else:
            report.actions.append(f"{g.label}: untied {', '.join(others)} from {source}")
    if untie:
        before = tie_flags(merged.config)
        flags = set_tie_flags(merged.config, False)
        report.actions.append(f"set {', '.join(flags) or 'no tie flag'} = False")
        report.actions.extend(fold_untie_side_effects(merged, before))
    _match_reload_layout(merged, groups, declared, report)


def _match_reload_layout(merged: nn.Module, groups: list[TieGroup], declared: dict[str, str],
                         report: MergeReport) -> None:
    """Make the merged model share exactly the tensors that ``from_pretrained`` will tie for its saved config.

    ``save_pretrained`` (transformers 5.24 ``remove_tied_weights_from_state_dict``) writes one tensor per storage
    and drops the others when their names match a class-level ``_tied_weights_keys`` pattern; ``from_pretrained``
    restores only the pairs of :func:`tie_config.ties_on_reload` whose tensors are equal. A tensor shared in memory
    but not re-tied on reload would come back missing (re-initialised): BART's encoder/decoder ``embed_tokens``
    once ``tie_word_embeddings`` is False, BERT's ``cls.predictions.bias``. Such members get their own copy here
    (the bytes are reported), and transformers' runtime record keeps only the ties the reload will make, so the
    merged model, its user-saved checkpoint and tie_guard's ``output_dir`` all have one layout.
    """
    reload_ties = ties_on_reload(merged)
    equal_pairs = [(t, s) for t, s in reload_ties.items() if _same_value(merged, t, s)]
    uf = UnionFind()
    for t, s in equal_pairs:
        uf.union(t, s)
    saved_flags = tie_flags(type(merged.config).from_dict(merged.config.to_dict()))  # what the saved file says
    forced = ", ".join(k for k, v in saved_flags.items() if v) or "it"
    for t, s in reload_ties.items():
        if (t, s) not in equal_pairs and _has_param(merged, t) and _has_param(merged, s):
            report.warnings.append(
                f"the saved config still ties {t} to {s} ({type(merged.config).__name__} forces {forced} = True), "
                "but they now differ. "
                + ("transformers ≥ 5.4 keeps both on reload because they differ, but a later tie_weights() "
                   "(resize_token_embeddings, accelerate FSDP2 prepare) will re-tie them and lose one. Fix: do not "
                   "call tie_weights() on the merged model, or keep the adapter unmerged for this architecture."
                   if RELOAD_KEEPS_DIFFERING_TIES else
                   "This transformers version re-ties them on reload and loses one. Fix: keep the adapter unmerged "
                   "for this architecture, or use transformers ≥ 5.4.")
            )
    for g in groups:
        source = _tie_source(g, declared)
        by_param: dict[int, list[str]] = {}
        for n in sorted(g.names, key=lambda n: (n != source, n)):
            by_param.setdefault(id(merged.get_parameter(n)), []).append(n)
        for sharing in by_param.values():
            parts: dict[str, list[str]] = {}
            for n in sharing:
                parts.setdefault(uf.find(n), []).append(n)
            for split in list(parts.values())[1:]:  # the first part (the source's) keeps the tensor
                p = merged.get_parameter(split[0])
                copy_ = nn.Parameter(p.detach().clone(), requires_grad=False)
                for n in split:
                    _set_param(merged, n, copy_)
                nbytes = p.numel() * p.element_size()
                report.saved_copies.append({"names": split, "copy_of": sharing[0], "nbytes": nbytes})
                report.actions.append(
                    f"{', '.join(split)}: own copy of {sharing[0]} ({_fmt_bytes(nbytes)}): "
                    "the saved config does not declare them tied, so save → reload keeps them as equal copies"
                )
    keep = {t for t, _ in equal_pairs}
    removed = forget_ties(merged, set(declared_ties(merged)) - keep)
    if removed:
        report.actions.append(f"removed {', '.join(sorted(set(removed)))} from transformers' tied-weights record")
    report.shared_after_reload = [sorted(c) for c in physical_components(
        {n: merged.get_parameter(n) for g in groups for n in g.names})]


def restore_use_cache(config: PretrainedConfig, report: MergeReport) -> None:
    """Give the merged model's config (every level) its class default ``use_cache`` where training switched it off
    (the Trainer and gradient checkpointing set ``use_cache=False``): the merged model is for inference."""
    from .tie_config import iter_configs

    for path, cfg in iter_configs(config):
        if vars(cfg).get("use_cache") is False:
            try:
                default = getattr(type(cfg)(), "use_cache", None)
            except Exception:  # noqa: BLE001 - a config class that needs arguments: leave it
                continue
            if default:
                cfg.use_cache = default
                report.actions.append(f"set {path}.use_cache = {default} (training had switched it off)")


def _has_param(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
    except AttributeError:
        return False
    return True


def _same_value(model: nn.Module, a: str, b: str) -> bool:
    if not (_has_param(model, a) and _has_param(model, b)):
        return False
    pa, pb = model.get_parameter(a), model.get_parameter(b)
    return pa is pb or (pa.shape == pb.shape and pa.dtype == pb.dtype and torch.equal(pa, pb))


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _keep_tied_value(merged: nn.Module, g: TieGroup, classes: list[list[str]]) -> nn.Parameter:
    """The single value for a group kept tied: the side the adapter changed (exactly one delta applied)."""
    changed = [c for c in classes if any(next(m for m in g.members if m.name == n).touched_by for n in c)]
    untouched = [c for c in classes if c not in changed]
    if len(changed) == 1 and untouched:
        return merged.get_parameter(changed[0][0])
    raise TiedMergeError(
        f"tie_policy='keep_tied' cannot keep {', '.join(g.names)} tied: the adapter changes them differently "
        f"({'; '.join('/'.join(c) for c in classes)}), so one tied matrix cannot hold both. "
        "Fix: use tie_policy='untie' (exact), or train with ensure_weight_tying=True so both sides share one delta."
    )


# ----------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------


def _embedding_check(name: str, before: torch.Tensor, after: torch.Tensor, trained: bool) -> EmbeddingCheck:
    if after is before or (after.shape == before.shape and torch.equal(after, before)):
        return EmbeddingCheck(name, True, trained, 0, 0.0)
    if after.shape != before.shape:
        return EmbeddingCheck(name, False, trained, -1, float("inf"))
    diff = (after.detach().float() - before.detach().float()).abs()
    rows = int((diff.reshape(diff.shape[0], -1) != 0).any(dim=1).sum())
    return EmbeddingCheck(name, False, trained, rows, float(torch.nan_to_num(diff, nan=float("inf")).max()))


def _input_embedding_names(groups: list[TieGroup]) -> dict[str, bool]:
    """Canonical input-embedding names → whether the adapter trains them."""
    out: dict[str, bool] = {}
    for g in groups:
        for m in g.input_members:
            out[m.name] = bool(m.touched_by)
    return out


def plain_merge_changes_input_embeddings(groups: list[TieGroup]) -> bool:
    """True when PEFT's in-place ``merge_and_unload()`` would add a delta trained for another member into a tied
    input embedding (a physically tied group with an adapter on a non-input member)."""
    for g in groups:
        if not g.physical:
            continue
        if any(m.touched_by for m in g.members if m.role != "input_embedding") and any(
            not m.touched_by for m in g.input_members
        ):
            return True
    return False


# ----------------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------------


def safe_merge_and_unload(
    peft_model: PeftModel,
    tie_policy: TiePolicy = "untie",
    *,
    adapter_names: list[str] | None = None,
    output_dir: str | Path | None = None,
    tokenizer=None,
    overwrite: bool = False,
    probe_input_ids: torch.Tensor | None = None,
    probe_shape: tuple[int, int] = (2, 32),
    verify_reload: bool = True,
    progress=None,
    inplace: bool = False,
    original_base: nn.Module | dict | None = None,
    initial_adapter: str | Path | dict | None = None,
) -> tuple[nn.Module, MergeReport]:
    """Merge a PEFT adapter so that tied input embeddings are preserved, and verify the result.

    Unlike PEFT's ``merge_and_unload()`` (which adds each delta in place into ``base_layer.weight``, i.e. into the
    shared matrix of a tied pair), this builds a new model object: modules without an adapter share their tensors
    with the base model (no copy); each adapted module gets its merged weight as a new tensor (built in row chunks:
    one weight's bytes of extra memory). The adapter model is not modified and stays usable.

    Tie policies:
        * ``"untie"`` (default): members of a tied group that end up with different values get separate storage;
          ``tie_word_embeddings`` is set False on every config level that carries it and the untied targets are
          removed from transformers' ``all_tied_weights_keys``, so ``save_pretrained`` keeps both tensors and
          neither ``from_pretrained`` nor ``tie_weights()`` / ``resize_token_embeddings`` re-ties them
          (transformers ≥ 5.4 behaviour). Members left equal stay tied.

    Layout (every policy, every parameter: embeddings and biases alike): the merged model shares exactly the
    tensors that ``from_pretrained`` will re-tie for its saved config (:func:`tie_config.ties_on_reload`); members
    shared before but not re-tied by that config (BART's encoder/decoder ``embed_tokens`` once the flag is False,
    BERT's ``cls.predictions.bias``) become equal copies, listed in ``report.saved_copies`` with their bytes. So the
    merged model saved by the user's own ``save_pretrained`` reloads exactly, like ``output_dir``.

    Modes: every module of the adapter model keeps its own ``training`` flag (verification runs in eval mode and
    restores each flag, not just the root's); the merged model's modules have the modes of the base model's
    modules, as PEFT's ``merge_and_unload()`` returns them.
        * ``"keep_tied"``: the group stays one matrix holding the adapted side's merged value (the delta applied
          exactly once); the logit difference this causes is reported, not treated as a failure.
        * ``"error"``: raise :class:`TiedMergeError` if any adapter part touches a physically tied group.

    Verification (always): every logit of merged vs adapter model on a probe batch (default 2 × 32 random token
    ids) within :func:`tie_guard.probe.logit_tolerance` for the model's dtype (``"untie"``/``"error"`` only), and
    every input embedding not trained by the adapter bit-identical to its pre-merge value. The logits are never
    held whole: each model's forward stops at its output embedding and the logits are produced block by block
    from that input by each model's own head (and soft-capping/logit scale), see :class:`tie_guard.probe.ProbeRun`;
    peak extra memory of the verification is a few % of the head's bytes. With ``output_dir``: the model
    (safetensors), ``tokenizer`` and report are written to a temporary sibling, reloaded with ``from_pretrained``
    and checked again (logits vs merged, embeddings, ties), then renamed into place.

    Args:
        peft_model: a ``peft.PeftModel`` (LoRA-family or another tuner with layer merges, ``modules_to_save``,
            trainable tokens). Not modified.
        tie_policy: see above.
        adapter_names: adapters to merge (default: the active adapters).
        output_dir: where to save the verified merged model; must not exist unless ``overwrite``.
        tokenizer: saved beside the model when given.
        overwrite: replace an existing ``output_dir`` (atomically, after verification).
        probe_input_ids: (batch, seq) token ids to verify on; default a seeded random batch of ``probe_shape``.
        probe_shape: (batch, seq) of the default probe batch.
        verify_reload: reload from ``output_dir`` and check again (ignored without ``output_dir``).
        progress: optional callable receiving each phase name as it starts (``"merge"``, ``"verify"``,
            ``"save"``, ``"reload"``), e.g. to drive a progress bar.
        inplace: merge LoRA layers whose weights are *not* tied in place with PEFT's own merge (no copy; peak
            extra memory ≈ one copy of each tied head; the adapter's tensors are checked for NaN/Inf first). The adapter model is consumed, as with PEFT's
            ``merge_and_unload()``: do not use it afterwards. Tied weights are never written in place.
        original_base: the unmodified pretrained model (or ``{canonical name: tensor}`` of its input embeddings).
            Only used when a LoRA init (PiSSA, OLoRA, KaSA, ...) rewrote a tied matrix in ``get_peft_model``: the
            untie merge then restores the pretrained input embedding bit for bit (see :mod:`tie_guard.init_rewrites`).
        initial_adapter: the adapter saved right after ``get_peft_model`` (PEFT's
            ``path_initial_model_for_weight_conversion``), directory or state dict: restores a PiSSA/OLoRA/CorDA/
            LoRA-GA rewrite as ``W_res + s·B0·A0`` (exact up to rounding) when ``original_base`` is not given.
    Returns:
        ``(merged_model, report)``; ``merged_model`` is a plain transformers model of the base model's class.
    Raises:
        TypeError: ``peft_model`` is not a ``PeftModel``.
        ValueError: unknown ``tie_policy`` or adapter name.
        TiedMergeError: ``tie_policy="error"`` and a tied group is touched, or ``"keep_tied"`` is impossible.
        UnsupportedAdapterError: a prompt-learning adapter, or a PEFT layer without an exact merge.
        MergeVerificationError: a check failed; nothing is saved and ``.report`` holds the numbers.
        FileExistsError: ``output_dir`` exists and ``overwrite`` is False.
        OSError: writing ``output_dir`` failed (no space, read-only); nothing is left behind.
    """
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"tie_policy must be one of {TIE_POLICIES}, got {tie_policy!r}")
    if not isinstance(peft_model, PeftModel):
        raise TypeError(
            f"safe_merge_and_unload expects a peft.PeftModel, got {type(peft_model).__name__}. "
            "Fix: pass the model returned by peft.get_peft_model(...) or PeftModel.from_pretrained(...)."
        )
    if isinstance(adapter_names, str):
        adapter_names = [adapter_names]
    names = list(adapter_names or peft_model.active_adapters)
    unknown = [n for n in names if n not in peft_model.peft_config]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; this model has {sorted(peft_model.peft_config)}")
    for n in names:
        if getattr(peft_model.peft_config[n], "is_prompt_learning", False):
            raise UnsupportedAdapterError(
                f"Adapter {n!r} is a prompt-learning adapter ({peft_model.peft_config[n].peft_type}); it has no "
                "weights to merge. Fix: keep it as an adapter (PeftModel) for inference."
            )
    _refuse_inexact_tuners(peft_model, names)
    if output_dir is not None:
        check_destination(output_dir, overwrite)

    phase = progress or (lambda name: None)
    phase("merge")
    t0 = time.perf_counter()
    # The groups and everything read from the model see the adapters being merged, not the active ones.
    with _active_adapters(peft_model, names):
        dtype = model_dtype(peft_model)
        groups = find_tied_groups(peft_model)
        report = MergeReport(
            tie_policy=tie_policy,
            adapter_names=names,
            dtype=str(dtype),
            groups_before=[row for g in groups for row in g.as_rows()],
            plain_merge_changes_input_embeddings=plain_merge_changes_input_embeddings(groups),
        )
        _refuse_quantized(peft_model)
        touched = [g for g in groups if g.physical and g.touched]
        for g in touched:
            for mem in g.members:
                odd = [t for t in mem.touched_by if t.split("[")[0] not in EXACT_ON_TIED]
                if odd:
                    raise UnsupportedAdapterError(
                        f"{mem.name} is tied ({', '.join(g.names)}) and adapted by {', '.join(odd)}: tie_guard merges "
                        f"tied weights exactly only for {', '.join(sorted(EXACT_ON_TIED))}. Fix: retrain with LoRA on "
                        "this module (or leave it out of the adapter), or keep the adapter unmerged."
                    )
        if tie_policy == "error" and touched:
            raise TiedMergeError(
                "tie_policy='error': the adapter touches tied weights: "
                + "; ".join(f"{m.name} ({', '.join(m.touched_by)})" for g in touched for m in g.members if m.touched_by)
                + f" (tied with {', '.join(n for g in touched for n in g.names)}). A plain merge would write into the "
                "shared matrix. Fix: use tie_policy='untie' (preserves input embeddings) or 'keep_tied'."
            )

        base_params = list(iter_base_parameters(peft_model))
        _refuse_meta(base_params)
        _refuse_merged_state(base_params)
        defects = layout_defects(base_params)
        if defects:
            raise UnsupportedAdapterError("cannot merge this adapter exactly: " + " ".join(defects))
        config = peft_model.get_base_model().config
        vocab = _vocab_size(config)
        probe = probe_input_ids if probe_input_ids is not None else make_probe_ids(vocab, *probe_shape)
        check_probe_ids(probe, vocab)
        report.probe_shape = list(probe.shape)
        t_probe = time.perf_counter()
        adapter_run = ProbeRun(peft_model, probe)
        report.seconds["probe_adapter"] = time.perf_counter() - t_probe
        tied = frozenset(n for g in groups for n in g.names)
        merged = _build_merged(peft_model, base_params, inplace, tied)
        # Still inside: the adapter model's head outputs are produced chunk by chunk during the comparison, with
        # the merged adapters active.
        _resolve_ties(merged, groups, tie_policy, report)
        restore_use_cache(merged.config, report)
        report.tie_flags_after = tie_flags(merged.config)
        report.seconds["merge"] = time.perf_counter() - t0 - report.seconds["probe_adapter"]

        phase("verify")
        t1 = time.perf_counter()
        merged_run = ProbeRun(merged, probe)
        report.max_abs_logit_diff, max_abs_logit = merged_run.compare(adapter_run)
        report.logit_tolerance = logit_tolerance(dtype, max_abs_logit)
        report.logits_match = report.max_abs_logit_diff <= report.logit_tolerance
        pre = {bp.name: bp.param for bp in base_params}
        trained = _input_embedding_names(groups)
        report.input_embeddings = [
            _embedding_check(n, pre[n], merged.get_parameter(n), trained[n]) for n in trained if n in pre
        ]
        if tie_policy != "keep_tied" and not report.max_abs_logit_diff <= report.logit_tolerance:
            report.failures.append(
                f"merged logits differ from the adapter model's by {report.max_abs_logit_diff:.3g} "
                f"(tolerance {report.logit_tolerance:.3g} for {dtype})"
            )
        if tie_policy != "keep_tied" and not report.untrained_input_embeddings_bit_identical:
            bad = [e.name for e in report.input_embeddings if not e.equals_base and not e.trained_by_adapter]
            report.failures.append(f"input embeddings changed by the merge: {', '.join(bad)}")
        report.seconds["verify"] = time.perf_counter() - t1
        if report.failures:
            raise MergeVerificationError(_failure_message(report), report)
        restored_run = resolve_init_rewrites(peft_model, merged, groups, base_params, names, probe, adapter_run,
                                             report, original_base, initial_adapter)
        merged_run = merged_run if restored_run is None else restored_run

    if output_dir is not None:
        _save_and_check(merged, merged_run, probe, tokenizer, Path(output_dir), overwrite,
                        verify_reload, report, phase)
    report.verified = True
    return merged, report


#: Adapter parts whose merge into a tied weight tie_guard computes exactly (see tie_guard.effective): LoRA and
#: AdaLoRA by their factors, modules_to_save and trainable tokens directly, and the other peft 0.21 tuners below by
#: PEFT's own layer merge on a copy, each measured exact on a trained tied lm_head by tests/test_tuners.py.
EXACT_ON_TIED = {"lora", "dora", "lora_variant", "adalora", "modules_to_save", "trainable_tokens",
                 "boft", "c3a", "deft", "delora", "fourierft", "frod", "glora", "gralora", "hira", "hra", "ia3",
                 "ln_tuning", "loha", "lokr", "miss", "oft", "osf", "peanut", "psoft", "pvera", "randlora", "road",
                 "shira", "supertuning", "tinylora", "unilora", "vblora", "vera", "waveft"}


def _refuse_meta(base_params: list[BaseParameter]) -> None:
    meta = [bp.name for bp in base_params if bp.param.device.type == "meta"]
    if meta:
        raise UnsupportedAdapterError(
            f"{len(meta)} base weights are on the meta device ({', '.join(meta[:3])}{', ...' if len(meta) > 3 else ''}): "
            "the model is not materialised or is partly offloaded (accelerate device_map with disk/CPU offload), so "
            "there are no values to merge. Fix: load the base fully into memory (no device_map offload, "
            "low_cpu_mem_usage is fine) before merging; `tie-guard merge` does this."
        )


def _refuse_quantized(peft_model: PeftModel) -> None:
    base = peft_model.get_base_model()
    bnb = sorted({type(mod).__name__ for mod in base.modules() if type(mod).__name__ in ("Linear4bit", "Linear8bitLt")})
    quant = getattr(base, "hf_quantizer", None) is not None or getattr(base, "is_quantized", False)
    if bnb or quant:
        qc = getattr(base.config, "quantization_config", None)
        kind = ", ".join(bnb) or getattr(qc, "quant_method", None) or (qc or {}).get("quant_method", "quantized")
        raise UnsupportedAdapterError(
            f"the base model is quantized ({kind}): an exact merge into quantized weights is impossible and "
            "transformers refuses to save it. Fix: load the base unquantized (e.g. dtype=torch.bfloat16, no "
            "quantization_config) and load the adapter onto it; a GGUF base can be dequantized with "
            "tie_guard.packaged.load_gguf(path) (or `tie-guard merge BASE.gguf ...`)."
        )


def _refuse_merged_state(base_params: list[BaseParameter]) -> None:
    for bp in base_params:
        for part in bp.parts:
            merged = list(getattr(part.wrapper, "merged_adapters", []) or [])
            if merged:
                raise UnsupportedAdapterError(
                    f"adapter(s) {merged} are currently merged into the base weights of {part.module_path!r} "
                    "(peft_model.merge_adapter() was called): their delta already sits in the base matrix"
                    + (", which is shared with a tied weight" if bp.parts else "")
                    + ". Fix: call peft_model.unmerge_adapter() first, then merge with tie_guard."
                )


def _vocab_size(config: PretrainedConfig) -> int:
    for _, cfg in _configs_with_vocab(config):
        return int(cfg.vocab_size)
    raise ValueError("cannot find vocab_size in the model config; pass probe_input_ids explicitly")


def _configs_with_vocab(config: PretrainedConfig):
    from .tie_config import iter_configs

    for p, cfg in iter_configs(config):
        if isinstance(getattr(cfg, "vocab_size", None), int):
            yield p, cfg


class _active_adapters:
    """Temporarily make ``names`` the active adapters (PEFT's ``set_adapter``), then restore exactly what was
    there: the tuner's ``active_adapter``, every PEFT layer's own ``_active_adapter`` (after ``delete_adapter`` they
    can differ from the model's) and every parameter's ``requires_grad`` (``set_adapter`` marks the newly active
    adapters trainable). Checked with peft 0.21."""

    def __init__(self, peft_model: PeftModel, names: list[str]):
        self.model, self.names = peft_model, names

    def __enter__(self):
        self.switch = list(self.model.active_adapters) != self.names
        if not self.switch:
            return
        tuner = self.model.base_model
        self.saved_tuner = copy.copy(tuner.__dict__.get("active_adapter"))
        self.saved_layers = [(m, copy.copy(m.__dict__["_active_adapter"])) for m in tuner.modules()
                             if is_peft_wrapper(m) and "_active_adapter" in m.__dict__]
        self.saved_grad = [(p, p.requires_grad) for p in self.model.parameters()]
        # PeftModel.set_adapter takes one name; the tuner's set_adapter accepts a list.
        tuner.set_adapter(self.names if len(self.names) > 1 else self.names[0])

    def __exit__(self, *exc):
        if not self.switch:
            return
        if self.saved_tuner is not None:
            self.model.base_model.active_adapter = self.saved_tuner
        for m, active in self.saved_layers:
            m._active_adapter = active
        for p, flag in self.saved_grad:
            p.requires_grad_(flag)


def _failure_message(report: MergeReport) -> str:
    return (
        "Merge verification failed: " + "; ".join(report.failures)
        + ". Nothing was saved. Fix: keep using the adapter model (it is unchanged) and report this with the "
        "MergeReport attached (exception.report)."
    )


def _save_and_check(merged, merged_run: ProbeRun, probe, tokenizer, out: Path, overwrite: bool, verify_reload: bool,
                    report: MergeReport, phase) -> None:
    from safetensors import SafetensorError

    phase("save")
    t0 = time.perf_counter()
    with atomic_directory(out, overwrite=overwrite) as tmp:
        try:
            merged.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        except (OSError, SafetensorError) as exc:
            raise OSError(f"writing the merged model to {out} failed ({exc}); nothing was written there and the "
                          "temporary directory is removed. Fix: free space or choose a writable output_dir.") from exc
        report.seconds["save"] = time.perf_counter() - t0
        if verify_reload:
            phase("reload")
            t1 = time.perf_counter()
            reloaded = type(merged).from_pretrained(tmp, dtype=model_dtype(merged))
            report.reload_max_abs_logit_diff = ProbeRun(reloaded, probe).max_abs_diff(merged_run)
            ok = True
            for e in report.input_embeddings:
                want = merged.get_parameter(e.name)  # already checked against the pre-merge value
                got = reloaded.get_parameter(e.name)
                ok &= got.shape == want.shape and torch.equal(got, want)
            report.reload_input_embeddings_match_merged = ok
            # Every tensor that was in a tie group (biases included) must come back as saved, not re-initialised.
            members = sorted({row["member"] for row in report.groups_before})
            lost = [n for n in members if not _same_tensor_values(merged, reloaded, n)]
            reload_groups = sorted((g.status, g.names) for g in find_tied_groups(reloaded))
            merged_groups = sorted((g.status, g.names) for g in find_tied_groups(merged))
            del reloaded
            report.seconds["reload"] = time.perf_counter() - t1
            if not report.reload_max_abs_logit_diff <= report.logit_tolerance:
                report.failures.append(
                    f"after save → reload, logits differ from the merged model's by "
                    f"{report.reload_max_abs_logit_diff:.3g} (tolerance {report.logit_tolerance:.3g})"
                )
            if not ok:
                report.failures.append("after save → reload, input embeddings differ from the expected values")
            if lost:
                report.failures.append(f"after save → reload, {', '.join(lost)} differ from the merged model's "
                                       "(missing from the checkpoint or re-tied on load)")
            if reload_groups != merged_groups:
                report.failures.append(f"ties changed on reload: {merged_groups} → {reload_groups}")
            if report.failures:
                raise MergeVerificationError(_failure_message(report), report)
        report.output_dir = str(out)
        report.verified = True
        write_json_atomic(tmp / REPORT_NAME, report.to_dict())


def _same_tensor_values(a: nn.Module, b: nn.Module, name: str) -> bool:
    """``name`` exists in both models with equal shape, dtype and bits."""
    if not (_has_param(a, name) and _has_param(b, name)):
        return False
    pa, pb = a.get_parameter(name), b.get_parameter(name)
    return pa.shape == pb.shape and pa.dtype == pb.dtype and torch.equal(pa, pb)


# ----------------------------------------------------------------------------------------------------------------
# Tuners without an exact merge: refused before any work
# ----------------------------------------------------------------------------------------------------------------

#: PEFT tuners (``PeftType`` names, peft 0.21) with no merged weight: mixing adapters per input, or no merge.
_INPUT_DEPENDENT = {
    "POLY": ("Poly", "its router mixes its LoRA modules per task (the forward needs task_ids), so no single merged "
             "weight computes what the adapter model computes"),
    "LILY": ("Lily", "PEFT 0.21 has no merge for Lily (its layers raise NotImplementedError), so the merged "
                     "weights cannot be computed"),
    "XLORA": ("X-LoRA", "its classifier mixes its LoRA experts per token from the hidden states, so no single "
                        "merged weight computes what the adapter model computes"),
}


def _refuse_inexact_tuners(peft_model: PeftModel, names: list[str]) -> None:
    """Raise :class:`UnsupportedAdapterError` (before the probe, the merge or any write) for adapters tie_guard
    cannot merge exactly: input-dependent tuners (Poly, X-LoRA), Lily (no merge in PEFT), adaption prompts (no
    weights), PEFT layers without a ``merge`` method, and a trained bias (``lora_bias=True``, BEFT) on a layer
    without one (peft 0.21 itself refuses that merge: "Impossible to merge LoRA with `lora_bias=True` because the
    base layer has no bias")."""
    from .peft_layout import find_module_parts

    # X-LoRA registers its own config beside the LoRA experts it mixes (the active adapters are the experts).
    mixers = [n for n, c in peft_model.peft_config.items() if _peft_type(c) == "XLORA"]
    for n in mixers + names:
        ptype = _peft_type(peft_model.peft_config[n])
        if ptype in _INPUT_DEPENDENT:
            label, why = _INPUT_DEPENDENT[ptype]
            raise UnsupportedAdapterError(
                f"Adapter {n!r}: no exact merge for {label}: {why}. Fix: keep it as an "
                "adapter (PeftModel) for inference, or train a LoRA adapter if you need merged weights."
            )
        if ptype == "ADAPTION_PROMPT":
            raise UnsupportedAdapterError(
                f"Adapter {n!r} is an adaption prompt ({ptype}): it adds gated prompt attention, not weight deltas, "
                "so there is nothing to merge. Fix: keep it as an adapter (PeftModel) for inference."
            )
    wanted = set(names)
    for path, parts in find_module_parts(peft_model).items():
        for part in parts:
            layer = part.wrapper
            if part.kind not in ("modules_to_save", "trainable_tokens") and not hasattr(layer, "merge"):
                raise UnsupportedAdapterError(
                    f"{type(layer).__module__}.{type(layer).__name__} on {path!r} ({part.kind}) has no merge in "
                    "PEFT, so its merged weights cannot be computed exactly. Fix: keep the adapter unmerged "
                    "(PeftModel), or train this module with LoRA instead."
                )
            base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else None
            trained_bias = _bias_adapters(layer, wanted)
            if trained_bias and getattr(base, "bias", None) is None:
                raise UnsupportedAdapterError(
                    f"{path!r} is trained with {trained_bias} but its base layer {type(base).__name__} has no bias: "
                    "the merged module would need a new bias parameter that "
                    f"{type(peft_model.get_base_model()).__name__} does not have, so save → from_pretrained would "
                    "drop it (PEFT's own merge refuses this too). Fix: retrain without the bias term (lora_bias=False), "
                    "or target only layers that have a bias, or keep the adapter unmerged."
                )


def _peft_type(config) -> str:
    """``config.peft_type`` as its upper-case name, e.g. ``"POLY"``."""
    return str(getattr(config.peft_type, "value", config.peft_type)).upper()


def _bias_adapters(layer: nn.Module, wanted: set[str]) -> str:
    """Which bias-training option of ``wanted`` adapters ``layer`` carries (``""`` when none): LoRA's
    ``lora_bias=True`` (peft 0.21 ``lora_B`` with a bias) or BEFT's ``beft_bias``."""
    lora = [a for a, on in (getattr(layer, "lora_bias", None) or {}).items() if on and a in wanted]
    if lora:
        return f"lora_bias=True (adapter {', '.join(lora)})"
    beft = [a for a in (getattr(layer, "beft_bias", None) or {}) if a in wanted]
    return f"a BEFT bias (adapter {', '.join(beft)})" if beft else ""
