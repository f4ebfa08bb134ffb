"""Streaming merge: a PEFT adapter merged into a sharded safetensors checkpoint one tensor at a time.

For checkpoints larger than memory. The base's shards (``model.safetensors``, or ``model-0000x-of-0000y.safetensors``
plus ``model.safetensors.index.json``) are read tensor by tensor with ``safetensors.safe_open`` (each file opened
for one tensor, so at most one tensor's pages are mapped); merged shards and their index are written into a
temporary sibling of OUT and renamed into place (:func:`tie_guard.atomic.atomic_directory`). Peak memory is one
chunk of ``CHUNK_ROWS`` rows per tensor (float64 while merging) plus the pages of the tensor being read, plus the
adapter's own weights, never the model.

What the adapter means is learnt from PEFT itself: the base model class is built from the config on the meta device
(no memory), its parameters are replaced by zero-byte stand-ins (``torch.zeros(()).expand(shape)``: CPU tensors with
stride 0, so PEFT creates its adapter weights on the CPU), PEFT wraps it (``PeftModel``) and loads the adapter's
weights (``set_peft_model_state_dict``), and :func:`tie_guard.effective.effective_weight` says, for every base
tensor, what the merged tensor is (``W + s·B@A``, rows replaced, a trained copy): the same arithmetic as the
in-memory merge, applied here to row chunks read from disk.

Ties are resolved as :func:`tie_guard.merge.safe_merge_and_unload` resolves them: members of a declared tie group
(transformers' ``all_tied_weights_keys`` of the shell) that end up with different values are written separately
and ``tie_word_embeddings`` is set False on every config level (``tie_policy="untie"``); a head the base checkpoint
omits because it is tied is built from the input embedding's bytes plus its delta; the input embedding's bytes are
copied unchanged; any member the saved config would no longer re-tie (:func:`tie_guard.tie_config.ties_on_reload`)
gets its own copy.

Supported: LoRA (and AdaLoRA) on ``nn.Linear`` / ``nn.Embedding``, ``modules_to_save``, trainable tokens; anything
else is refused before any work with :class:`UnsupportedAdapterError` pointing to the in-memory ``tie-guard merge``.
Relies on transformers 5.x (``all_tied_weights_keys``, checked with 5.24), peft 0.21 (``PeftModel``,
``set_peft_model_state_dict``, ``save_embedding_layers`` keys) and safetensors' file format (8-byte header length,
JSON header, contiguous little-endian data).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .atomic import atomic_directory, check_destination, write_json_atomic
from .effective import CHUNK_ROWS, EffectiveWeight, effective_weight
from .errors import MergeVerificationError, TiedMergeError, UnsupportedAdapterError
from .groups import UnionFind

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
STREAM_REPORT_NAME = "tie_guard_stream_report.json"
#: Adapter part kinds whose merge is low-rank, row replacement or a trained copy (see tie_guard.effective).
STREAMABLE = ("lora", "adalora", "modules_to_save", "trainable_tokens")
#: Random ±1 vectors per merged matrix in the Freivalds check (a wrong row escapes each with probability ≤ 1/2).
FREIVALDS_VECTORS = 8
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
_TORCH_DTYPE = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass
class StreamReport:
    """What :func:`stream_merge` wrote and checked.

    Attributes:
        tie_policy: ``"untie"`` or ``"error"``.
        shards: output shard file names, in order.
        merged: tensors written with a change (``{"name", "read_from", "kind"}``; ``kind`` as in
            :class:`tie_guard.effective.EffectiveWeight`).
        copied: number of tensors whose bytes were copied unchanged from the base.
        omitted: tensors not written because the saved config re-ties them to an equal tensor.
        actions: what was done to ties and the config, in words.
        warnings: risks that remain, each with its fix.
        input_embeddings_bit_identical: every input embedding written is byte-identical to the base's (checked by
            reading both files back).
        freivalds: per merged low-rank tensor, ``{"vectors": k, "max_err_over_tol": x}`` (x ≤ 1 passes).
        end_to_end: ``{"max_abs_logit_diff", "logit_tolerance", "probe_shape", "decoder_layers"}`` or
            ``{"skipped": reason}``.
        verified: every check passed (``False`` only inside a :class:`MergeVerificationError`).
        seconds: wall time of ``plan``, ``write``, ``verify_tensors``, ``end_to_end``.
    """

    tie_policy: str
    shards: list[str] = field(default_factory=list)
    merged: list[dict] = field(default_factory=list)
    copied: int = 0
    omitted: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    input_embeddings_bit_identical: bool | None = None
    freivalds: dict = field(default_factory=dict)
    end_to_end: dict = field(default_factory=dict)
    verified: bool = False
    seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Out:
    """One tensor of the output: ``name`` written from the base tensor ``read_from`` (``eff=None``: bytes copied)."""

    name: str
    read_from: str
    dtype: str
    shape: list[int]
    eff: EffectiveWeight | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]


# ----------------------------------------------------------------------------------------------------------------
# Reading the base checkpoint
# ----------------------------------------------------------------------------------------------------------------


def _base_layout(base_dir: Path) -> tuple[list[str], dict[str, tuple[str, str, list[int]]], dict]:
    """``(shard names, {tensor: (shard, dtype, shape)}, safetensors metadata)`` from the headers only."""
    from safetensors import safe_open

    index = base_dir / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    elif (base_dir / SINGLE_NAME).is_file():
        shards = [SINGLE_NAME]
    else:
        raise FileNotFoundError(
            f"{base_dir} has neither {SINGLE_NAME} nor {INDEX_NAME}: the streaming merge reads safetensors "
            "checkpoints only. Fix: use the in-memory `tie-guard merge` (without --stream) for .bin or GGUF bases.")
    tensors: dict[str, tuple[str, str, list[int]]] = {}
    metadata: dict = {}
    for shard in shards:
        with safe_open(base_dir / shard, framework="pt") as f:
            metadata = metadata or dict(f.metadata() or {})
            for key in f.keys():
                sl = f.get_slice(key)
                tensors[key] = (shard, sl.get_dtype(), list(sl.get_shape()))
    metadata.setdefault("format", "pt")
    return shards, tensors, metadata


def _read_rows(path: Path, name: str, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of tensor ``name`` in its stored dtype (a 0-d or 1-d tensor is read whole)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        sl = f.get_slice(name)
        if len(sl.get_shape()) < 2:
            return f.get_tensor(name)
        return sl[start:stop]


def _row_chunks(shape: list[int], chunk_rows: int):
    rows = shape[0] if len(shape) >= 2 else 1
    for start in range(0, max(rows, 1), chunk_rows):
        yield start, min(rows, start + chunk_rows)


# ----------------------------------------------------------------------------------------------------------------
# The adapter, through PEFT, on a zero-memory shell of the base model
# ----------------------------------------------------------------------------------------------------------------


def zero_byte_shell(config) -> nn.Module:
    """The ``AutoModelForCausalLM`` class for ``config`` built on the meta device (no memory, no initialisation),
    every parameter then replaced by a CPU stand-in of the same shape and dtype that holds no memory
    (``torch.zeros(()).expand(shape)``: stride 0); parameters shared by a tie (transformers 5.x ``tie_weights`` in
    ``post_init``) stay one object. Buffers stay on meta: no forward pass may run on the shell. PEFT (0.21) creates
    its adapter layers on such a base on the CPU, where a meta base would keep them on meta.

    Raises:
        ValueError: ``config`` has no causal-LM class (transformers' own message).
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(config)
    stand_in: dict[int, nn.Parameter] = {}
    for module in shell.modules():
        for key, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in stand_in:
                    stand_in[id(p)] = nn.Parameter(torch.zeros((), dtype=p.dtype).expand(p.shape), requires_grad=False)
                module._parameters[key] = stand_in[id(p)]
    return shell.eval()


def _adapter_model(shell: nn.Module, adapter_dir: Path, base_names: set[str]):
    """``(peft_model on a zero-byte shell, skipped adapter keys)``. Keys the adapter file holds for *base* weights
    (peft 0.21 ``save_embedding_layers`` stores a targeted embedding layer's ``<module>.base_layer.weight`` beside
    its LoRA factors; a ``modules_to_save`` copy is stored as ``<module>.weight`` and is loaded) are not
    loaded: the base checkpoint's tensors are used (and checked equal to the adapter's copies in verification).

    Raises:
        FileNotFoundError: no ``adapter_config.json`` / ``adapter_model.safetensors``.
        UnsupportedAdapterError: the adapter's own weights do not all load into the PEFT model.
    """
    from peft import PeftConfig, PeftModel, set_peft_model_state_dict
    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    if not (adapter_dir / "adapter_config.json").is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"{adapter_dir} has no adapter_config.json + adapter_model.safetensors. Fix: pass the directory written "
            "by peft's save_pretrained (safetensors); for a .bin adapter use the in-memory `tie-guard merge`.")
    peft_config = PeftConfig.from_pretrained(str(adapter_dir))
    peft_config.inference_mode = True
    if getattr(peft_config, "is_prompt_learning", False) or str(peft_config.peft_type).upper().split(".")[-1] not in (
            "LORA", "ADALORA", "TRAINABLE_TOKENS"):
        _refuse(f"the adapter's tuner is {peft_config.peft_type}")
    from .quiet import known_warnings_silenced

    with known_warnings_silenced():  # PEFT's generic tied-adapter warning: tie_guard reports the tie itself
        model = PeftModel(shell, peft_config)
    state, skipped = {}, []
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():
            canonical = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
            if ".base_layer." in key and canonical in base_names:  # a tuner layer's own base weight
                skipped.append(key)
            else:
                state[key] = f.get_tensor(key)
    result = set_peft_model_state_dict(model, state)
    loaded_names = {n for n, _ in model.named_parameters()}
    missing = [k for k in result.missing_keys if k in loaded_names and not _is_base_param(k, base_names)]
    if missing or result.unexpected_keys:
        raise UnsupportedAdapterError(
            f"the adapter's weights do not match the PEFT model built from {adapter_dir}/adapter_config.json "
            f"(missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]}). Fix: pass the adapter that was "
            "trained on this base, or use the in-memory `tie-guard merge`.")
    return model.eval(), skipped


