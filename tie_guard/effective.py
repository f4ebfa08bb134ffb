"""The weight a module *effectively* uses under its adapter parts, computed without modifying anything.

This is the one place that knows PEFT's merge arithmetic (checked against peft 0.21 ``lora.Linear.merge``,
``lora.Embedding.merge``, ``TrainableTokensLayer.merge`` and ``ModulesToSaveWrapper``):

* vanilla LoRA on ``nn.Linear``: ``W + scaling · B @ A`` (``B``: out × r, ``A``: r × in);
* vanilla LoRA on ``nn.Embedding``: ``W + scaling · (B @ A)ᵀ`` (``A``: r × num_embeddings, ``B``: dim × r);
* AdaLoRA (``SVDLinear``, peft 0.21 ``adalora/layer.py`` ``get_delta_weight``):
  ``W + B @ (A ⊙ E) · scaling / (ranknum + 1e-5)`` (``A``: r × in, ``E``: r × 1, ``B``: out × r);
* other LoRA variants (DoRA, ...) and other PEFT tuners: PEFT's own ``merge(safe_merge=True)`` on a copy of the
  layer (autograd state, e.g. ``ensure_weight_tying``'s tied views or MonteCLoRA's sampled buffers, is copied
  detached);
* ``modules_to_save``: the trained copy's weight;
* trainable tokens (``trainable_token_indices`` or a standalone ``TrainableTokensConfig``): ``W`` with the trained
  rows ``index_copy``-ed in.

Everything returned is a new tensor or an existing tensor that is only read; base weights, adapter weights and
modules are never written.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from .errors import UnsupportedAdapterError
from .peft_layout import AdapterPart, TrainableTokensWrapper

#: Rows per chunk when a full vocab × hidden result is built or reduced piecewise (memory: chunk × hidden).
CHUNK_ROWS = 4096

DeltaKind = Literal["zero", "lowrank", "rows", "dense"]


@dataclass
class EffectiveWeight:
    """How a base weight ``W`` (shape rows × cols) looks through its adapter parts.

    Attributes:
        base: the base weight ``W`` (read only).
        kind: ``"zero"`` (no change), ``"lowrank"`` (``W + Σ U_i @ V_i``), ``"rows"`` (some rows replaced),
            ``"dense"`` (anything else: a full tensor or a function building one).
        lowrank: for ``"lowrank"``: ``[(U, V)]`` with ``U``: rows × r and ``V``: r × cols, scaling folded into ``V`` (the
            small factor: no rows × r copy is made per check).
        row_index / row_values: for ``"rows"``: replaced row indices (k,) and their new values (k × cols).
        full: for ``"dense"``: a function returning the full effective weight (may allocate rows × cols).

    ``base`` is the tensor the change applies to: the module's own weight, or the trained copy when a
    ``modules_to_save`` wrapper sits underneath (then ``kind="zero"`` over the copy means "the copy, as is").
    """

    base: torch.Tensor
    kind: DeltaKind
    lowrank: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    row_index: torch.Tensor | None = None
    row_values: torch.Tensor | None = None
    full: Callable[[], torch.Tensor] | None = None

    def rows(self, start: int, stop: int, _cache: dict | None = None) -> torch.Tensor:
        """Effective rows ``[start, stop)`` as a new tensor in ``base.dtype`` ((stop-start) × cols)."""
        base = self.base.detach()
        if self.kind == "zero":
            return base[start:stop].clone()
        if self.kind == "lowrank":
            # W + Σ U V accumulated in float64 and rounded once to the base dtype: the merged weight is the
            # correctly rounded value (PEFT rounds B @ A in the adapter dtype first, then the sum).
            out = base[start:stop].double()
            for u, v in self.lowrank:
                out += u[start:stop].double() @ v.double()
            return out.to(base.dtype)
        if self.kind == "rows":
            out = base[start:stop].clone()
            sel = (self.row_index >= start) & (self.row_index < stop)
            if sel.any():
                out[self.row_index[sel] - start] = self.row_values[sel].to(out.dtype)
            return out
        if _cache is not None:
            if "full" not in _cache:
                _cache["full"] = self.full()
            return _cache["full"][start:stop]
        return self.full()[start:stop]

    def materialize(self) -> torch.Tensor:
        """The full effective weight, built in row chunks; for ``kind="zero"`` the base itself (shared, not
        copied). Peak extra memory: the result (one weight) plus two float64 chunk buffers of
        :func:`materialize_chunk_rows` rows, reused for every chunk (≈ 1.6 % of a float32 weight's bytes)."""
        if self.kind == "zero":
            return self.base.detach()  # no change on top of base: share it
        if self.kind == "dense":
            return self.full()
        base = self.base.detach()
        out = torch.empty_like(base, memory_format=torch.contiguous_format)
        n = base.shape[0]
        step = materialize_chunk_rows(n)
        with torch.no_grad():
            if self.kind != "lowrank":
                for start in range(0, n, step):
                    out[start:start + step] = self.rows(start, min(n, start + step))
                return out
            # Same arithmetic as rows(): W.double() + Σ (U.double() @ V.double()), rounded once; in reused buffers.
            acc = torch.empty((min(step, n), *base.shape[1:]), dtype=torch.float64)
            tmp = torch.empty_like(acc)
            vs = [v.double() for _, v in self.lowrank]
            for start in range(0, n, step):
                stop = min(n, start + step)
                a, t = acc[: stop - start], tmp[: stop - start]
                a.copy_(base[start:stop])
                for (u, _), v in zip(self.lowrank, vs):
                    torch.matmul(u[start:stop].double(), v, out=t)
                    a += t
                out[start:stop].copy_(a)
        return out


def materialize_chunk_rows(n: int) -> int:
    """Rows per chunk when materializing an ``n``-row weight: ``n / 256`` (two float64 buffers of that many rows
    are 1/64 of a float32 weight's bytes), at least 64 and at most :data:`CHUNK_ROWS`."""
    return max(1, min(CHUNK_ROWS, max(64, n // 256), n))


def _lora_adapters(layer: nn.Module, names: tuple[str, ...]) -> list[str]:
    keys = set(getattr(layer, "lora_A", {}).keys()) | set(getattr(layer, "lora_embedding_A", {}).keys())
    return [n for n in names if n in keys]


def effective_weight(base_weight: torch.Tensor, parts: list[AdapterPart], attr: str = "weight") -> EffectiveWeight:
    """Describe the effective ``attr`` of a module wrapped by ``parts`` (outermost first).

    Args:
        base_weight: the base module's parameter (rows × cols).
        parts: adapter parts from :func:`tie_guard.peft_layout.unwrap`; ``[]`` means untouched.
        attr: which parameter of the module (``"weight"`` or ``"bias"``).
    Raises:
        UnsupportedAdapterError: nested wrappers, or a PEFT layer that has no exact merge (for layers merged by
            PEFT's own code, raised when the ``"dense"`` weight is first built: ``rows`` / ``materialize``).
    """
    with torch.no_grad():
        return _effective(base_weight, parts, attr)


def _effective(w: torch.Tensor, parts: list[AdapterPart], attr: str) -> EffectiveWeight:
    eff = EffectiveWeight(base=w, kind="zero")
    for part in reversed(parts):  # innermost wrapper first
        if eff.kind != "zero":
            raise UnsupportedAdapterError(
                f"Module {part.module_path!r} stacks PEFT constructs that each change its weight "
                f"({', '.join(p.describe() for p in parts)}); tie_guard cannot merge that exactly. "
                "Fix: target the module with one of LoRA, modules_to_save or trainable_token_indices."
            )
        eff = _apply(part, eff.base, attr)
    return eff


def _apply(part: AdapterPart, w: torch.Tensor, attr: str) -> EffectiveWeight:
    """What one adapter part does on top of ``w`` (the module's weight or the copy below it)."""
    layer = part.wrapper
    if part.kind == "modules_to_save":
        if not part.adapter_names:
            return EffectiveWeight(base=w, kind="zero")
        return EffectiveWeight(base=getattr(layer.modules_to_save[part.adapter_names[0]], attr), kind="zero")
    if part.kind == "trainable_tokens":
        if attr != "weight":
            return EffectiveWeight(base=w, kind="zero")
        tok = layer.token_adapter if isinstance(layer, TrainableTokensWrapper) else layer
        idx, vals = [], []
        for name in part.adapter_names:
            if name in tok.token_indices:
                idx.extend(tok.token_indices[name])
                vals.append(tok.trainable_tokens_delta[name].detach())
        if not idx:
            return EffectiveWeight(base=w, kind="zero")
        index = torch.tensor(idx, device=w.device, dtype=torch.long)
        return EffectiveWeight(base=w, kind="rows", row_index=index, row_values=torch.cat(vals).to(w.device))
    if part.kind == "lora":
        names = _lora_adapters(layer, part.adapter_names)
        if attr == "bias":
            return _lora_bias(w, layer, names)
        if not names:
            return EffectiveWeight(base=w, kind="zero")
        if getattr(layer, "fan_in_fan_out", False):
            return _dense_via_peft(w, part)
        terms = []
        for name in names:
            scale = layer.scaling[name]
            if name in getattr(layer, "lora_A", {}):
                a = layer.lora_A[name].weight.detach()  # r × in
                b = layer.lora_B[name].weight.detach()  # out × r
                if a.dim() != 2 or b.dim() != 2:  # conv LoRA
                    return _dense_via_peft(w, part)
                terms.append((b, a * scale))
            else:
                a = layer.lora_embedding_A[name].detach()  # r × num_embeddings
                b = layer.lora_embedding_B[name].detach()  # dim × r
                terms.append((a.T, b.T * scale))
        return EffectiveWeight(base=w, kind="lowrank", lowrank=terms)
    if part.kind == "adalora":
        return _adalora(w, part, attr)
    # DoRA, other LoRA variants, other tuners: PEFT's own merge on a copy (exact, costs a full copy).
    if attr == "bias":
        return EffectiveWeight(base=w, kind="dense", full=lambda: _peft_merged_module(part).bias.detach())
    return _dense_via_peft(w, part)


def _lora_bias(b: torch.Tensor, layer: nn.Module, names: list[str]) -> EffectiveWeight:
    extra = [n for n in names if getattr(layer, "lora_bias", {}).get(n, False)]
    if not extra:
        return EffectiveWeight(base=b, kind="zero")

    def full():
        out = b.detach().clone()
        for n in extra:
            out = out + layer.lora_B[n].bias.detach() * layer.scaling[n]
        return out.to(b.dtype)

    return EffectiveWeight(base=b, kind="dense", full=full)


def _adalora(w: torch.Tensor, part: AdapterPart, attr: str) -> EffectiveWeight:
    """AdaLoRA's ``SVDLinear``: ``ΔW = B @ (A ⊙ E) · scaling / (ranknum + 1e-5)`` as one low-rank term
    (``U = B``: out × r, ``V = (A ⊙ E) · scaling / (ranknum + 1e-5)``: r × in); AdaLoRA has no bias term."""
    layer = part.wrapper
    names = [n for n in part.adapter_names if n in layer.lora_A]
    if attr != "weight" or not names:
        return EffectiveWeight(base=w, kind="zero")
    if getattr(layer, "fan_in_fan_out", False) or layer.lora_A[names[0]].dim() != 2 or w.dim() != 2:
        return _dense_via_peft(w, part)  # Conv1D / SVDConv2d layouts: PEFT's own merge on a copy
    terms = []
    for name in names:
        factor = layer.scaling[name] / (layer.ranknum[name].detach() + 1e-5)
        terms.append((layer.lora_B[name].detach(), layer.lora_A[name].detach() * layer.lora_E[name].detach() * factor))
    return EffectiveWeight(base=w, kind="lowrank", lowrank=terms)


def _dense_via_peft(w: torch.Tensor, part: AdapterPart) -> EffectiveWeight:
    return EffectiveWeight(base=w, kind="dense", full=lambda: _peft_merged_module(part).weight.detach())


def _peft_merged_module(part: AdapterPart) -> nn.Module:
    """Merge ``part`` with PEFT's own code on a deep copy of the wrapper and return the copy's base layer."""
    layer = part.wrapper
    if not hasattr(layer, "merge") or not hasattr(layer, "get_base_layer"):
        raise UnsupportedAdapterError(
            f"PEFT layer {type(layer).__name__} on {part.module_path!r} has no merge, so the merged weights cannot "
            "be computed exactly. Fix: keep the adapter unmerged, or train this module with LoRA instead."
        )
    clone = copy.deepcopy(layer, _detached_non_leaves(layer))
    try:
        clone.merge(safe_merge=True, adapter_names=list(part.adapter_names))
    except (NotImplementedError, ValueError, RuntimeError) as exc:
        raise UnsupportedAdapterError(
            f"PEFT cannot merge {type(layer).__module__}.{type(layer).__name__} on {part.module_path!r} ({exc}), so "
            "the merged weights cannot be computed exactly. Fix: keep the adapter unmerged (PeftModel), or train "
            "this module with LoRA instead."
        ) from exc
    return clone.get_base_layer()


def _detached_non_leaves(layer: nn.Module) -> dict[int, torch.Tensor]:
    """A ``copy.deepcopy`` memo mapping every non-leaf tensor that ``layer``'s modules hold outside their
    parameters (e.g. peft 0.21 ``ensure_weight_tying`` keeps ``kwargs["tied_adapter"]`` views of the tied side's
    factors; MonteCLoRA's sampler keeps buffers computed in the last forward) to a detached copy: torch 2.13
    refuses to deepcopy non-leaf tensors, and the copy must not carry the adapter model's autograd graph."""
    memo: dict[int, torch.Tensor] = {}
    seen: set[int] = set()

    def visit(value) -> None:
        if id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            if not value.is_leaf:
                memo[id(value)] = value.detach().clone()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple, set)):
            for v in value:
                visit(v)

    for module in layer.modules():
        for key, value in vars(module).items():
            if key != "_modules":
                visit(value)
    return memo


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``, checked in ``CHUNK_ROWS``-row chunks (``torch.isfinite`` on a whole vocab × hidden
    matrix allocates ~1.7 × its bytes in temporaries)."""
    flat = t.detach().reshape(t.shape[0], -1) if t.dim() > 1 else t.detach().reshape(-1, 1)
    return all(slice_finite(flat[i: i + CHUNK_ROWS]) for i in range(0, flat.shape[0], CHUNK_ROWS))


def slice_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``: one sum (a single pass, no temporary; any NaN/Inf makes it non-finite), and the exact
    ``torch.isfinite`` test only when the sum is not finite (NaN/Inf present, or finite values overflowing it)."""
    with torch.no_grad():
        if math.isfinite(float(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32))):
            return True
        return bool(torch.isfinite(t).all())


def lowrank_sq_norm(terms: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """‖Σ_i U_i V_i‖_F² without forming any rows × cols matrix.

    Uses ⟨U_i V_i, U_j V_j⟩_F = Σ (U_iᵀ U_j) ⊙ (V_i V_jᵀ); cost O((rows + cols) · r²) per pair, in float32.
    """
    total = torch.zeros((), dtype=torch.float32, device=terms[0][0].device if terms else "cpu")
    f = [(u.float(), v.float()) for u, v in terms]
    for ui, vi in f:
        for uj, vj in f:
            total = total + ((ui.T @ uj) * (vi @ vj.T)).sum()
    return total


def divergence_sq(out: EffectiveWeight, inp: EffectiveWeight) -> torch.Tensor:
    """‖W_out,eff − W_in,eff‖_F² in float32.

    When both sides build on one storage (a tied base, or one shared ``modules_to_save`` copy) and their changes
    are low-rank or zero, this never builds a rows × cols matrix; rows-only changes read only the replaced rows;
    anything else is reduced in ``CHUNK_ROWS``-row chunks.
    """
    shared_base = _same_storage(out.base, inp.base)
    if shared_base and out.kind in ("zero", "lowrank") and inp.kind in ("zero", "lowrank"):
        out_terms, in_terms = list(out.lowrank or []), list(inp.lowrank or [])
        for term in list(out_terms):  # one delta shared by both sides (ensure_weight_tying) cancels exactly
            match = next((t for t in in_terms if _same_term(term, t)), None)
            if match is not None:
                out_terms.remove(term)
                in_terms.remove(match)
        terms = out_terms + [(-u, v) for u, v in in_terms]
        if not terms:
            return torch.zeros((), dtype=torch.float32)
        return lowrank_sq_norm(terms)
    if shared_base and out.kind in ("zero", "rows") and inp.kind in ("zero", "rows"):
        idx = [t.row_index for t in (out, inp) if t.kind == "rows"]
        if not idx:
            return torch.zeros((), dtype=torch.float32)
        rows = torch.unique(torch.cat(idx))
        a = _gather_rows(out, rows).float()
        b = _gather_rows(inp, rows).float()
        return ((a - b) ** 2).sum()
    n = out.base.shape[0]
    total = torch.zeros((), dtype=torch.float32, device=out.base.device)
    cache_o, cache_i = {}, {}
    for start in range(0, n, CHUNK_ROWS):
        stop = min(n, start + CHUNK_ROWS)
        d = out.rows(start, stop, cache_o).float() - inp.rows(start, stop, cache_i).float()
        total = total + (d * d).sum()
    return total


def _gather_rows(eff: EffectiveWeight, rows: torch.Tensor) -> torch.Tensor:
    out = eff.base.detach()[rows].clone()
    if eff.kind == "rows":
        pos = {int(r): i for i, r in enumerate(rows.tolist())}
        for k, r in enumerate(eff.row_index.tolist()):
            out[pos[r]] = eff.row_values[k].to(out.dtype)
    return out


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
                      and a.shape == b.shape and a.stride() == b.stride())


def _same_term(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))
