"""Capture tie groups before training and check them cheaply during it."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .distributed import (
    ShardingUnsupported,
    all_reduce_sum,
    check_same_on_all_ranks,
    fsdp_shard_group,
    gather_findings,
    gathered,
    is_distributed,
    is_dtensor,
    is_sharded,
    local_tensor,
    local_views,
    world,
)
from .effective import all_finite, divergence_sq, effective_weight, slice_finite
from .events import EventLog
from .errors import UnsupportedAdapterError
from .fingerprint import Fingerprint
from .groups import TieGroup, find_tied_groups, physical_components, storage_identity
from .init_rewrites import init_rewrite_warnings
from .peft_defects import layout_defects
from .peft_layout import BaseParameter, base_model_of, iter_base_parameters


@dataclass
class Finding:
    """One problem found by a check.

    Attributes:
        kind: ``"tie_broken"``, ``"tie_appeared"``, ``"frozen_modified"``, ``"nonfinite"`` or ``"missing"``.
        group: label of the tie group (``"lm_head"``).
        message: what happened and the fix.
        ranks: in a distributed run, the global ranks whose check found it (``()`` when not distributed).
    """

    kind: str
    group: str
    message: str
    ranks: tuple[int, ...] = ()


@dataclass
class CheckResult:
    """Outcome of :meth:`TieWatcher.check`.

    Attributes:
        step: optimizer step checked.
        findings: problems found (empty when all is well).
        divergence: group label → ‖W_out,eff − W_in,eff‖_F / ‖W_in‖_F (dimensionless, 0 while the effective output
            embedding equals the input embedding).
        seconds: wall time of the check.
    """

    step: int
    findings: list[Finding] = field(default_factory=list)
    divergence: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.findings


@dataclass
class _Watched:
    """A watched parameter: where to find it again, and its adapter parts."""

    bp: BaseParameter

    def resolve(self, root: nn.Module) -> torch.Tensor | None:
        try:
            module = root.get_submodule(self.bp.real_module_path) if self.bp.real_module_path else root
        except AttributeError:
            return None
        return module._parameters.get(self.bp.attr)


def _touch_signature(bp: BaseParameter) -> frozenset:
    """Identity of the adapter tensors that change this parameter; equal signatures ⇒ one shared delta."""
    sig = set()
    for part in bp.parts:
        for name, t in part.wrapper.named_parameters():
            if not name.startswith(("base_layer.", "original_module.", "token_adapter.base_layer.")):
                sig.add((part.kind, storage_identity(t)))
    return frozenset(sig)


class TieWatcher:
    """Watches the tie groups of one model: capture once, then :meth:`check` every few steps.

    The per-check cost is independent of vocabulary size for frozen shared weights (see
    :mod:`tie_guard.fingerprint`); divergence of a LoRA-adapted head is computed from the LoRA factors only
    (O((vocab + hidden) · r²)); ``modules_to_save`` copies and trainable shared weights cost one read of the matrix.

    In a distributed run (torch.distributed initialised, world size > 1) :meth:`capture` and :meth:`check` are
    collective by default: call them on every rank, in the same order (see :mod:`tie_guard.distributed`). To watch
    from one rank only, pass ``combine=False`` (each rank then sees only its own shards).

    Args:
        model: the model being trained (a transformers model or a ``PeftModel``). Only read.
        events: where findings and metrics go.
        combine: combine checks over ranks; default: when torch.distributed runs more than one rank.
    """

    def __init__(self, model: nn.Module, events: EventLog | None = None, combine: bool | None = None):
        self.model = model
        self.events = events or EventLog()
        self.combine = is_distributed() if combine is None else combine
        self.groups: list[TieGroup] = []
        self._watched: dict[str, _Watched] = {}
        self._partition: list[list[str]] = []
        self._fingerprints: dict[str, Fingerprint] = {}
        self._ref_norm: dict[str, float] = {}
        self._pairs: list[tuple[TieGroup, str, str]] = []
        self.last_divergence: dict[str, float] = {}
        self.last_result: CheckResult | None = None
        self._nan_cursor: dict[str, int] = {}
        self._offloaded: set[str] = set()
        self._no_divergence: set[str] = set()
        self.n_findings = 0
        self.captured = False

    # ------------------------------------------------------------------------------------------------------------
    def capture(self, step: int = 0) -> list[TieGroup]:
        """Find the tie groups, fingerprint frozen shared weights (one full read), emit ``capture`` and setup
        warnings. Returns the groups."""
        t0 = time.perf_counter()
        base_params = list(iter_base_parameters(self.model))
        by_name = {bp.name: bp for bp in base_params}
        self.groups = find_tied_groups(self.model)
        names: set[str] = {n for g in self.groups for n in g.names}
        root = base_model_of(self.model)
        # Also watch the model's own input/output embeddings, so a tie appearing later is seen.
        for getter in ("get_input_embeddings", "get_output_embeddings"):
            try:
                mod = getattr(root, getter)()
            except (NotImplementedError, AttributeError):
                mod = None
            for bp in base_params:
                if mod is not None and bp.attr == "weight" and (bp.parts and bp.parts[0].wrapper is mod or
                                                                bp.module is mod):
                    names.add(bp.name)
        self._watched = {n: _Watched(by_name[n]) for n in sorted(names)}
        self._partition = sorted(physical_components(self._resolve()))
        self._fingerprints, self._ref_norm, self._pairs, self._pair_adapters = {}, {}, [], {}
        offloaded, self._offloaded = [], set()
        for g in self.groups:
            if not g.physical:
                continue
            rep = by_name[g.members[0].name].param
            first_in = (g.input_members or g.members)[0].name
            if rep.device.type == "meta":
                # Offloaded by an accelerate device_map (disk/CPU offload) or not materialised: identity is still
                # watched; there are no values in memory to fingerprint or compare.
                offloaded.append(g.label)
                self._offloaded.add(g.label)
            else:
                if not rep.requires_grad:
                    self._fingerprints[g.label] = Fingerprint(rep)
                ref = by_name[first_in].param
                sq = float(torch.linalg.vector_norm(local_tensor(ref).detach().float())) ** 2
                self._ref_norm[g.label] = sq if is_sharded(ref) or not self.combine else sq / world()[1]  # a share
            for m in g.output_members:
                self._pairs.append((g, first_in, m.name))
                self._pair_adapters[(first_in, m.name)] = (
                    _adapter_tensors(by_name[m.name].parts) + _adapter_tensors(by_name[first_in].parts))
        # Every rank must see the same groups (the per-check vector has one entry per pair); then add up the
        # reference norms' shares (sharded: this rank's rows; replicated: 1/world of the full value).
        labels = sorted(self._ref_norm)
        shares = [self._ref_norm[k] for k in labels]
        if self.combine:
            check_same_on_all_ranks([(g.label, g.names, g.physical) for g in self.groups], "tie groups")
            shares = all_reduce_sum(shares)
        self._ref_norm = dict(zip(labels, (math.sqrt(max(v, 0.0)) for v in shares)))
        self._no_divergence = set()
        self.captured = True
        rows = [r for g in self.groups for r in g.as_rows()]
        self.events.emit(
            "capture", step, "info",
            f"captured {len(self.groups)} tie group(s): "
            + ("; ".join(f"{g.label} [{g.status}] = {', '.join(g.names)}" for g in self.groups) or "none"),
            metrics={"groups": len(self.groups), "capture_seconds": time.perf_counter() - t0},
            data={"groups": rows},
            table=("groups", rows) if rows else None,
        )
        if not self.groups:
            self.events.emit("no_tied_weights", step, "info",
                             "this model has no tied weights; tie_guard has nothing to watch or untie")
        if offloaded:
            self.events.emit(
                "offloaded", step, "warning",
                f"tie group(s) {', '.join(offloaded)} are on the meta device (offloaded by a device_map, or not "
                "materialised): tie_guard watches that they stay one parameter, but cannot fingerprint the frozen "
                "shared weight or compute divergence (no values in memory). Fix: keep the embeddings on a device, "
                "e.g. device_map={'model.embed_tokens': 0, 'lm_head': 0, ...}, to have them watched in full.",
                data={"groups": offloaded})
        for level, message in (setup_warnings(self.groups, by_name, root) + stack_warnings(root, base_params)
                               + init_rewrite_warnings(self.model, self.groups, by_name)):
            self.events.emit("setup_warning", step, level, message)
        return self.groups

    def baseline(self) -> dict:
        """What was captured, JSON-serialisable: per group label its members, whether physically tied, and the
        frozen shared weight's fingerprint digest (``None`` when trainable)."""
        return {g.label: {"names": list(g.names), "physical": g.physical,
                          "digest": self._fingerprints[g.label].digest if g.label in self._fingerprints else None}
                for g in self.groups}

    def compare_baseline(self, baseline: dict) -> list[Finding]:
        """Findings for differences between an earlier :meth:`baseline` (e.g. from a checkpoint) and now."""
        now = {g.label: g for g in self.groups}
        out = []
        for label, before in baseline.items():
            g = now.get(label)
            if before["physical"] and (g is None or not g.physical):
                out.append(Finding("tie_broken", label,
                                   f"tie broken since the checkpoint: {', '.join(before['names'])} were one matrix "
                                   "when it was saved and are not now. Fix: re-tie (model.tie_weights()) before "
                                   "resuming, or restart from a checkpoint where they are tied."))
            elif before["digest"] and label in self._fingerprints and self._fingerprints[label].digest != before["digest"]:
                out.append(Finding("frozen_modified", label,
                                   f"frozen shared weight of {label} differs from the one trained with before the "
                                   "checkpoint (fingerprint changed). Fix: resume on the same base model."))
        return out

    def _adapter_slice_finite(self, g: TieGroup, n_in: str, n_out: str) -> bool:
        """Check one rotating ``CHUNK_ELEMS`` slice of the adapter tensors of a pair for NaN/Inf (constant cost;
        every element is covered once per rotation)."""
        from .fingerprint import CHUNK_ELEMS

        tensors = [local_tensor(t).detach().reshape(-1) for t in self._pair_adapters[(n_in, n_out)]]
        total = sum(t.numel() for t in tensors)
        if not total:
            return True
        start = self._nan_cursor.get(g.label, 0) % total
        self._nan_cursor[g.label] = start + CHUNK_ELEMS
        end, offset = start + CHUNK_ELEMS, 0
        for t in tensors:
            lo, hi = max(start - offset, 0), min(end - offset, t.numel())
            if lo < hi and not slice_finite(t[lo:hi]):
                return False
            offset += t.numel()
        return True

    def _divergence_share(self, step: int, g: TieGroup, p_in: torch.Tensor, p_out: torch.Tensor, n_in: str,
                          n_out: str) -> float | None:
        """This rank's additive share of ‖W_out,eff − W_in,eff‖_F² (the full value when not distributed), or
        ``None`` when it cannot be computed without gathering a full matrix (then never tried again, with one
        warning)."""
        parts_in, parts_out = self._watched[n_in].bp.parts, self._watched[n_out].bp.parts
        with gathered(self._pair_adapters[(n_in, n_out)]):
            e_in, e_out = effective_weight(p_in, parts_in), effective_weight(p_out, parts_out)
            try:
                e_out, e_in, sharded = local_views(e_out, e_in)
            except ShardingUnsupported as exc:
                self._no_divergence.add(g.label)
                self.events.emit("setup_warning", step, "warning",
                                 f"divergence of {g.label} is not computed on sharded weights ({exc}); ties, frozen "
                                 "shared weights and NaN/Inf are still checked every check.")
                return None
            try:
                sq = float(divergence_sq(e_out, e_in))
            except UnsupportedAdapterError as exc:  # PEFT cannot build this layer's merged weight
                self._no_divergence.add(g.label)
                self.events.emit("setup_warning", step, "warning", f"divergence of {g.label} is not computed: {exc}")
                return None
        return sq if sharded or not self.combine else sq / world()[1]

    def _resolve(self) -> dict[str, torch.Tensor]:
        """Current tensor of every watched name still present in the model."""
        root = base_model_of(self.model)
        found = {n: w.resolve(root) for n, w in self._watched.items()}
        return {n: t for n, t in found.items() if t is not None}

    # ------------------------------------------------------------------------------------------------------------
    def check(self, step: int, emit: bool = True, divergence: bool = True) -> CheckResult:
        """Check ties, frozen shared weights, finiteness and (with ``divergence``) the divergence metric.

        Without ``divergence`` the cost is constant in vocabulary size: the tie partition, the frozen-weight
        fingerprint and a rotating ``CHUNK_ELEMS`` slice of the adapter tensors touching each group (NaN/Inf).
        With it, the exact divergence adds O((vocab + hidden) · r²) for LoRA heads and one read of a full copy for
        ``modules_to_save`` heads. Emits one ``check`` event (metrics) and one ``break`` event (level error) per
        finding."""
        if not self.captured:
            raise RuntimeError("TieWatcher.check called before capture(); call capture() after the model is ready")
        t0 = time.perf_counter()
        res = CheckResult(step)
        current = self._resolve()
        for n in sorted(self._watched.keys() - current.keys()):
            res.findings.append(Finding("missing", n, f"{n} is no longer in the model (module replaced?)"))
        partition = sorted(physical_components(current))
        if partition != self._partition:
            res.findings.extend(_partition_findings(self._partition, partition, self.groups))
            self._partition = partition
        for g in self.groups:
            fp = self._fingerprints.get(g.label)
            if fp is None or g.members[0].name not in current:
                continue
            reason = fp.quick_check(current[g.members[0].name])
            if reason is not None:
                res.findings.append(Finding(
                    "frozen_modified", g.label,
                    f"frozen shared weight {g.members[0].name} (tied with {', '.join(g.names[1:])}) was modified: "
                    f"{reason}. Something wrote into the base weights during training (an in-place merge, "
                    "a weight hook, an optimizer over frozen params). Fix: find that write; merge only at the end "
                    "with tie_guard.safe_merge_and_unload.",
                ))
                self._fingerprints[g.label] = Fingerprint(current[g.members[0].name])
        with torch.no_grad():
            for g, n_in, n_out in self._pairs:
                if divergence and g.label not in self._offloaded:
                    continue
                if n_in in current and n_out in current and not self._adapter_slice_finite(g, n_in, n_out):
                    res.findings.append(Finding(
                        "nonfinite", g.label,
                        f"NaN/Inf in the adapter of {g.label}. Fix: lower the learning rate or enable gradient "
                        "clipping, and resume from the last good checkpoint.",
                    ))
            shares: list[float | None] = [None] * len(self._pairs)
            for i, (g, n_in, n_out) in enumerate(self._pairs if divergence else ()):
                if n_in not in current or n_out not in current or g.label in self._offloaded | self._no_divergence:
                    continue
                shares[i] = share = self._divergence_share(step, g, current[n_in], current[n_out], n_in, n_out)
                if share is None:
                    continue
                trained_base = current[n_in].requires_grad
                if not math.isfinite(share) or (trained_base and not all_finite(local_tensor(current[n_in]))):
                    res.findings.append(Finding(
                        "nonfinite", g.label,
                        f"NaN/Inf in the effective weights of {g.label} ({n_out} vs {n_in}). Fix: lower the "
                        "learning rate or enable gradient clipping, and resume from the last good checkpoint.",
                    ))
        if self.combine:
            res.findings, combined = combine_over_ranks(res.findings, shares)
            for (g, _, _), local, total in zip(self._pairs, shares, combined):
                if divergence and local is not None and total is None and g.label not in self._no_divergence:
                    # Another rank could not compute it: every rank stops gathering for it, together.
                    self._no_divergence.add(g.label)
                    self.events.emit("setup_warning", step, "warning",
                                     f"divergence of {g.label} is no longer computed: another rank could not "
                                     "compute it (see that rank's warning); ties, frozen shared weights and NaN/Inf "
                                     "are still checked every check.")
            shares = combined
        for (g, _, _), share in zip(self._pairs, shares):
            if share is not None:
                d = math.sqrt(max(share, 0.0)) if math.isfinite(share) else float("nan")
                res.divergence[g.label] = d / self._ref_norm[g.label] if self._ref_norm[g.label] > 0 else d
        res.seconds = time.perf_counter() - t0
        self.last_divergence = dict(res.divergence)
        self.last_result = res
        self.n_findings += len(res.findings)
        if emit:
            metrics = {f"divergence/{k}": v for k, v in res.divergence.items()}  # absent without divergence
            metrics.update({"breaks": len(res.findings), "check_seconds": res.seconds})
            self.events.emit("check", step, "debug", "", metrics=metrics)
            emit_findings(self.events, step, res.findings)
        return res