def _is_base_param(key: str, base_names: set[str]) -> bool:
    canonical = key.removeprefix("base_model.model.")
    for seg in (".base_layer", ".original_module", ".token_adapter"):
        canonical = canonical.replace(seg, "")
    return canonical in base_names


def _refuse(what: str) -> None:
    raise UnsupportedAdapterError(
        f"the streaming merge handles LoRA on nn.Linear / nn.Embedding, modules_to_save and trainable tokens only; "
        f"{what}. Fix: use the in-memory `tie-guard merge` (without --stream), which merges every tuner with an exact "
        "merge (it needs the model in memory).")


def _effective_weights(peft_model) -> dict[str, EffectiveWeight]:
    """``{canonical name: EffectiveWeight}`` for every base parameter (its ``base`` is the shell's stand-in, or an
    adapter-held tensor such as a ``modules_to_save`` copy).

    Raises:
        UnsupportedAdapterError: a part outside :data:`STREAMABLE`, or a merge that needs the full weight
            (``"dense"``: ``fan_in_fan_out``, conv LoRA, ``lora_bias``).
    """
    from .peft_layout import iter_base_parameters

    effs = {}
    for bp in iter_base_parameters(peft_model):
        for part in bp.parts:
            if part.kind not in STREAMABLE:
                _refuse(f"{bp.module_path} is adapted by {part.describe()}")
        eff = effective_weight(bp.param, bp.parts, bp.attr)
        if eff.kind == "dense":
            _refuse(f"{bp.name} ({', '.join(p.describe() for p in bp.parts)}) needs PEFT's own merge on the full "
                    "weight (fan_in_fan_out, conv LoRA or a trained bias)")
        effs[bp.name] = eff
    return effs


