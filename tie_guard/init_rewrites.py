"""LoRA initialisations that rewrite the base weight, and what that does to a tied matrix.

Some LoRA initialisations of peft 0.21 replace ``base_layer.weight`` inside ``get_peft_model`` (checked in
``peft/tuners/lora/layer.py`` and ``variants.py`` of 0.21.2):

* ``init_lora_weights="pissa"`` / ``"pissa_niter_N"``, ``"olora"``, ``"corda"``, ``"lora_ga"``: the base keeps the
  residual ``W_res = W − s·B0·A0`` (``s`` the LoRA scaling, ``B0``/``A0`` the initial factors), so the adapter
  model computes ``W`` at step 0;
* ``init_lora_weights="loftq"``: the base becomes a quantised-dequantised ``W`` (lossy);
* ``kasa_config=KasaConfig(...)`` (KaSA): the base is truncated to rank ``min(out, in) − r`` (lossy).

On ``lm_head`` of a model whose head is tied to the input embedding that base weight IS the input embedding: every
row of the input embedding changes before training starts, and PEFT itself warns only about ties in general.
Loading such an adapter with ``PeftModel.from_pretrained`` repeats the rewrite on the freshly loaded base (it is
deterministic), so the adapter model is the trained model, but the pretrained embedding is gone from memory.

It can be brought back exactly only from the original weight (the pretrained model loaded again, or its input
embedding). For the ``W − s·B0·A0`` family it can also be rebuilt from the initial adapter (PEFT's
``path_initial_model_for_weight_conversion``: the adapter saved right after ``get_peft_model``) as
``W_res + s·B0·A0``, exact up to the rounding of that one product; LoftQ and KaSA discard information and cannot.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .groups import TieGroup
from .peft_layout import BaseParameter, base_model_of, iter_base_parameters

#: Inits whose base rewrite is ``W − s·B0·A0``: the initial adapter holds what is needed to undo it.
RESIDUAL_INITS = ("pissa", "olora", "corda", "lora_ga")

FIX = ("Fix: untie before get_peft_model (give the head its own Parameter, e.g. "
       "model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone()), and set tie_word_embeddings="
       "False on every config level), or use a plain init (init_lora_weights=True/False/'gaussian', no kasa_config) "
       "for the tied module.")


@dataclass
class InitRewrite:
    """One tied base weight rewritten by a LoRA initialisation.

    Attributes:
        adapter: adapter name, e.g. ``"default"``.
        init: ``"pissa"``, ``"pissa_niter_4"``, ``"olora"``, ``"corda"``, ``"lora_ga"``, ``"loftq"`` or ``"kasa"``.
        module: canonical path of the LoRA-wrapped module whose base weight was rewritten, e.g. ``"lm_head"``.
        group: label of its tie group.
        members: every member of that (physically tied) group.
        input_members: the input embeddings among them: all rewritten with it.
        restored: how the merge brought back the pretrained input embedding: ``"original"`` (bit-exact, from the
            original weight), ``"initial_adapter"`` (``W_res + s·B0·A0``, exact up to rounding), or ``None``.
        rows_changed / max_abs_change: rewritten vs pretrained input embedding (``None`` when the pretrained value
            is unknown).
        restore_logit_shift: max |Δlogit| of the merged model after the restore vs the adapter model (the adapter
            was trained on the rewritten embedding, so restoring moves the logits by this much).
        note: why nothing was restored, in words.
    """

    adapter: str
    init: str
    module: str
    group: str
    members: tuple[str, ...]
    input_members: tuple[str, ...]
    restored: str | None = None
    rows_changed: int | None = None
    max_abs_change: float | None = None
    restore_logit_shift: float | None = None
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def rewriting_init(config) -> str | None:
    """The base-rewriting initialisation a ``LoraConfig`` (peft 0.21) asks for, or ``None``.

    Returns ``"kasa"`` when ``kasa_config`` is set, else ``init_lora_weights`` when it is one of ``pissa*``,
    ``olora``, ``corda``, ``lora_ga``, ``loftq``. Plain inits (``True``, ``False``, ``"gaussian"``, ``"eva"``,
    ``"orthogonal"``, ``"mica"``) leave the base weight alone and give ``None``. Other PEFT configs give ``None``.
    """
    if getattr(config, "kasa_config", None) is not None:
        return "kasa"
    init = getattr(config, "init_lora_weights", None)
    if isinstance(init, str) and (init.lower().startswith("pissa") or init.lower() in ("olora", "corda", "lora_ga",
                                                                                       "loftq")):
        return init
    return None


def _rewrites_module(wrapper: nn.Module, init: str) -> bool:
    """Whether ``init`` rewrites this LoRA layer's base weight: ``lora.Embedding`` rewrites only for LoftQ (peft 0.21:
    it has no PiSSA/OLoRA/CorDA path, falls back to a plain init for LoRA-GA and refuses KaSA)."""
    from peft.tuners.lora import Embedding

    return init == "loftq" if isinstance(wrapper, Embedding) else True


def _peft_configs(model: nn.Module) -> dict:
    cfg = getattr(model, "peft_config", None) or getattr(base_model_of(model), "peft_config", None)
    return cfg if isinstance(cfg, dict) else {}


def find_init_rewrites(model: nn.Module, groups: list[TieGroup],
                       by_name: dict[str, BaseParameter] | None = None) -> list[InitRewrite]:
    """Members of physically tied groups whose base weight a LoRA init of ``model`` has rewritten.

    Detected from the PEFT configs (``model.peft_config[name]``) of every adapter present on a LoRA layer wrapping a
    member (active or not: the rewrite happened when the adapter was added), since the original weight is gone by
    then. Cost: no tensor is read.

    Args:
        model: a ``PeftModel`` (or a model carrying ``peft_config``); only read.
        groups: its tie groups (:func:`tie_guard.groups.find_tied_groups`).
        by_name: canonical name → :class:`BaseParameter` (computed when omitted).
    """
    from peft.tuners.lora import LoraLayer

    configs = _peft_configs(model)
    if not configs:
        return []
    by_name = by_name or {bp.name: bp for bp in iter_base_parameters(model)}
    out = []
    for g in groups:
        if not g.physical:
            continue
        for m in g.members:
            bp = by_name.get(m.name)
            for part in bp.parts if bp is not None else ():
                if not isinstance(part.wrapper, LoraLayer):
                    continue
                present = list(part.wrapper.lora_A.keys()) + list(part.wrapper.lora_embedding_A.keys())
                for adapter in dict.fromkeys(present):
                    init = rewriting_init(configs.get(adapter))
                    if init and _rewrites_module(part.wrapper, init):
                        out.append(InitRewrite(adapter, init, part.module_path, g.label, g.names,
                                               tuple(x.name for x in g.input_members)))
    return out


def init_rewrite_warnings(model: nn.Module, groups: list[TieGroup],
                          by_name: dict[str, BaseParameter]) -> list[tuple[str, str]]:
    """``(level, message)`` setup warnings (level ``"error"``) for :func:`find_init_rewrites`, each with the fix."""
    return [("error", _message(r)) for r in find_init_rewrites(model, groups, by_name)]


def _message(r: InitRewrite) -> str:
    kind = "kasa_config (KaSA)" if r.init == "kasa" else f"init_lora_weights={r.init!r}"
    return (f"adapter {r.adapter!r} uses {kind} on {r.module}, which is tied ({', '.join(r.members)}): PEFT "
            f"rewrote the shared matrix inside get_peft_model, so the input embeddings "
            f"({', '.join(r.input_members) or 'none'}) already differ from the pretrained model in every row, "
            f"before any training step. {FIX}")


# ----------------------------------------------------------------------------------------------------------------
# At merge time
# ----------------------------------------------------------------------------------------------------------------


def _original_tensors(original_base) -> dict[str, torch.Tensor]:
    if original_base is None:
        return {}
    if isinstance(original_base, nn.Module):
        return {bp.name: bp.param for bp in iter_base_parameters(original_base)}
    return dict(original_base)


def _initial_factors(initial_adapter, adapter: str, module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(B0, A0)`` of ``module`` from a saved initial adapter directory (PEFT layout: ``<dir>`` for
    ``"default"``, ``<dir>/<adapter>`` otherwise) or a state dict with PEFT's saved key names."""
    if initial_adapter is None:
        return None
    if isinstance(initial_adapter, (str, Path)):
        from safetensors.torch import load_file

        d = Path(initial_adapter)
        f = (d if adapter == "default" or not (d / adapter).is_dir() else d / adapter) / "adapter_model.safetensors"
        if not f.is_file():
            raise FileNotFoundError(f"initial adapter {f} not found. Fix: pass the directory written by "
                                    "peft_model.save_pretrained(...) right after get_peft_model.")
        sd = load_file(str(f))
    else:
        sd = dict(initial_adapter)
    found = {}
    for key, t in sd.items():
        for fac in ("lora_A", "lora_B"):
            if key.endswith(f"{module}.{fac}.weight") and (key == f"{module}.{fac}.weight"
                                                           or key.endswith(f".{module}.{fac}.weight")):
                found[fac] = t
    return (found["lora_B"], found["lora_A"]) if len(found) == 2 else None


