"""What transformers believes is tied, and how to make it believe the truth.

Relies on transformers 5.x (checked with 5.24):

* ``PreTrainedModel._tied_weights_keys`` is a ``{target: source}`` dict; after ``post_init`` every
  ``PreTrainedModel`` instance carries ``all_tied_weights_keys`` (expanded, for that submodel), which
  ``save_pretrained`` uses to drop tied targets and ``tie_weights(recompute_mapping=False)`` uses to re-tie.
* ``get_expanded_tied_weights_keys`` returns ``{}`` when the model's ``config.tie_word_embeddings`` is False, so
  ``tie_weights()`` (called by ``resize_token_embeddings``, ``from_pretrained`` and accelerate's FSDP2 prepare)
  re-reads that flag. The flag may live on the outer config, a nested ``text_config`` / ``decoder`` config, or both.
"""

from __future__ import annotations

from typing import Iterator

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

TIE_FLAG = "tie_word_embeddings"


def iter_configs(config: PretrainedConfig, path: str = "config") -> Iterator[tuple[str, PretrainedConfig]]:
    """Yield ``(path, config)`` for ``config`` and every nested ``PretrainedConfig`` (``text_config``, ...)."""
    seen: set[int] = set()
    stack = [(path, config)]
    while stack:
        p, cfg = stack.pop()
        if id(cfg) in seen:
            continue
        seen.add(id(cfg))
        yield p, cfg
        for key, value in vars(cfg).items():
            if isinstance(value, PretrainedConfig):
                stack.append((f"{p}.{key}", value))


def tie_flags(config: PretrainedConfig) -> dict[str, bool]:
    """``{"config.tie_word_embeddings": True, "config.text_config.tie_word_embeddings": ...}`` for every level
    that carries the flag explicitly (attribute present in the config object)."""
    out: dict[str, bool] = {}
    for p, cfg in iter_configs(config):
        if TIE_FLAG in vars(cfg) or hasattr(type(cfg), TIE_FLAG):
            value = getattr(cfg, TIE_FLAG, None)
            if value is not None:
                out[f"{p}.{TIE_FLAG}"] = bool(value)
    return out


def set_tie_flags(config: PretrainedConfig, value: bool) -> list[str]:
    """Set ``tie_word_embeddings`` to ``value`` on every config level that carries it. Returns the paths set."""
    changed = []
    for p, cfg in iter_configs(config):
        if TIE_FLAG in vars(cfg) or hasattr(type(cfg), TIE_FLAG):
            setattr(cfg, TIE_FLAG, value)
            changed.append(f"{p}.{TIE_FLAG}")
    return changed


def iter_pretrained_submodels(model: nn.Module) -> Iterator[tuple[str, PreTrainedModel]]:
    """``(prefix, submodel)`` for ``model`` and every nested ``PreTrainedModel`` (prefix ``""`` for the root)."""
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            yield name, module


def declared_ties(model: nn.Module) -> dict[str, str]:
    """What transformers believes is tied now: ``{target: source}`` canonical names over the whole model.

    Reads ``all_tied_weights_keys`` of every ``PreTrainedModel`` in ``model`` (the runtime record, transformers
    ≥ 5.0); a PEFT model's base model is used when given a ``PeftModel``.
    """
    from .peft_layout import base_model_of

    root = base_model_of(model)
    out: dict[str, str] = {}
    for prefix, sub in iter_pretrained_submodels(root):
        keys = getattr(sub, "all_tied_weights_keys", None) or {}
        for target, source in keys.items():
            t = f"{prefix}.{target}" if prefix else target
            s = f"{prefix}.{source}" if prefix else source
            out.setdefault(t, s)
    return out


def forget_ties(model: nn.Module, targets: set[str]) -> list[str]:
    """Remove the canonical ``targets`` from every ``all_tied_weights_keys`` record in ``model`` so that
    ``save_pretrained`` keeps them and ``tie_weights(recompute_mapping=False)`` leaves them alone.

    Returns the canonical target names removed.
    """
    removed = []
    for prefix, sub in iter_pretrained_submodels(model):
        keys = getattr(sub, "all_tied_weights_keys", None)
        if not keys:
            continue
        for target in list(keys):
            full = f"{prefix}.{target}" if prefix else target
            if full in targets:
                keys.pop(target)
                removed.append(full)
    return removed


def ties_on_reload(model: PreTrainedModel) -> dict[str, str]:
    """What ``from_pretrained`` will tie when a checkpoint saved from ``model`` is loaded into ``type(model)``:
    ``{target: source}`` canonical names.

    The config goes through the same ``to_dict`` → ``from_dict`` round trip as ``save_pretrained`` /
    ``from_pretrained`` (so a config class that forces the tie flag in ``__init__``, like ``T5Config``, says what
    the saved file will say), and an empty shell of the model is built from it on the meta device (no memory, no
    initialisation); its tie record is read with :func:`declared_ties`. transformers 5.x (checked with 5.24)
    computes that record in ``post_init`` from each submodel's ``config.tie_word_embeddings``, and
    ``from_pretrained`` ties exactly those pairs (skipping, with a warning, a pair whose two tensors are both in the
    checkpoint and differ, since 5.4).

    Falls back to the model's own current record (``declared_ties(model)``) when the shell cannot be built
    (a class whose ``__init__`` needs more than its config).
    """
    import torch

    config = model.config
    reloaded = type(config).from_dict(config.to_dict())
    try:
        with torch.device("meta"):
            shell = type(model)(reloaded)
    except Exception:  # noqa: BLE001 - any failure to build the shell: use what the model itself records
        return declared_ties(model)
    return declared_ties(shell)