# ----------------------------------------------------------------------------------------------------------------
# Chunked arithmetic on disk
# ----------------------------------------------------------------------------------------------------------------


def chunk_of(eff: EffectiveWeight, base_rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Effective rows ``[start, stop)`` of ``eff`` given the base's rows ``base_rows`` ((stop-start) × cols, read
    from disk), in ``base_rows.dtype``: ``EffectiveWeight.rows`` applied to one chunk (the same float64
    accumulation and single rounding). A ``"zero"`` weight over a trained copy (``modules_to_save``) returns the
    copy's rows in the stored dtype. (Candidate to move into :mod:`tie_guard.effective` as a method.)"""
    if _is_stand_in(eff.base):
        sub = EffectiveWeight(base=base_rows, kind=eff.kind, full=eff.full)
    else:  # the change applies to an adapter-held tensor (a modules_to_save copy), not to the base's bytes
        sub = EffectiveWeight(base=eff.base.detach()[start:stop].to(base_rows.dtype), kind=eff.kind, full=eff.full)
    if eff.kind == "lowrank":
        sub.lowrank = [(u[start:stop], v) for u, v in eff.lowrank]
    elif eff.kind == "rows":
        sel = (eff.row_index >= start) & (eff.row_index < stop)
        sub.row_index, sub.row_values = eff.row_index[sel] - start, eff.row_values[sel]
    return sub.rows(0, stop - start)


def _is_stand_in(t: torch.Tensor) -> bool:
    """``t`` is a shell's zero-byte stand-in for a base tensor (stride 0 everywhere), not an adapter-held tensor
    (a ``modules_to_save`` copy is a real tensor). A 0-d parameter counts as a stand-in: 0-d base tensors are
    read from the base (no tuner here changes one)."""
    return all(s == 0 for s in t.stride())


def _changes(eff: EffectiveWeight) -> bool:
    """``eff`` differs from the base's bytes by its definition (not ``"zero"`` over the base itself)."""
    return eff.kind != "zero" or not _is_stand_in(eff.base)


def _definition(eff: EffectiveWeight, read_from: str):
    """A key equal for two members exactly when their effective tensors are the same by construction."""
    if eff.kind == "zero" and _is_stand_in(eff.base):
        return ("copy", read_from)
    terms = tuple(id(t) for pair in (eff.lowrank or []) for t in pair)
    return (eff.kind, read_from if _is_stand_in(eff.base) else id(eff.base), terms, id(eff.row_values))