def resolve_init_rewrites(peft_model, merged: nn.Module, groups: list[TieGroup], base_params: list[BaseParameter],
                          adapter_names: list[str], probe: torch.Tensor, adapter_run, report,
                          original_base=None, initial_adapter=None) -> torch.Tensor | None:
    """Record (and, where possible, undo) init rewrites of tied weights in a merged model.

    Fills ``report.base_rewritten_by_init`` (one :meth:`InitRewrite.to_dict` per rewrite) and a ``report.warnings``
    entry naming the init, the group and the fix. With ``tie_policy="untie"`` and the pretrained value known, the
    input members of the rewritten group in ``merged`` (a separate Parameter from the head after the untie) are set
    to it, and ``report.input_embeddings`` is re-checked against the pretrained value.

    Args:
        peft_model: the adapter model (only read).
        merged: the merged model from :func:`tie_guard.merge.safe_merge_and_unload`; its input-embedding
            Parameters may be replaced (never written in place).
        groups / base_params: the adapter model's tie groups and base parameters.
        adapter_names: adapters being merged.
        probe: (batch, seq) token ids; adapter_run: the adapter model's :class:`tie_guard.probe.ProbeRun` on it.
        report: the :class:`tie_guard.merge.MergeReport` being filled.
        original_base: the unmodified pretrained model, or ``{canonical name: tensor}`` of its input embeddings
            (vocab × hidden); bit-exact restore.
        initial_adapter: the adapter saved right after ``get_peft_model`` (directory or state dict); restore as
            ``W_res + s·B0·A0`` for PiSSA/OLoRA/CorDA/LoRA-GA (exact up to rounding).
    Returns:
        the merged model's :class:`~tie_guard.probe.ProbeRun` on ``probe`` when an embedding was restored (its
        logits changed), else ``None``.
    Raises:
        ValueError: ``original_base`` holds an input embedding of another shape or dtype.
        FileNotFoundError: ``initial_adapter`` is a directory without ``adapter_model.safetensors``.
    """
    from .merge import _embedding_check, _input_embedding_names
    from .probe import ProbeRun

    rewrites = [r for r in find_init_rewrites(peft_model, groups, {bp.name: bp for bp in base_params})
                if r.adapter in adapter_names]
    if not rewrites:
        return None
    originals = _original_tensors(original_base)
    pre = {bp.name: bp.param for bp in base_params}
    by_name = {bp.name: bp for bp in base_params}
    trained = _input_embedding_names(groups)
    restored_any = False
    for r in rewrites:
        targets = [n for n in r.input_members if not trained.get(n)]
        head = merged.get_parameter(f"{r.module}.weight")
        value, how = None, None
        if report.tie_policy != "untie":
            r.note = f"tie_policy={report.tie_policy!r} keeps one matrix: the rewritten input embedding stays"
        elif not targets or len(targets) != len(r.input_members):
            r.note = "the adapter also trains the input embedding: the pretrained value is not restored"
        elif any(merged.get_parameter(n) is head for n in targets):
            r.note = ("the group stays one matrix after the merge (the head still equals the rewritten embedding), so the pretrained value cannot be restored without changing the head")
        elif all(n in originals for n in targets):
            value, how = originals[targets[0]], "original"
        elif r.init.lower().startswith(RESIDUAL_INITS) and (
                factors := _initial_factors(initial_adapter, r.adapter, r.module)) is not None:
            wrapper = by_name[f"{r.module}.weight"].parts[0].wrapper
            b0, a0 = factors
            delta = wrapper.scaling[r.adapter] * (b0.float() @ a0.float())
            if getattr(wrapper, "fan_in_fan_out", False):
                delta = delta.T
            cur = pre[targets[0]]
            value, how = (cur.detach().float() + delta.to(cur.device)).to(cur.dtype), "initial_adapter"
        else:
            r.note = ("the pretrained input embedding is not in memory any more and "
                      + ("this init discards information (not recoverable from the adapter)"
                         if not r.init.lower().startswith(RESIDUAL_INITS) else "no initial adapter was given")
                      + ": pass original_base= (the pretrained model loaded again, or its input embedding)"
                      + (" or initial_adapter= (the adapter saved right after get_peft_model)"
                         if r.init.lower().startswith(RESIDUAL_INITS) else "") + " to restore it")
        if value is not None:
            cur = pre[targets[0]]
            if value.shape != cur.shape or value.dtype != cur.dtype:
                raise ValueError(f"original {targets[0]} has shape {tuple(value.shape)} / {value.dtype}, the model "
                                 f"{tuple(cur.shape)} / {cur.dtype}. Fix: pass the base this adapter was created on.")
            diff = (cur.detach().float() - value.detach().float().to(cur.device)).abs().amax(dim=1)
            r.rows_changed, r.max_abs_change = int((diff > 0).sum()), float(diff.max())
            if not r.rows_changed:
                continue  # the init did not rewrite it (e.g. LoRA-GA loaded from disk falls back to a plain init)
            param = nn.Parameter(value.detach().clone().to(cur.device), requires_grad=False)
            for n in targets:
                mod_path, _, attr = n.rpartition(".")
                (merged.get_submodule(mod_path) if mod_path else merged)._parameters[attr] = param
            r.restored, restored_any = how, True
            report.actions.append(f"{r.group}: restored the pretrained {', '.join(targets)} that {r.init} had "
                                  f"rewritten ({r.rows_changed} rows, max |Δ| {r.max_abs_change:.3g}) from {how}")
        report.base_rewritten_by_init.append(r.to_dict())
    if not restored_any:
        logits = None
    else:
        logits = ProbeRun(merged, probe)
        shift = logits.max_abs_diff(adapter_run)
        # Against the pretrained value where it is known exactly; a rebuilt value stays compared with W_res.
        report.input_embeddings = [
            _embedding_check(e.name, originals[e.name], merged.get_parameter(e.name), e.trained_by_adapter)
            if e.name in originals else e for e in report.input_embeddings
        ]
        for d in report.base_rewritten_by_init:
            if d["restored"]:
                d["restore_logit_shift"] = shift
    for d in report.base_rewritten_by_init:
        report.warnings.append(_merge_warning(d))
    return logits


