"""Library warnings that tie_guard already reports better, silenced inside tie_guard's own calls only.

Each entry: (category, start of the message, why tie_guard's own report replaces it). Checked with peft 0.21.2 and
transformers 5.24. Warnings raised in the user's own calls (``get_peft_model`` in a training script) are left alone.
"""

from __future__ import annotations

import contextlib
import warnings

KNOWN = (
    (UserWarning, "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter",
     "PEFT's tied-adapter warning: tie_guard names the tie group, what touches it and the fix at capture, and its "
     "merge is the fix"),
    (UserWarning, "Already unmerged",
     "PEFT's note when an adapter was never merged: tie_guard never merges the user's adapter model in place"),
    (FutureWarning, "`is_gradient_checkpointing` is deprecated",
     "transformers 5 deprecation triggered inside peft's loading code, not by tie_guard or the user"),
)


@contextlib.contextmanager
def known_warnings_silenced():
    """Ignore the :data:`KNOWN` warnings in the block; every other warning passes through."""
    with warnings.catch_warnings():
        for category, start, _why in KNOWN:
            warnings.filterwarnings("ignore", message=r"\s*" + _escape(start), category=category)
        yield


def _escape(text: str) -> str:
    import re

    return re.escape(text)