def _values_equal(base_dir: Path, layout: dict, a: _Out, b: _Out, chunk_rows: int) -> bool:
    """Bit-equality of two planned output tensors, computed chunk by chunk from the base's bytes."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    for start, stop in _row_chunks(a.shape, chunk_rows):
        if not torch.equal(_bytes_view(_out_rows(base_dir, layout, a, start, stop)),
                           _bytes_view(_out_rows(base_dir, layout, b, start, stop))):
            return False
    return True


def _out_rows(base_dir: Path, layout: dict, o: _Out, start: int, stop: int) -> torch.Tensor:
    rows = _read_rows(base_dir / layout[o.read_from][0], o.read_from, start, stop)
    return rows if o.eff is None else chunk_of(o.eff, rows, start, stop)


def _chunk_bytes(o: _Out, start: int, stop: int) -> int:
    return o.nbytes * (stop - start) // max(o.shape[0], 1) if len(o.shape) >= 2 else o.nbytes


def _bytes_view(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Planning: what each output tensor is, ties resolved
# ----------------------------------------------------------------------------------------------------------------


def _plan(base_dir: Path, layout: dict, peft_model, tie_policy: str, report: StreamReport,
          chunk_rows: int) -> tuple[list[_Out], bool]:
    """``(output tensors, untie)``: every base tensor (and every tied member the base omits but the merge must
    write), with its source and change; ``untie`` says the config's tie flags must be set False."""
    from .tie_config import declared_ties

    effs = _effective_weights(peft_model)
    declared = declared_ties(peft_model)
    unknown = [n for n in layout if n not in effs]
    if unknown:
        raise ValueError(f"the base checkpoint holds tensors the model class built from its config.json does not "
                         f"have ({', '.join(unknown[:3])}). Fix: pass the checkpoint directory whose config matches.")

    def stored(name: str) -> str:
        seen = name
        while seen not in layout and seen in declared:
            seen = declared[seen]
        if seen not in layout:
            raise ValueError(f"{name} is not in the base checkpoint and is not tied to a tensor that is. Fix: pass a "
                             "complete checkpoint (every shard listed in the index).")
        return seen

    def out(name: str) -> _Out:
        src = stored(name)
        eff = effs[name]
        return _Out(name, src, layout[src][1], layout[src][2], eff if _changes(eff) else None)

    uf = UnionFind()
    for t, s in declared.items():
        if t in effs and s in effs:
            uf.union(t, s)
    groups = [sorted(c, key=lambda n: (n in declared, n)) for c in uf.components() if len(c) > 1]
    in_group = {n for g in groups for n in g}
    plan = {n: out(n) for n in layout if n not in in_group}
    untie = False
    classes_of: dict[str, tuple[int, int]] = {}
    for gi, g in enumerate(groups):
        members = [out(n) for n in g]
        classes: list[list[_Out]] = []
        for m in members:  # partition by value: same definition, else compared chunk by chunk
            for c in classes:
                if (_definition(effs[c[0].name], c[0].read_from) == _definition(effs[m.name], m.read_from)
                        or _values_equal(base_dir, layout, c[0], m, chunk_rows)):
                    c.append(m)
                    break
            else:
                classes.append([m])
        for i, c in enumerate(classes):
            for m in c:
                classes_of[m.name] = (gi, i)
        if len(classes) > 1:
            if tie_policy == "error":
                raise TiedMergeError(
                    f"tie_policy='error': the merge gives the tied {', '.join(g)} different values. Fix: use "
                    "tie_policy='untie' (preserves the input embeddings).")
            if tie_policy != "untie":
                _refuse(f"tie_policy={tie_policy!r} is not streamed")
            untie = True
            both_stored = all(n in layout for n in g)
            report.actions.append(
                f"config declares {', '.join(g)} tied but the checkpoint holds different values; wrote each"
                if both_stored and not any(m.eff is not None for m in members)
                else f"untied {', '.join(m.name for m in members if m.name in declared)} from {g[0]}")
        for m in members:
            plan[m.name] = m
    # Tie record of the checkpoint once saved: members the reload re-ties to an equal tensor are omitted.
    reload_ties = _reload_ties(peft_model, untie, report)
    order = []
    for name in list(layout) + [n for n in plan if n not in layout]:
        o = plan[name]
        src = reload_ties.get(name)
        if src is not None and src in plan and classes_of.get(name) == classes_of.get(src) and name in classes_of:
            report.omitted.append(name)
            continue
        if name not in layout:
            report.actions.append(f"{name}: not in the base checkpoint (tied to {o.read_from}); written "
                                  + ("from its bytes plus the adapter's change" if o.eff is not None
                                     else "as a byte copy of it (the saved config does not re-tie it)"))
        order.append(o)
    return order, untie


