"""Rank awareness: local views of sharded parameters, one collective per check, and the full state dict for the merge.

Facts relied on (torch 2.13, accelerate 1.15, deepspeed 0.16+):

* FSDP2 (``torch.distributed.fsdp.fully_shard``) replaces each parameter by a ``DTensor`` sharded on dim 0
  (``Shard(0)``); tied parameters stay one object (``embed_tokens.weight is lm_head.weight``). Between steps the
  parameters are sharded, so every rank holds the same row range of every vocab × hidden matrix and of every
  LoRA ``B`` (vocab × r), and a slice of the rows of LoRA ``A`` (r × hidden).
* DDP keeps a full replica per rank; the values are equal on every rank after each optimizer step.
* DeepSpeed ZeRO-3 replaces ``param.data`` with an empty tensor; the parameter keeps ``ds_id`` / ``ds_numel`` and
  its flat local partition in ``param.ds_tensor``. Values are read under ``deepspeed.zero.GatheredParameters``.

A check computes, on each rank, the findings and an additive share of each squared divergence (the local rows'
sum for sharded matrices, ``1 / world_size`` of the full value for replicated ones); :func:`combine` adds them up
with one ``all_reduce`` of a small float64 vector (1 + number of watched pairs entries). Only when some rank found
something, a second collective (``all_gather_object``) brings the findings' messages together so the main process
reports each once, with the ranks that saw it.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
import torch.distributed as dist

from .effective import EffectiveWeight
from .errors import TieGuardError


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """True when more than one rank takes part (an initialised default process group of size > 1)."""
    return world()[1] > 1


def is_main_process() -> bool:
    """True on global rank 0, or when not distributed."""
    return world()[0] == 0


def _device() -> torch.device:
    """Device the default backend exchanges tensors on (NCCL: the current CUDA device; gloo: CPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def is_zero3(t: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 partitioned parameter (identified by its ``ds_id``)."""
    return hasattr(t, "ds_id")


def is_sharded(t: torch.Tensor) -> bool:
    return is_dtensor(t) or is_zero3(t)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The values this rank holds: a DTensor's local shard, a ZeRO-3 parameter's flat partition, else ``t``."""
    if is_dtensor(t):
        return t.to_local()
    if is_zero3(t) and getattr(t, "ds_tensor", None) is not None:
        return t.ds_tensor
    return t


def _row_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a DTensor, laid out as ``Shard(0)`` (redistributed first if it is sharded otherwise)."""
    from torch.distributed.tensor import Shard

    if tuple(t.placements) != (Shard(0),) * len(t.placements):
        t = t.redistribute(t.device_mesh, [Shard(0)] * t.device_mesh.ndim)
    return t.to_local()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if is_dtensor(t) else t


class ShardingUnsupported(TieGuardError):
    """The divergence of a group cannot be computed on this rank's shards without gathering a vocab × hidden
    matrix; the watcher then skips that metric (ties, frozen weights and NaN are still checked)."""


def local_views(out: EffectiveWeight, inp: EffectiveWeight) -> tuple[EffectiveWeight, EffectiveWeight, bool]:
    """Rewrite a pair of effective weights so :func:`tie_guard.effective.divergence_sq` gives this rank's additive
    share of the squared divergence.

    Returns ``(out, inp, sharded)``. When nothing is sharded, the inputs unchanged and ``False`` (the caller scales
    the full value by ``1 / world_size``). For FSDP2 DTensors: bases and low-rank ``U`` factors (rows × r) become
    this rank's rows, low-rank ``V`` factors (r × cols, small) are gathered whole (``full_tensor``: one
    all-gather of r × cols elements per factor), and ``True``. Under ZeRO-3, a pair on one shared base whose changes
    are low-rank is computed from the gathered factors only (the shared base cancels), ``False``.

    Raises:
        ShardingUnsupported: row replacements (trainable tokens) or dense deltas on sharded weights, and ZeRO-3
            pairs that would need the full base matrix.
    """
    tensors = [out.base, inp.base] + [x for e in (out, inp) for uv in (e.lowrank or []) for x in uv]
    if not any(is_sharded(t) for t in tensors):
        return out, inp, False
    for e in (out, inp):
        if e.kind not in ("zero", "lowrank"):
            raise ShardingUnsupported(f"divergence over a sharded '{e.kind}' change is not computed shard-locally")
    if any(is_zero3(t) for t in tensors):
        if out.base is not inp.base:
            raise ShardingUnsupported("under ZeRO-3, divergence is computed only for one shared base with LoRA deltas")
        return out, inp, False  # factors are read under GatheredParameters by the caller (see gathered())

    def rows(t):
        return _row_shard(t) if is_dtensor(t) else t

    def view(e: EffectiveWeight) -> EffectiveWeight:
        terms = [(rows(u), _full(v)) for u, v in (e.lowrank or [])]
        return replace(e, base=rows(e.base), lowrank=terms or e.lowrank)

    out_v, in_v = view(out), view(inp)
    if out.base is inp.base:  # one tied parameter: keep one local object so the shared base cancels exactly
        in_v = replace(in_v, base=out_v.base)
    n = out_v.base.shape[0]
    if any(u.shape[0] != n for e in (out_v, in_v) for u, _ in (e.lowrank or [])) or in_v.base.shape[0] != n:
        raise ShardingUnsupported("the low-rank factors are not sharded like the weight rows")
    return out_v, in_v, True


@contextlib.contextmanager
def gathered(tensors: list[torch.Tensor]):
    """Read ZeRO-3 partitioned parameters in full inside the block (``deepspeed.zero.GatheredParameters``, read
    only); a no-op for anything else. Collective: every rank must enter it with the same parameters."""
    zero = [t for t in tensors if is_zero3(t)]
    if not zero:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero, modifier_rank=None):
        yield


@contextlib.contextmanager
def zero3_integration_paused():
    """Inside the block, transformers does not see an active DeepSpeed ZeRO-3 run: ``from_pretrained`` /
    ``from_config`` build plain (unpartitioned) models and save / resize / tie do not gather (collectives). Used on
    the main process alone for the end-of-run merge of an unsharded copy, while the other ranks wait.

    Relies on transformers 5.x ``transformers.integrations.deepspeed``: ``is_deepspeed_zero3_enabled()`` reads the
    module global ``_hf_deepspeed_config_weak_ref`` (set by the Trainer / accelerate from the DeepSpeed config); it is
    set to ``None`` in the block and restored after. A no-op when no ZeRO-3 config is active.
    """
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:  # transformers without the integration module
        yield
        return
    saved = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks of a float64 vector (one ``all_reduce``); the values themselves when alone."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def gather_objects(obj) -> list:
    """``obj`` (picklable) of every rank, in rank order: one ``all_gather_object``, every rank must call it;
    ``[obj]`` when not distributed."""
    if not is_distributed():
        return [obj]
    per_rank: list = [None] * world()[1]
    dist.all_gather_object(per_rank, obj)
    return per_rank


def gather_findings(local: list[tuple[str, str, str]]) -> list[tuple[str, str, str, tuple[int, ...]]]:
    """All ranks' findings ``(kind, group, message)``, deduplicated, each with the ranks that found it, in the order
    of the lowest such rank. One ``all_gather_object``; every rank must call it."""
    per_rank = gather_objects(local)
    merged: dict[tuple[str, str, str], list[int]] = {}
    for r, items in enumerate(per_rank):
        for item in items:
            merged.setdefault(tuple(item), []).append(r)
    return [(k, g, m, tuple(ranks)) for (k, g, m), ranks in merged.items()]


def check_same_on_all_ranks(signature, what: str) -> None:
    """Raise on every rank when ``signature`` (any picklable value) differs between ranks.

    Raises:
        TieGuardError: naming the ranks and the fix.
    """
    if not is_distributed():
        return
    per_rank = gather_objects(signature)
    if any(s != per_rank[0] for s in per_rank):
        detail = "; ".join(f"rank {r}: {s}" for r, s in enumerate(per_rank))
        raise TieGuardError(
            f"ranks see different {what} ({detail}). Every rank must build and wrap the model the same way. Fix: "
            "load the model, apply PEFT and tie_weights() identically on every rank before accelerator.prepare, "
            "and start tie_guard after prepare on every rank.")


def fsdp_shard_group(root: torch.nn.Module, module_path: str) -> str | None:
    """Path of the innermost FSDP2 module (``fully_shard``-ed, an ``FSDPModule``) at or above ``module_path`` inside
    ``root``; ``None`` when that is ``root``'s wrapper or nothing (the outermost group)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return None
    parts = module_path.split(".") if module_path else []
    for i in range(len(parts), 0, -1):
        path = ".".join(parts[:i])
        if isinstance(root.get_submodule(path), FSDPModule):
            return path
    return None


def has_sharded_parameters(model: torch.nn.Module) -> bool:
    return any(is_sharded(p) for p in model.parameters())


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state dict on CPU, on the main process; ``{}`` elsewhere. Its keys are those of
    ``model.state_dict()``: parameters (tied names each under their own key) and persistent buffers; non-persistent
    buffers (e.g. a rotary embedding's ``inv_freq``, which a model rebuilt from its config recomputes) are not in it,
    as ``load_state_dict`` expects.

    FSDP2: ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` with ``full_state_dict=True,
    cpu_offload=True`` (collective; gathers one parameter at a time, so peak memory is one full parameter on the
    main process). ZeRO-3 (deepspeed ≥ 0.16): the entries of ``model.state_dict(keep_vars=True)`` (torch's own
    choice of keys; partitioned parameters are still the ``ds_id`` objects there), each distinct partitioned
    parameter gathered in turn with ``GatheredParameters``; buffers are never partitioned. Every rank must call it.

    Raises:
        TieGuardError: (ZeRO-3, on every rank) the ranks' models differ in their names or partitioned parameters,
            e.g. a parameter replaced on one rank only; nothing is gathered then.
    """
    if not any(is_zero3(p) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if is_main_process() else {}
    entries = model.state_dict(keep_vars=True)
    # Gathering is collective: every rank must gather the same partitioned parameters in the same order.
    check_same_on_all_ranks([(k, getattr(t, "ds_id", None)) for k, t in entries.items()],
                            "ZeRO-3 partitioned parameters (state dict names and ds_id)")
    main = is_main_process()
    out, copies = {}, {}  # copies: one gathered tensor per parameter object, shared by its tied names
    for name, t in entries.items():
        if id(t) not in copies:
            with gathered([t]):
                copies[id(t)] = t.detach().cpu().clone() if main else None
        if main:
            out[name] = copies[id(t)]
    return out


def unsharded_replica(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain (unsharded, CPU) copy of a sharded transformers model or ``PeftModel``, built from its config (and
    PEFT configs) and loaded from ``state_dict`` (from :func:`full_state_dict`). Ties are rebuilt the way the model
    declares them (``tie_weights()``), so tied names load into one parameter. The sharded model is only read.

    Raises:
        TieGuardError: keys of the state dict do not match the rebuilt model's ``state_dict()`` keys (parameters and
            persistent buffers; a tied name missing is fine when its twin was loaded).
    """
    import copy

    from peft import PeftModel, get_peft_model

    is_peft = isinstance(model, PeftModel)
    base = model.get_base_model() if is_peft else model
    dtype = next((v.dtype for v in state_dict.values() if v.is_floating_point()), torch.float32)
    with torch.device("cpu"):
        replica = type(base)(copy.deepcopy(base.config))
    replica.to(dtype)
    if is_peft:
        names = list(model.peft_config)
        replica = get_peft_model(replica, copy.deepcopy(model.peft_config[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            replica.add_adapter(name, copy.deepcopy(model.peft_config[name]))
        replica.set_adapter(model.active_adapter)
    result = replica.load_state_dict(state_dict, strict=False)
    own = replica.state_dict(keep_vars=True)  # parameters and persistent buffers, tied names each under its own key
    loaded = {id(own[k]) for k in state_dict if k in own}  # a tied name is loaded through its twin
    missing = [k for k in result.missing_keys if id(own[k]) not in loaded]
    if missing or result.unexpected_keys:
        raise TieGuardError(
            f"the full state dict does not match the model rebuilt from its config (missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}). Fix: gather the state dict of the model being trained "
            "(the one passed to tie_guard), after accelerator.prepare.")
    return replica.eval()
