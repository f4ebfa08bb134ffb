"""Shallow copies of ``nn.Module`` objects: a new module object whose parameter, buffer and child tables are its
own dicts, holding the very same tensors and child modules. Used to build a merged model that shares every
untouched tensor with the base model, and to run a module's own ``forward`` on row slices of its weights."""

from __future__ import annotations

import copy

from torch import nn


def shallow_module_copy(m: nn.Module) -> nn.Module:
    """A copy of ``m`` (same class, same attribute values) whose ``_parameters``, ``_buffers`` and ``_modules``
    are new dicts over the same tensors and children, so entries can be replaced without touching ``m``.

    Instance-level method overrides bound to ``m`` (e.g. TRL 1.16's SFTTrainer patches ``model.forward`` with a
    fused LM head closed over the adapter model) are dropped: they would run the original module, so the copy uses
    its class's own methods. Hooks registered on ``m`` are shared with the copy (the hook dicts are shared).
    """
    new = copy.copy(m)
    for key, value in list(vars(m).items()):
        if getattr(value, "__self__", None) is m:
            del new.__dict__[key]
    new._parameters = dict(m._parameters)
    new._buffers = dict(m._buffers)
    new._non_persistent_buffers_set = set(m._non_persistent_buffers_set)
    new._modules = dict(m._modules)
    return new