def _reload_ties(peft_model, untie: bool, report: StreamReport) -> dict[str, str]:
    """``{target: source}`` that ``from_pretrained`` will tie for the config written (flags set False first when
    ``untie``): :func:`tie_config.ties_on_reload` on the shell."""
    from .tie_config import set_tie_flags, ties_on_reload

    shell = peft_model.get_base_model()
    if untie:
        flags = set_tie_flags(shell.config, False)
        report.actions.append(f"set {', '.join(flags) or 'no tie flag'} = False")
    return ties_on_reload(shell)


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


class _ShardWriter:
    """Writes one safetensors file whose header (names, dtypes, shapes, offsets) is known before the data, so
    that each tensor's bytes can be appended chunk by chunk (safetensors' own ``save_file`` needs every tensor of
    the file in memory at once)."""

    def __init__(self, path: Path, tensors: list[_Out], metadata: dict):
        header, offset = {}, 0
        for t in tensors:
            header[t.name] = {"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self.file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.file.write(len(raw).to_bytes(8, "little") + raw)
        self.expected = offset
        self.written = 0

    def write(self, t: torch.Tensor) -> None:
        data = _bytes_view(t).numpy()
        self.file.write(memoryview(data))
        self.written += data.nbytes

    def close(self, complete: bool = True) -> None:
        """Close the file; with ``complete`` first check that every byte the header promises was written and
        fsync (an interrupted shard is simply closed: its directory is removed by ``atomic_directory``)."""
        try:
            if complete:
                if self.written != self.expected:
                    raise OSError(f"wrote {self.written} bytes into {self.file.name}, expected {self.expected}")
                self.file.flush()
                os.fsync(self.file.fileno())
        finally:
            self.file.close()


def _shard_names(shards: list[str]) -> list[str]:
    return shards if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                            for i in range(len(shards))]


def _write(base_dir: Path, tmp: Path, layout: dict, shards: list[str], metadata: dict, plan: list[_Out],
           chunk_rows: int, bar, on_tensor_written=None) -> dict[str, str]:
    """Write the output shards (each output tensor goes to the shard of the base tensor it is read from);
    returns the weight map."""
    names = _shard_names(shards)
    weight_map: dict[str, str] = {}
    for shard, out_name in zip(shards, names):
        tensors = [o for o in plan if layout[o.read_from][0] == shard]
        if not tensors:
            continue
        writer = _ShardWriter(tmp / out_name, tensors, metadata)
        task = bar.add(f"write {out_name}", sum(o.nbytes for o in tensors))
        try:
            for o in tensors:
                for start, stop in _row_chunks(o.shape, chunk_rows):
                    rows = _out_rows(base_dir, layout, o, start, stop)
                    if o.eff is not None and not bool(torch.isfinite(rows).all()):
                        raise MergeVerificationError(
                            f"the merged {o.name} contains NaN/Inf (rows {start}–{stop}): the adapter is broken. Fix: "
                            "retrain or restore the adapter from an earlier checkpoint; nothing was written.")
                    writer.write(rows)
                    bar.advance(task, _chunk_bytes(o, start, stop))
                weight_map[o.name] = out_name
                if on_tensor_written is not None:
                    on_tensor_written(o.name)
        except BaseException:
            writer.close(complete=False)
            raise
        writer.close()
    return weight_map


# ----------------------------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------------------------