def emit_findings(events: EventLog, step: int, findings: list[Finding]) -> None:
    """One ``break`` event (level error) per finding; in distributed runs the message ends with the ranks."""
    for f in findings:
        where = f" (rank{'s' if len(f.ranks) > 1 else ''} {', '.join(map(str, f.ranks))})" if f.ranks else ""
        events.emit("break", step, "error", f.message + where,
                    data={"kind": f.kind, "group": f.group, "ranks": list(f.ranks)})


def combine_over_ranks(findings: list[Finding], shares: list[float | None]) -> tuple[list[Finding], list[float | None]]:
    """Add up this rank's findings and divergence shares (``None``: not computed) over ranks: one ``all_reduce``; the
    findings' messages are gathered only when some rank found something (see :mod:`tie_guard.distributed`).
    Collective: every rank calls it with the same number of shares. Returns the findings of all ranks (each once,
    with its ``ranks``) and the summed shares; a share is ``None`` on every rank when any rank did not compute it
    (a partial sum would be a wrong value, and ranks must agree on what they gather next)."""
    n = len(shares)
    vec = all_reduce_sum([float(len(findings))] + [0.0 if s is None else s for s in shares]
                         + [1.0 if s is None else 0.0 for s in shares])
    total = [None if missing > 0 else v for v, missing in zip(vec[1:1 + n], vec[1 + n:])]
    if vec[0] == 0:
        return [], total
    merged = gather_findings([(f.kind, f.group, f.message) for f in findings])
    return [Finding(k, g, m, ranks) for k, g, m, ranks in merged], total


