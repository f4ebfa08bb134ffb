"""See a model through PEFT's wrappers: canonical parameter names and the adapter parts touching each module.

PEFT (checked with 0.21) wraps a targeted module in place:

* LoRA (and every ``BaseTunerLayer``): ``lm_head`` → ``lm_head.base_layer`` + ``lm_head.lora_A.<adapter>`` ...
* ``modules_to_save``: ``ModulesToSaveWrapper`` with ``original_module`` and a trained copy in
  ``modules_to_save.<adapter>``;
* ``trainable_token_indices``: ``TrainableTokensWrapper`` → ``token_adapter`` (a ``TrainableTokensLayer``) whose
  ``base_layer`` is the original module;
* a standalone ``TrainableTokensConfig`` (PEFT's ``TrainableTokensModel``): the ``TrainableTokensLayer`` itself
  replaces the module (no wrapper), with ``base_layer`` the original module; on a tied model the tied output
  embedding gets its own ``TrainableTokensLayer`` sharing the input side's deltas (``tied_adapter``).

The canonical name of a base parameter is its name in the base model's own state dict (no ``base_model.model.``
prefix, no ``base_layer`` / ``original_module`` / ``token_adapter`` segments), e.g. ``lm_head.weight``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

try:  # PEFT is a hard dependency, but keep the import failure readable.
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper, TrainableTokensWrapper
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError("tie_guard needs peft>=0.21: pip install 'peft>=0.21'") from exc


@dataclass
class AdapterPart:
    """One PEFT construct that changes what a base module computes.

    Attributes:
        kind: ``"lora"``, ``"dora"``, ``"lora_variant"`` (another LoRA variant), ``"adalora"`` (AdaLoRA's
            ``SVDLinear``: a ``LoraLayer`` subclass with another delta), ``"modules_to_save"``,
            ``"trainable_tokens"`` (wrapper is a ``TrainableTokensWrapper`` or a standalone ``TrainableTokensLayer``), or the lower-cased class name of another PEFT tuner layer (e.g. ``"ia3"``).
        adapter_names: the adapters of this wrapper that the model currently uses (PEFT's ``active_adapters``).
        wrapper: the PEFT module object (``lora.Linear``, ``ModulesToSaveWrapper``, ...).
        module_path: canonical path of the wrapped module, e.g. ``"lm_head"``.
    """

    kind: str
    adapter_names: tuple[str, ...]
    wrapper: nn.Module
    module_path: str

    def describe(self) -> str:
        """Short human label, e.g. ``"lora[default]"``."""
        return f"{self.kind}[{','.join(self.adapter_names)}]"


@dataclass
class BaseParameter:
    """A parameter of the base model as seen through PEFT wrappers.

    Attributes:
        name: canonical name (``"lm_head.weight"``).
        module_path: canonical path of the module that owns it (``"lm_head"``).
        real_module_path: path of that module in the wrapped model (``"lm_head.base_layer"``), resolvable with
            ``model.get_submodule``.
        attr: attribute name inside the module (``"weight"``).
        module: the (unwrapped) base module that owns the parameter.
        param: the parameter object.
        parts: the adapter parts that wrap this module, outermost first (empty when nothing touches it).
    """

    name: str
    module_path: str
    real_module_path: str
    attr: str
    module: nn.Module
    param: torch.Tensor
    parts: list[AdapterPart] = field(default_factory=list)


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers model inside ``model`` (itself when it is not a ``PeftModel``).

    For a ``PeftModel`` this is ``peft_model.get_base_model()``: the transformers model that holds the PEFT layers.
    """
    if isinstance(model, PeftModel):
        return model.get_base_model()
    return model


def is_peft_wrapper(module: nn.Module) -> bool:
    """True for PEFT's layer wrappers (``BaseTunerLayer`` and ``AuxiliaryTrainingWrapper`` subclasses)."""
    return isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper))