def _verify_tensors(base_dir: Path, tmp: Path, layout: dict, plan: list[_Out], weight_map: dict[str, str],
                    adapter_dir: Path, skipped: list[str], input_embeddings: set[str], report: StreamReport,
                    chunk_rows: int, bar) -> list[str]:
    """Read the written shards back with ``safe_open`` (the reader transformers uses) and check every tensor:

    * names, dtypes and shapes as planned;
    * each copied tensor byte-identical to the base tensor it was copied from;
    * each low-rank merge by Freivalds' check: for ``k`` random ±1 vectors ``v`` (cols × k), row by row,
      ``|W'·v − (W·v + U·(V·v))| ≤ (u + 64·cols·2⁻⁵³) · (|W'|·|v| + |W|·|v| + |U|·(|V|·|v|))`` computed in float64,
      with ``u`` the unit roundoff of the stored dtype (``W'`` is ``W + U·V`` rounded once to that dtype: its
      error per element is at most ``u·|W'|``). A row that is wrong by more than the rounding passes one vector
      with probability ≤ 1/2 and all ``k`` with probability ≤ 2⁻ᵏ (k = :data:`FREIVALDS_VECTORS`);
    * row replacements (trainable tokens) and trained copies (``modules_to_save``) exactly;
    * the adapter's own copies of base weights (``save_embedding_layers``) equal to the base's.

    Returns the failures in words.
    """
    from safetensors import safe_open

    failures = []
    with contextlib.ExitStack() as stack:
        files = {s: stack.enter_context(safe_open(tmp / s, framework="pt")) for s in sorted(set(weight_map.values()))}
        for o in plan:
            sl = files[weight_map[o.name]].get_slice(o.name)
            if sl.get_dtype() != o.dtype or list(sl.get_shape()) != o.shape:
                failures.append(f"{o.name}: written as {sl.get_dtype()} {sl.get_shape()}, expected {o.dtype} {o.shape}")
    task = bar.add("verify tensors", sum(o.nbytes for o in plan))
    gen = torch.Generator().manual_seed(0)
    identical = True
    for o in plan:
        worst = 0.0
        vs = None
        for start, stop in _row_chunks(o.shape, chunk_rows):
            got = _read_rows(tmp / weight_map[o.name], o.name, start, stop)
            base = _read_rows(base_dir / layout[o.read_from][0], o.read_from, start, stop)
            if o.eff is None or o.eff.kind != "lowrank" or not _is_stand_in(o.eff.base):
                want = base if o.eff is None else chunk_of(o.eff, base, start, stop)
                if not torch.equal(_bytes_view(got), _bytes_view(want)):
                    failures.append(f"{o.name} (rows {start}–{stop}) differs from "
                                    + (f"the base's {o.read_from} bytes" if o.eff is None else "its expected value"))
                    identical &= o.name not in input_embeddings
                    break
            else:
                if vs is None:
                    vs = (torch.randint(0, 2, (o.shape[1], FREIVALDS_VECTORS), generator=gen) * 2 - 1).double()
                worst = max(worst, _freivalds_excess(got, base, o.eff, start, stop, vs))
            bar.advance(task, _chunk_bytes(o, start, stop))
        if vs is not None:
            report.freivalds[o.name] = {"vectors": FREIVALDS_VECTORS, "max_err_over_tol": worst}
            if not worst <= 1.0:
                failures.append(f"{o.name}: W'·v differs from W·v + s·B·(A·v) by {worst:.3g} × the rounding bound")
    # An input embedding the adapter does not train is planned as a byte copy; the loop above checked its bytes.
    report.input_embeddings_bit_identical = identical and all(
        o.eff is None or o.eff.kind != "zero" for o in plan if o.name in input_embeddings)
    failures += _check_adapter_copies(base_dir, layout, adapter_dir, skipped, chunk_rows)
    return failures


def _freivalds_excess(got: torch.Tensor, base: torch.Tensor, eff: EffectiveWeight, start: int, stop: int,
                      vs: torch.Tensor) -> float:
    """max over rows of |W'·v − (W·v + U·(V·v))| / bound (see :func:`_verify_tensors`) for one chunk."""
    w1, w0 = got.double(), base.double()
    absv = vs.abs()
    lhs = w1 @ vs
    rhs = w0 @ vs
    scale = w1.abs() @ absv + w0.abs() @ absv
    for u, v in eff.lowrank:
        uu, vv = u[start:stop].double(), v.double()
        rhs += uu @ (vv @ vs)
        scale += uu.abs() @ (vv.abs() @ absv)
    unit = torch.finfo(got.dtype).eps / 2 if got.is_floating_point() else 0.0
    bound = (unit + 64 * got.shape[1] * 2.0 ** -53) * scale + 1e-300
    excess = ((lhs - rhs).abs() / bound)
    return float(torch.nan_to_num(excess, nan=float("inf")).max()) if excess.numel() else 0.0


def _check_adapter_copies(base_dir: Path, layout: dict, adapter_dir: Path, skipped: list[str],
                          chunk_rows: int) -> list[str]:
    """The adapter file's copies of base weights (not loaded: the base's are used) must equal the base's."""
    failures = []
    weights = adapter_dir / "adapter_model.safetensors"
    for key in skipped:
        name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        src = name if name in layout else None
        if src is None:
            continue
        shape = layout[src][2]
        for start, stop in _row_chunks(shape, chunk_rows):
            a = _read_rows(weights, key, start, stop)
            b = _read_rows(base_dir / layout[src][0], src, start, stop)
            if a.shape != b.shape or not torch.equal(a.to(b.dtype), b):
                failures.append(
                    f"the adapter carries its own {name} (peft save_embedding_layers) that differs from the base "
                    "checkpoint's: it was trained on another base (or after resizing the embeddings). Fix: pass the "
                    "base it was trained on, or use the in-memory `tie-guard merge`, which loads the adapter's copy.")
                break
    return failures