def _adapter_tensors(parts) -> list[torch.Tensor]:
    out = []
    for part in parts:
        for name, t in part.wrapper.named_parameters():
            if t.requires_grad and t.device.type != "meta" and not name.startswith(("base_layer.", "original_module.")):
                out.append(t)
    return out


def _partition_findings(before: list[list[str]], after: list[list[str]], groups: list[TieGroup]) -> list[Finding]:
    out = []
    after_sets = [set(c) for c in after]
    before_sets = [set(c) for c in before]
    for comp in before_sets:
        if comp not in after_sets:
            label = next((g.label for g in groups if comp & set(g.names)), sorted(comp)[0])
            out.append(Finding(
                "tie_broken", label,
                f"tie broken: {', '.join(sorted(comp))} no longer share one storage. A new Parameter was assigned "
                "to one of them (or the model was re-wrapped/resized). Fix: re-tie with model.tie_weights() if the "
                "config says tied, or set tie_word_embeddings=False on purpose and restart the guard.",
            ))
    for comp in after_sets:
        if comp not in before_sets and not any(comp <= b for b in before_sets):
            out.append(Finding(
                "tie_appeared", sorted(comp)[0],
                f"new tie: {', '.join(sorted(comp))} now share one storage although they were separate at the last check "
                "(tie_weights() re-read a stale tie_word_embeddings=True?). One trained matrix was replaced by the "
                "other. Fix: set config.tie_word_embeddings=False (every config level) before tie_weights() / "
                "resize_token_embeddings.",
            ))
    return out


