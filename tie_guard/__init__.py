"""tie_guard: keep tied input/output embeddings right through LoRA fine-tuning, merging and saving."""

from .accelerate_loop import guard_accelerator
from .callback import TieGuardCallback
from .config import TieGuardConfig
from .errors import (
    MergeVerificationError,
    TieBrokenError,
    TiedMergeError,
    TieGuardError,
    UnsupportedAdapterError,
)
from .groups import TieGroup, TieMember, find_tied_groups
from .guard import TieGuard
from .merge import EmbeddingCheck, MergeReport, safe_merge_and_unload
from .watch import CheckResult, TieWatcher

__version__ = "0.1.0"

__all__ = [
    "CheckResult",
    "EmbeddingCheck",
    "MergeReport",
    "MergeVerificationError",
    "TieBrokenError",
    "TieGroup",
    "TieGuard",
    "TieGuardCallback",
    "TieGuardConfig",
    "TieGuardError",
    "TieMember",
    "TieWatcher",
    "TiedMergeError",
    "UnsupportedAdapterError",
    "find_tied_groups",
    "guard_accelerator",
    "safe_merge_and_unload",
]