def _end_to_end(base_dir: Path, adapter_dir: Path, out_dir: Path, probe_shape: tuple[int, int],
                layers: int | None) -> dict:
    """Logits of the merged checkpoint (``from_pretrained`` of the written files) vs the adapter model (base +
    adapter through PEFT's forward) on a seeded random probe, within :func:`tie_guard.probe.logit_tolerance`.

    With ``layers=k`` both are built with only their first ``k`` decoder layers (``num_hidden_layers`` and
    ``layer_types`` of the text config cut to ``k``; ``from_pretrained`` then reads only those layers' tensors, the
    embeddings, the final norm and the head), so the check holds the embedding, the head and ``k`` layers, not the
    model. (accelerate's disk offload is not used: peft 0.21 re-dispatches an offloaded base with its own device
    map and fails to find the transformers 5.24 offloaded ``base_layer`` weights: ``KeyError`` in
    ``OffloadedWeightsLoader``.)"""
    from transformers import AutoConfig, AutoModelForCausalLM

    def load(path: Path):
        config = AutoConfig.from_pretrained(path)
        if layers is not None:
            text = config.get_text_config()
            text.num_hidden_layers = min(layers, text.num_hidden_layers)
            if isinstance(getattr(text, "layer_types", None), list):
                text.layer_types = text.layer_types[: text.num_hidden_layers]
        return AutoModelForCausalLM.from_pretrained(path, config=config, dtype="auto").eval()

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a cut model's load report lists every skipped layer tensor
    try:
        return _compare_logits(load, base_dir, adapter_dir, out_dir, probe_shape, layers)
    finally:
        hf_logging.set_verbosity(verbosity)


def _compare_logits(load, base_dir: Path, adapter_dir: Path, out_dir: Path, probe_shape, layers) -> dict:
    from .loading import load_adapter
    from .probe import logit_tolerance, make_probe_ids, max_abs_diff, probe_logits

    merged = load(out_dir)
    probe = make_probe_ids(merged.config.get_text_config().vocab_size, *probe_shape)
    merged_logits = probe_logits(merged, probe)
    dtype = next(merged.parameters()).dtype
    del merged
    adapter_model = load_adapter(load(base_dir), str(adapter_dir))
    adapter_logits = probe_logits(adapter_model, probe)
    del adapter_model
    return {"max_abs_logit_diff": max_abs_diff(merged_logits, adapter_logits),
            "logit_tolerance": logit_tolerance(dtype, float(adapter_logits.abs().max())),
            "probe_shape": list(probe.shape), "decoder_layers": layers or "all"}


# ----------------------------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------------------------


class _Bar:
    """One rich progress bar per shard (bytes), on standard error; silent when ``enabled`` is False."""

    def __init__(self, enabled: bool):
        self.prog = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

            self.prog = Progress(TextColumn("{task.description:<40}"), BarColumn(), DownloadColumn(),
                                 TimeElapsedColumn(), console=Console(stderr=True))

    def __enter__(self):
        if self.prog is not None:
            self.prog.start()
        return self

    def __exit__(self, *exc):
        if self.prog is not None:
            self.prog.stop()

    def add(self, description: str, total: int):
        return self.prog.add_task(description, total=total) if self.prog is not None else None

    def advance(self, task, amount: int) -> None:
        if self.prog is not None:
            self.prog.advance(task, amount)


# ----------------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------------