def _part_kind(layer: nn.Module, adapter_names: tuple[str, ...]) -> str:
    from peft.tuners.adalora import AdaLoraLayer
    from peft.tuners.lora import LoraLayer

    if isinstance(layer, AdaLoraLayer):  # subclasses LoraLayer, but its delta is B @ (A * E) / ranknum
        return "adalora"
    if isinstance(layer, LoraLayer):
        variants = getattr(layer, "lora_variant", {}) or {}
        if any(name in variants for name in adapter_names):
            use_dora = getattr(layer, "use_dora", {}) or {}
            return "dora" if any(use_dora.get(name, False) for name in adapter_names) else "lora_variant"
        return "lora"
    # Other tuners: their package name under peft.tuners (peft.tuners.ia3.layer.Linear -> "ia3").
    parts = type(layer).__module__.split(".")
    if "tuners" in parts and parts.index("tuners") + 1 < len(parts):
        return parts[parts.index("tuners") + 1]
    return type(layer).__name__.lower()


def _adapters_present(layer: nn.Module) -> tuple[str, ...]:
    active = tuple(getattr(layer, "active_adapters", ()) or ())
    return active


def unwrap(module: nn.Module, real_path: str, canonical_path: str) -> tuple[nn.Module, str, list[AdapterPart]]:
    """Peel PEFT wrappers off ``module``.

    Returns:
        ``(base_module, real_path_of_base_module, parts)`` with parts outermost first.
    """
    parts: list[AdapterPart] = []
    while True:
        if isinstance(module, TrainableTokensWrapper):
            names = _adapters_present(module.token_adapter)
            parts.append(AdapterPart("trainable_tokens", names, module, canonical_path))
            module, real_path = module.token_adapter.base_layer, _join(real_path, "token_adapter.base_layer")
        elif isinstance(module, TrainableTokensLayer):  # standalone TrainableTokensConfig: no wrapper around it
            parts.append(AdapterPart("trainable_tokens", _adapters_present(module), module, canonical_path))
            module, real_path = module.base_layer, _join(real_path, "base_layer")
        elif isinstance(module, ModulesToSaveWrapper):
            names = tuple(n for n in _adapters_present(module) if n in module.modules_to_save)
            parts.append(AdapterPart("modules_to_save", names, module, canonical_path))
            module, real_path = module.original_module, _join(real_path, "original_module")
        elif isinstance(module, BaseTunerLayer) and isinstance(getattr(module, "base_layer", None), nn.Module):
            names = _adapters_present(module)
            parts.append(AdapterPart(_part_kind(module, names), names, module, canonical_path))
            module, real_path = module.base_layer, _join(real_path, "base_layer")
        else:
            return module, real_path, parts


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def iter_base_parameters(model: nn.Module) -> Iterator[BaseParameter]:
    """Every base-model parameter of ``model`` (a transformers model or a ``PeftModel``) under its canonical name.

    Adapter-owned tensors (LoRA factors, ``modules_to_save`` copies, trainable-token deltas) are not yielded; they
    are reachable through ``BaseParameter.parts``. A parameter registered under several names (tied weights) is
    yielded once per name.
    """
    root = base_model_of(model)
    yield from _walk(root, "", "", set())


def _walk(module: nn.Module, canonical: str, real: str, on_path: set[int]) -> Iterator[BaseParameter]:
    base, real_base, parts = unwrap(module, real, canonical)
    if id(base) in on_path:  # defensive: module cycles
        return
    on_path = on_path | {id(base)}
    for attr, param in base._parameters.items():
        if param is None:
            continue
        yield BaseParameter(
            name=_join(canonical, attr),
            module_path=canonical,
            real_module_path=real_base,
            attr=attr,
            module=base,
            param=param,
            parts=list(parts),
        )
    for child_name, child in base._modules.items():
        if child is None:
            continue
        yield from _walk(child, _join(canonical, child_name), _join(real_base, child_name), on_path)


def find_module_parts(model: nn.Module) -> dict[str, list[AdapterPart]]:
    """Canonical module path → adapter parts wrapping it, for every wrapped module of ``model``."""
    out: dict[str, list[AdapterPart]] = {}
    for bp in iter_base_parameters(model):
        if bp.parts and bp.module_path not in out:
            out[bp.module_path] = bp.parts
    return out


def unwrapped_module(module: nn.Module | None) -> nn.Module | None:
    """``module`` with PEFT wrappers peeled off (``None`` stays ``None``)."""
    if module is None:
        return None
    return unwrap(module, "", "")[0]