def setup_warnings(groups: list[TieGroup], by_name: dict[str, BaseParameter],
                   root: nn.Module | None = None) -> list[tuple[str, str]]:
    """``(level, message)`` for setups that will hurt, each with its fix."""
    out = []
    for g in groups:
        owner = {n: fsdp_shard_group(root, by_name[n].real_module_path) for n in g.names
                 if root is not None and is_dtensor(by_name[n].param)}
        if g.status == "declared_not_tied" and len(set(owner.values())) > 1:
            where = ", ".join(f"{n} in {o or 'the root group'}" for n, o in owner.items())
            out.append(("error",
                        f"FSDP2 put the members of a tied group in different shard groups ({where}): fully_shard "
                        "gave each its own parameter, so the tie is gone and they train apart. Fix: fully_shard "
                        "only the decoder layers, then the whole model (accelerate's fsdp_version 2 with "
                        "TRANSFORMER_BASED_WRAP does this), so tied weights stay one parameter in one group."))
            continue
        if g.status == "declared_not_tied":
            out.append(("warning",
                        f"config declares {', '.join(g.names)} tied (tie_word_embeddings={g.config_flags}) but they "
                        "are separate tensors: save_pretrained keeps one and from_pretrained re-ties or drops the "
                        "other. Fix: set tie_word_embeddings=False on every config level (tie_guard's merge does it), "
                        "or call model.tie_weights() if they should be one matrix."))
            continue
        if g.status == "tied_not_declared":
            out.append(("warning",
                        f"{', '.join(g.names)} share one storage but the config does not declare them tied "
                        f"({g.config_flags}): save_pretrained will refuse or drop one on reload. Fix: set "
                        "tie_word_embeddings=True, or give each its own copy."))
        copies = {}
        for m in g.members:
            for part in by_name[m.name].parts:
                if part.kind == "modules_to_save":
                    for name in part.adapter_names:
                        w = part.wrapper.modules_to_save[name].weight
                        copies[storage_identity(w)] = getattr(w, "ds_numel", w.numel()) * w.element_size()
        if copies:
            out.append(("info",
                        f"modules_to_save holds {len(copies)} full copy(ies) of tied weights in {g.label}: "
                        f"{sum(copies.values()) / 2**20:.1f} MiB extra in the adapter and its checkpoints "
                        f"({sum(copies.values())} bytes)."))
        sigs = {m.name: _touch_signature(by_name[m.name]) for m in g.members}
        if len(set(sigs.values())) <= 1:
            continue
        if _vllm_ties_head(root):
            out.append(("warning",
                        f"{g.label}: this {root.config.model_type} model trains its output embedding apart from its "
                        "input embedding, but vLLM's Gemma models have no separate head and compute logits from the "
                        "INPUT embedding: a vLLM rollout (e.g. TRL GRPOTrainer(args=GRPOConfig(use_vllm=True))) "
                        "samples from a different head than the trained lm_head the trainer scores. Fix: "
                        "LoraConfig(ensure_weight_tying=True) so embed_tokens and lm_head train as one tied matrix "
                        "(modules_to_save=['embed_tokens','lm_head'] or the same trainable_token_indices), or "
                        "generate with transformers (use_vllm=False)."))
        touched = [m for m in g.members if m.touched_by]
        untouched = [m for m in g.members if not m.touched_by]
        desc = "; ".join(f"{m.name} ← {', '.join(m.touched_by)}" for m in touched)
        if untouched and all(m.role != "input_embedding" for m in touched):
            out.append(("warning",
                        f"adapter trains the output side of a tied group ({desc}) while "
                        f"{', '.join(m.name for m in untouched)} shares its matrix. PEFT's merge_and_unload() would "
                        "add the delta to the shared matrix and silently change the input embeddings. Fix: merge with "
                        "tie_guard (TieGuardCallback(merge_at_end=True) or safe_merge_and_unload, tie_policy='untie'); "
                        "never call merge_and_unload() on this model."))
        elif untouched and all(m.role == "input_embedding" for m in touched):
            out.append(("warning",
                        f"adapter trains the input embedding of a tied group ({desc}) but not "
                        f"{', '.join(m.name for m in untouched)}: the tied head keeps the old rows during training, "
                        "and a plain merge writes the new rows into the head too. Fix: add the head as well with "
                        "ensure_weight_tying=True (modules_to_save=['embed_tokens','lm_head'] or the same "
                        "trainable_token_indices), or merge with tie_guard's 'untie'."))
        else:
            out.append(("warning",
                        f"members of a tied group are trained separately ({desc}): they will no longer be one "
                        "matrix. Fix: pass ensure_weight_tying=True to LoraConfig to share one delta, or merge with "
                        "tie_guard's 'untie' to keep both exactly."))
    return out


