"""tie_guard: keep tied input/output embeddings right through LoRA fine-tuning, merging and saving.

The public names are imported on first use (PEP 562), so ``import tie_guard`` and ``tie-guard --help`` do not
import torch, transformers or peft.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: public name → submodule that defines it
_EXPORTS = {
    "guard_accelerator": "accelerate_loop",
    "TieGuardCallback": "callback",
    "TieGuardConfig": "config",
    "MergeVerificationError": "errors",
    "TieBrokenError": "errors",
    "TiedMergeError": "errors",
    "TieGuardError": "errors",
    "UnsupportedAdapterError": "errors",
    "TieGroup": "groups",
    "TieMember": "groups",
    "find_tied_groups": "groups",
    "TieGuard": "guard",
    "EmbeddingCheck": "merge",
    "MergeReport": "merge",
    "safe_merge_and_unload": "merge",
    "CheckResult": "watch",
    "TieWatcher": "watch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tie_guard' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs
    from .accelerate_loop import guard_accelerator  # noqa: F401
    from .callback import TieGuardCallback  # noqa: F401
    from .config import TieGuardConfig  # noqa: F401
    from .errors import (  # noqa: F401
        MergeVerificationError,
        TieBrokenError,
        TiedMergeError,
        TieGuardError,
        UnsupportedAdapterError,
    )
    from .groups import TieGroup, TieMember, find_tied_groups  # noqa: F401
    from .guard import TieGuard  # noqa: F401
    from .merge import EmbeddingCheck, MergeReport, safe_merge_and_unload  # noqa: F401
    from .watch import CheckResult, TieWatcher  # noqa: F401
