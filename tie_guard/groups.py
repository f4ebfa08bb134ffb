"""Tie-group discovery: which parameters share one storage, and which transformers declares tied."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from .peft_layout import BaseParameter, base_model_of, iter_base_parameters, unwrapped_module
from .tie_config import declared_ties, tie_flags

Role = Literal["input_embedding", "output_embedding", "other"]
TieStatus = Literal["tied", "declared_not_tied", "tied_not_declared"]


@dataclass(frozen=True)
class TieMember:
    """One parameter of a tie group.

    Attributes:
        name: canonical name in the base model's state dict, e.g. ``"lm_head.weight"``.
        role: ``"input_embedding"`` (an ``nn.Embedding`` weight or the model's input embeddings),
            ``"output_embedding"`` (the model's output embeddings, usually ``lm_head``) or ``"other"``.
        touched_by: adapter parts that change what this module computes with the active adapters, e.g.
            ``("lora[default]",)``; empty when nothing does (a wrapper holding only inactive adapters counts as
            nothing).
        requires_grad: whether the base parameter itself is trained.
        dtype: e.g. ``"torch.float32"``.
        shape: e.g. ``(49152, 576)`` (vocab × hidden for embeddings).
    """

    name: str
    role: Role
    touched_by: tuple[str, ...]
    requires_grad: bool
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TieGroup:
    """A set of parameters that share one storage and/or that transformers declares tied.

    Attributes:
        members: the members, input embeddings first.
        status: ``"tied"`` (shared storage and declared), ``"declared_not_tied"`` (config / ``_tied_weights_keys``
            say tied, the tensors are separate: a reload may drop or re-tie one of them), or
            ``"tied_not_declared"`` (shared storage the config does not know about: ``save_pretrained`` will refuse
            or drop data).
        nbytes: bytes of one copy of the shared tensor (largest member), e.g. vocab × hidden × 4 for fp32.
        config_flags: ``tie_word_embeddings`` at each config level, e.g. ``{"config.tie_word_embeddings": True}``.
    """

    members: tuple[TieMember, ...]
    status: TieStatus
    nbytes: int
    config_flags: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def physical(self) -> bool:
        """True when every member shares one storage."""
        return self.status in ("tied", "tied_not_declared")

    @property
    def declared(self) -> bool:
        """True when transformers' tie record covers the group."""
        return self.status in ("tied", "declared_not_tied")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.members)

    @property
    def input_members(self) -> tuple[TieMember, ...]:
        return tuple(m for m in self.members if m.role == "input_embedding")

    @property
    def output_members(self) -> tuple[TieMember, ...]:
        return tuple(m for m in self.members if m.role == "output_embedding")

    @property
    def touched(self) -> bool:
        """True when any adapter part touches any member (a plain PEFT merge would write into the group)."""
        return any(m.touched_by for m in self.members)

    @property
    def label(self) -> str:
        """Short stable name: the first output member's module path (``"lm_head"``), else the first member's."""
        first = (self.output_members or self.members)[0].name
        return first.rsplit(".", 1)[0] if "." in first else first

    def as_rows(self) -> list[dict]:
        """One dict per member, for tables (W&B, CLI, JSON)."""
        return [
            {
                "group": self.label,
                "status": self.status,
                "member": m.name,
                "role": m.role,
                "touched_by": ",".join(m.touched_by) or "-",
                "requires_grad": m.requires_grad,
                "dtype": m.dtype,
                "shape": "x".join(str(s) for s in m.shape),
            }
            for m in self.members
        ]


def _storage_key(t: torch.Tensor):
    """Key identifying ``t``'s storage, or ``None`` where pointers mean nothing (meta tensors, DTensors)."""
    if t.device.type == "meta" or type(t).__name__ == "DTensor" or hasattr(t, "ds_id"):
        return None
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return (t.device.type, t.device.index, ptr) if ptr else None


def storage_identity(t: torch.Tensor) -> tuple:
    """A hashable key equal for tensors that share storage: the storage pointer where it means something, else
    the tensor object itself (meta tensors, FSDP2 DTensors, ZeRO-3 partitioned parameters)."""
    key = _storage_key(t)
    return key if key is not None else ("object", id(t))


class UnionFind:
    """Disjoint sets of names (path halving); the smaller name becomes a set's representative."""

    def __init__(self):
        self.parent: dict[str, str] = {}

    def add(self, x: str):
        self.parent.setdefault(x, x)

    def find(self, x: str) -> str:
        self.add(x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def components(self) -> list[list[str]]:
        comps: dict[str, list[str]] = {}
        for x in self.parent:
            comps.setdefault(self.find(x), []).append(x)
        return list(comps.values())


def physical_components(params: dict[str, torch.Tensor]) -> list[list[str]]:
    """Partition canonical names by storage: same parameter object, or same storage pointer on one device.

    Args:
        params: canonical name → tensor.
    Returns:
        Components with two or more names, each sorted.
    """
    uf = UnionFind()
    by_id: dict[int, str] = {}
    by_ptr: dict[tuple, str] = {}
    for name, p in params.items():
        uf.add(name)
        if id(p) in by_id:
            uf.union(name, by_id[id(p)])
        else:
            by_id[id(p)] = name
        key = _storage_key(p)
        if key is not None:
            if key in by_ptr:
                uf.union(name, by_ptr[key])
            else:
                by_ptr[key] = name
    return [sorted(c) for c in uf.components() if len(c) > 1]


def embedding_roles(model: nn.Module, base_params: list[BaseParameter]) -> dict[str, Role]:
    """Canonical parameter name → role, from ``get_input_embeddings`` / ``get_output_embeddings`` of the model and
    of every nested transformers submodel, plus every ``nn.Embedding``."""
    from .tie_config import iter_pretrained_submodels

    root = base_model_of(model)
    inputs: set[int] = set()
    outputs: set[int] = set()
    for _, sub in iter_pretrained_submodels(root):
        for getter, bucket in (("get_input_embeddings", inputs), ("get_output_embeddings", outputs)):
            try:
                mod = getattr(sub, getter)()
            except (NotImplementedError, AttributeError, TypeError):
                mod = None
            mod = unwrapped_module(mod)
            if mod is not None:
                bucket.add(id(mod))
    roles: dict[str, Role] = {}
    for bp in base_params:
        if bp.attr != "weight":
            roles[bp.name] = "other"
        elif id(bp.module) in outputs:
            roles[bp.name] = "output_embedding"
        elif id(bp.module) in inputs or isinstance(bp.module, nn.Embedding):
            roles[bp.name] = "input_embedding"
        else:
            roles[bp.name] = "other"
    return roles


_ROLE_ORDER = {"input_embedding": 0, "output_embedding": 1, "other": 2}


def find_tied_groups(model: nn.Module) -> list[TieGroup]:
    """Find the tied-weight groups of a transformers model or a ``PeftModel``.

    A group is found physically: parameters sharing one Python object or one storage (by
    ``untyped_storage().data_ptr()`` on the same device) are one group, whatever their names. Ties that
    transformers declares (``all_tied_weights_keys`` of every ``PreTrainedModel`` inside, transformers ≥ 5) but that
    are not physical are reported too, with ``status="declared_not_tied"``; physical ties transformers does not
    declare get ``status="tied_not_declared"``.

    Names are canonical (the base model's state-dict names: PEFT's ``base_model.model.`` prefix and
    ``base_layer`` / ``original_module`` / ``token_adapter`` segments stripped).

    Args:
        model: a ``transformers.PreTrainedModel`` or a ``peft.PeftModel`` around one. Not modified.
    Returns:
        The groups (possibly empty, e.g. for an untied Llama), ordered by their first member's name.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"find_tied_groups expects a loaded model (torch.nn.Module), got {type(model).__name__}. "
                        "Fix: load it first, e.g. AutoModelForCausalLM.from_pretrained(name_or_path).")
    base_params = list(iter_base_parameters(model))
    by_name = {bp.name: bp for bp in base_params}
    tensors = {bp.name: bp.param for bp in base_params}
    roles = embedding_roles(model, base_params)

    physical = physical_components(tensors)
    uf = UnionFind()
    for comp in physical:
        for n in comp[1:]:
            uf.union(comp[0], n)
    declared = {t: s for t, s in declared_ties(model).items() if t in by_name and s in by_name}
    dec_uf = UnionFind()
    for t, s in declared.items():
        uf.union(t, s)
        dec_uf.union(t, s)
    phys_uf = UnionFind()
    for comp in physical:
        for n in comp[1:]:
            phys_uf.union(comp[0], n)

    flags = tie_flags(base_model_of(model).config) if hasattr(base_model_of(model), "config") else {}
    groups = []
    for comp in uf.components():
        if len(comp) < 2:
            continue
        is_physical = len({phys_uf.find(n) for n in comp}) == 1
        is_declared = len({dec_uf.find(n) for n in comp}) == 1 and any(n in declared for n in comp)
        if is_physical and is_declared:
            status: TieStatus = "tied"
        elif is_physical:
            status = "tied_not_declared"
        else:
            status = "declared_not_tied"
        members = []
        for n in sorted(comp, key=lambda n: (_ROLE_ORDER[roles[n]], n)):
            bp = by_name[n]
            members.append(
                TieMember(
                    name=n,
                    role=roles[n],
                    touched_by=tuple(p.describe() for p in bp.parts if p.adapter_names),
                    requires_grad=bool(bp.param.requires_grad),
                    dtype=str(bp.param.dtype),
                    # ZeRO-3 empties param.data and keeps the real shape in ds_shape (DTensor.shape is global)
                    shape=tuple(getattr(bp.param, "ds_shape", bp.param.shape)),
                )
            )
        nbytes = max(getattr(by_name[n].param, "ds_numel", by_name[n].param.numel()) * by_name[n].param.element_size()
                     for n in comp)
        groups.append(TieGroup(members=tuple(members), status=status, nbytes=nbytes, config_flags=flags))
    return sorted(groups, key=lambda g: g.members[0].name)