def _vllm_ties_head(root: nn.Module | None) -> bool:
    """True for Gemma-family models (``model_type`` gemma, gemma2, gemma3, gemma3_text, ...): vLLM's
    implementations of them (vLLM 0.x ``GemmaForCausalLM`` & co.) have no ``lm_head`` and always compute logits from
    ``embed_tokens``, whatever ``tie_word_embeddings`` says."""
    config = getattr(root, "config", None) if root is not None else None
    return str(getattr(config, "model_type", "")).startswith("gemma")


def _trl_fused_lm_head(root: nn.Module) -> bool:
    """True when TRL's ``add_fused_lm_head`` (trl 1.16, SFTTrainer) patched ``root.forward``: the loss is then
    computed from ``get_output_embeddings().weight`` directly, bypassing the head module's own forward."""
    fwd = root.__dict__.get("forward")
    code = getattr(getattr(fwd, "__func__", fwd), "__code__", None)
    return code is not None and code.co_name == "_fused_forward"


def stack_warnings(root: nn.Module, base_params: list[BaseParameter]) -> list[tuple[str, str]]:
    """Errors for PEFT layouts that fail or silently train the wrong thing, each with its fix."""
    out = [("error", message) for message in layout_defects(base_params)]
    fused = _trl_fused_lm_head(root)
    out_mod = getattr(root, "get_output_embeddings", lambda: None)()
    for bp in base_params:
        if fused and bp.parts and bp.parts[0].wrapper is out_mod and bp.parts[0].kind == "trainable_tokens":
            out.append(("error",
                        f"{bp.module_path}: TRL's fused LM head computes the loss from "
                        f"{bp.module_path}.weight directly, so the trainable-token rows of the output embedding "
                        "are bypassed (and trl 1.16 fails reading its bias). Fix: put the head in "
                        "modules_to_save (ensure_weight_tying=True on a tied model) instead of trainable tokens."))
            break
    return out