def stream_merge(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out: str | os.PathLike,
                 tie_policy: str = "untie", *, overwrite: bool = False, progress: bool = False,
                 chunk_rows: int = CHUNK_ROWS, end_to_end: bool = True, end_to_end_layers: int | None = None,
                 probe_shape: tuple[int, int] = (1, 16),
                 on_tensor_written: Callable[[str], None] | None = None) -> StreamReport:
    """Merge the PEFT adapter in ``adapter_dir`` into the safetensors checkpoint ``base_dir`` and write the merged
    checkpoint to ``out``, one tensor chunk at a time (see the module docstring for the design and ties).

    Output: the base's non-weight files (tokenizer, generation config, ...) copied, then the adapter directory's
    tokenizer files (a tokenizer saved with the adapter wins, as in ``tie-guard merge``); ``config.json`` with the
    tie flags the merge needs; shards named like the base's (``model.safetensors`` or ``model-0000i-of-0000n``)
    plus ``model.safetensors.index.json``; ``tie_guard_stream_report.json``.

    Verification (before OUT appears): every written tensor read back and checked against the base plus the
    adapter's change (:func:`_verify_tensors`: bytes for copies, Freivalds for low-rank merges, exact for rows and
    trained copies); together they prove the files hold the merged weights, i.e. the model ``from_pretrained``
    builds from OUT is the in-memory merge's model, as long as its class computes with those tensors. That last
    part (forward overrides, re-ties on load, a tensor the class ignores) is what ``end_to_end`` checks: logits of
    OUT loaded by ``from_pretrained`` vs the base + adapter model on a ``probe_shape`` probe, both whole, or with
    only their first ``end_to_end_layers`` decoder layers (then the check holds the embedding, the head and those
    layers: about two of the largest tensors, not the model; the other layers are proven by the per-tensor checks).
    Pass ``end_to_end=False`` only when not even that fits; the report then says so.

    Args:
        tie_policy: ``"untie"`` (default) or ``"error"`` (``"keep_tied"`` is in-memory only).
        overwrite: replace an existing ``out`` (atomically, after verification).
        progress: rich progress bars (per shard) on standard error.
        chunk_rows: rows per chunk (memory: ``chunk_rows × cols`` float64 per merged tensor).
        on_tensor_written: called with each output tensor's name after it is written (tests use it to fail
            mid-merge).
    Returns:
        The :class:`StreamReport` (also written to OUT).
    Raises:
        FileNotFoundError: no safetensors weights in ``base_dir``, or no safetensors adapter.
        FileExistsError: ``out`` exists and ``overwrite`` is False.
        UnsupportedAdapterError: an adapter part the streaming merge does not handle (names the tuner).
        TiedMergeError: ``tie_policy="error"`` and the merge changes a tie.
        MergeVerificationError: a check failed; nothing is written (``.report`` holds the numbers).
        OSError: writing failed (no space); nothing is left behind.
    """
    from transformers import AutoConfig

    from .merge import restore_use_cache

    base_dir, adapter_dir, out = Path(base_dir), Path(adapter_dir), Path(out)
    if tie_policy not in ("untie", "error"):
        _refuse(f"tie_policy={tie_policy!r} is not streamed (only 'untie' and 'error')")
    check_destination(out, overwrite)
    report = StreamReport(tie_policy=tie_policy)
    t0 = time.perf_counter()
    shards, layout, metadata = _base_layout(base_dir)
    shell = zero_byte_shell(AutoConfig.from_pretrained(base_dir))
    emb = shell.get_input_embeddings()
    inputs = {f"{n}.weight" for n, m in shell.named_modules() if m is emb}
    names = set(dict(shell.named_parameters(remove_duplicate=False)))
    peft_model, skipped = _adapter_model(shell, adapter_dir, set(layout) | names)
    plan, _ = _plan(base_dir, layout, peft_model, tie_policy, report, chunk_rows)
    merged_config = peft_model.get_base_model().config
    restore_use_cache(merged_config, report)
    report.merged = [{"name": o.name, "read_from": o.read_from, "kind": o.eff.kind} for o in plan if o.eff is not None]
    report.copied = sum(o.eff is None for o in plan)
    report.seconds["plan"] = time.perf_counter() - t0
    with _Bar(progress) as bar, atomic_directory(out, overwrite=overwrite) as tmp:
        _copy_side_files(base_dir, adapter_dir, tmp)
        merged_config.save_pretrained(tmp)
        t1 = time.perf_counter()
        weight_map = _write(base_dir, tmp, layout, shards, metadata, plan, chunk_rows, bar, on_tensor_written)
        report.shards = sorted(set(weight_map.values()))
        if len(shards) > 1:
            write_json_atomic(tmp / INDEX_NAME, {"metadata": {"total_size": sum(o.nbytes for o in plan)},
                                                 "weight_map": dict(sorted(weight_map.items()))})
        report.seconds["write"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        failures = _verify_tensors(base_dir, tmp, layout, plan, weight_map, adapter_dir, skipped, inputs, report,
                                   chunk_rows, bar)
        report.seconds["verify_tensors"] = time.perf_counter() - t2
        if not failures and end_to_end:
            t3 = time.perf_counter()
            report.end_to_end = _end_to_end(base_dir, adapter_dir, tmp, probe_shape, end_to_end_layers)
            e2e = report.end_to_end
            if not e2e["max_abs_logit_diff"] <= e2e["logit_tolerance"]:
                failures.append(f"logits of the merged checkpoint differ from the adapter model's by "
                                f"{e2e['max_abs_logit_diff']:.3g} (tolerance {e2e['logit_tolerance']:.3g})")
            report.seconds["end_to_end"] = time.perf_counter() - t3
        elif not end_to_end:
            report.end_to_end = {"skipped": "end_to_end=False: the model was not loaded; the per-tensor checks "
                                            "prove the files, not the model class's forward"}
        if failures:
            raise MergeVerificationError("Streaming merge verification failed: " + "; ".join(failures)
                                         + ". Nothing was written. Fix: report this with exception.report attached.",
                                         report)
        report.verified = True
        write_json_atomic(tmp / STREAM_REPORT_NAME, report.to_dict())
    return report


def _copy_side_files(base_dir: Path, adapter_dir: Path, tmp: Path) -> None:
    """The base's files other than weights and config (tokenizer, generation config, ...), then the adapter's
    tokenizer files over them."""
    skip = {INDEX_NAME, SINGLE_NAME, "config.json", STREAM_REPORT_NAME}
    for f in base_dir.iterdir():
        if f.is_file() and f.name not in skip and not (f.name.startswith("model-") and f.suffix == ".safetensors") \
                and f.suffix not in (".bin", ".safetensors", ".pt", ".gguf"):
            shutil.copy2(f, tmp / f.name)
    for f in adapter_dir.iterdir():
        if f.is_file() and (f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "vocab.json",
                                                                        "merges.txt", "chat_template.jinja")):
            shutil.copy2(f, tmp / f.name)