def _merge_warning(d: dict) -> str:
    head = (f"{d['init']} initialisation of adapter {d['adapter']!r} rewrote the tied matrix of {d['group']} "
            f"({', '.join(d['members'])}) inside get_peft_model")
    if d["restored"]:
        return (f"{head}; the merge restored the pretrained {', '.join(d['input_members'])} from {d['restored']} "
                f"({d['rows_changed']} rows had changed, max |Δ| {d['max_abs_change']:.3g}"
                + (", rebuilt as W_res + s·B0·A0: exact up to float rounding" if d["restored"] != "original" else "")
                + f"). The adapter was trained on the rewritten embedding, so the merged logits differ from the "
                f"adapter model's by {d['restore_logit_shift']:.3g}. {FIX}")
    return (f"{head}: the merged {', '.join(d['input_members'])} equal the adapter model's but NOT the pretrained "
            f"model's; {d['note']}. {FIX}")


# ----------------------------------------------------------------------------------------------------------------
# On a checkpoint: recognise a rewrite from the weights alone
# ----------------------------------------------------------------------------------------------------------------


def numerical_rank(d: torch.Tensor, rel_tol: float = 1e-3) -> int:
    """Number of singular values of the 2-D ``d`` above ``rel_tol`` of the largest (0 for a zero matrix); one
    ``svdvals`` in float32."""
    sv = torch.linalg.svdvals(d.detach().float())
    return int((sv > sv[0] * rel_tol).sum()) if sv.numel() and sv[0] > 0 else 0


def classify_rewrite(original: torch.Tensor, rewritten: torch.Tensor, rel_tol: float = 1e-3) -> str | None:
    """Name the init whose base rewrite turns ``original`` into ``rewritten`` (both vocab × hidden), or ``None``.

    With ``D = original − rewritten`` of numerical rank ``k`` (singular values above ``rel_tol`` of the largest):
    ``"pissa"`` when ``D`` is the top-``k`` SVD component of ``original`` (PiSSA, also CorDA/LoRA-GA-like
    residuals along the principal directions), ``"kasa"`` when it is the bottom-``k`` one (KaSA's truncation),
    ``"olora"`` when it is a multiple of ``Q[:, :k] @ R[:k]`` of ``original``'s QR (OLoRA; the multiple is the LoRA
    scaling), each within ``sqrt(rel_tol)`` of ``‖D‖`` relatively. Costs one SVD and one QR of ``original`` in
    float32. A plain LoRA delta written into the matrix is low-rank too but lies along none of these directions.
    Not recognised (pass the adapter instead, whose config names the init): ``pissa_niter_N`` (its randomised SVD is
    far from the exact top-``k`` component on flat spectra: 0.5–1.2 of ‖D‖ measured on a tiny random Llama), LoftQ,
    and a checkpoint made by PEFT's plain ``merge_and_unload()``, whose shared matrix also holds the trained delta.
    """
    a, b = original.detach().float(), rewritten.detach().float().to(original.device)
    if a.shape != b.shape or a.dim() != 2:
        return None
    d = a - b
    dn = torch.linalg.matrix_norm(d)
    if not torch.isfinite(dn) or dn == 0:
        return None
    k = numerical_rank(d, rel_tol)
    if k >= min(d.shape):
        return None
    tol = rel_tol ** 0.5
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    for name, sl in (("pissa", slice(0, k)), ("kasa", slice(len(s) - k, len(s)))):
        if torch.linalg.matrix_norm(d - (u[:, sl] * s[sl]) @ vh[sl]) <= tol * dn:
            return name
    q, r = torch.linalg.qr(a)
    m = q[:, :k] @ r[:k]
    scale = (d * m).sum() / (m * m).sum()
    if torch.linalg.matrix_norm(d - scale * m) <= tol * dn:
        return "olora"
    return None
