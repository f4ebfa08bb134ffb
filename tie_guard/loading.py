"""Load what the CLI is pointed at: a packaged model name, a local checkpoint, a GGUF file or a hub id, plus an
optional PEFT adapter directory. Everything is opened read-only; nothing is written next to the inputs."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


def parse_dtype(name: str | None):
    """``torch.float32`` etc. for ``"float32"``..., ``None`` for ``"auto"`` / ``None``.

    Raises:
        ValueError: an unknown name.
    """
    if name in (None, "auto"):
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)} or 'auto'")
    import torch

    return getattr(torch, name)


def check_source(source: str, local_only: bool = False) -> None:
    """Fail fast, before anything heavy is imported or loaded, on a model argument that cannot be loaded here: a
    missing path or GGUF file, a file that is not a checkpoint directory, or (offline, ``HF_HUB_OFFLINE=1``) a name
    that is neither a packaged model nor in the local hub cache. With ``local_only`` only a checkpoint directory
    passes.

    Raises:
        FileNotFoundError: naming the accepted forms and the closest packaged name.
    """
    from .packaged import PACKAGED_MODELS

    forms = ("Fix: pass a checkpoint directory (with config.json), a .gguf file, a packaged model name "
             f"({', '.join(sorted(PACKAGED_MODELS))}) or a hub id (with --online; needs network access).")
    if local_only:
        forms = "Fix: pass the merged checkpoint directory (with config.json); it is never looked up by name."
    close = difflib.get_close_matches(source, PACKAGED_MODELS, n=1, cutoff=0.6)
    if close and source not in PACKAGED_MODELS and not local_only:
        forms = f"Did you mean {close[0]!r}? " + forms
    local = Path(source).expanduser()
    if source.endswith(".gguf") and not local_only:
        if not local.is_file():
            raise FileNotFoundError(f"GGUF file {source} not found. {forms}")
        return
    if local_only or (source not in PACKAGED_MODELS and (source.startswith((".", "/", "~")) or source.endswith(("/", os.sep))
                                                    or local.exists())):
        if not local.exists():
            raise FileNotFoundError(f"{source} does not exist. {forms}")
        if not local.is_dir() or not (local / "config.json").is_file():
            raise FileNotFoundError(f"{source} is not a model checkpoint directory (no config.json). {forms}")
        return
    if source in PACKAGED_MODELS or os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes"):
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(source, "config.json")
    except ValueError:  # not even a valid repo id
        cached = None
    if not isinstance(cached, str):
        raise FileNotFoundError(f"{source!r} is not a packaged model, a local path, or a hub id in the local cache "
                                f"(offline). {forms}")


def load_model(source: str, dtype=None, trust_remote_code: bool = False, local_only: bool = False):
    """``(model, tokenizer_or_None)`` from a packaged model name, a checkpoint directory, a ``.gguf`` file or a
    hub id (hub ids need network access, which this library never assumes; the CLI sets ``HF_HUB_OFFLINE=1``
    unless given ``--online``, so an unknown name fails at once: :func:`check_source`). With ``local_only`` only a
    checkpoint directory is accepted (a merged checkpoint is never looked up by name).

    Args:
        dtype: a ``torch.dtype`` or ``None`` (the checkpoint's own).
    Raises:
        FileNotFoundError: see :func:`check_source`; also a hub id that cannot be fetched.
    """
    check_source(source, local_only)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .packaged import load_gguf, resolve_model_path

    if source.endswith(".gguf"):
        return load_gguf(source, dtype or torch.float32)
    local = Path(source).expanduser()
    path = resolve_model_path(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", trust_remote_code=trust_remote_code)
    except OSError as exc:
        if path != source or local.exists():
            raise
        raise FileNotFoundError(f"{source!r} is not a packaged model, a local path, or a hub id reachable from here "
                                f"({type(exc).__name__}: {exc}).") from exc
    try:  # a checkpoint without tokenizer files: transformers 5 raises OSError/ValueError, 4.57 AttributeError or
        # (GPT-2's tokenizer class) TypeError
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, AttributeError, TypeError):
        # no tokenizer files: transformers 5.x raises OSError/ValueError, 4.57 an AttributeError
        tok = None
    return model.eval(), tok


def check_adapter_dir(adapter_dir: str) -> None:
    """Raise ``FileNotFoundError`` (naming the fix) unless ``adapter_dir`` is a PEFT adapter directory (has
    ``adapter_config.json``). Imports nothing heavy: the CLI calls it before loading anything."""
    fix = ("Fix: pass the directory written by peft's save_pretrained / trainer.save_model (it holds "
           "adapter_config.json and adapter_model.safetensors).")
    if not Path(adapter_dir).exists():
        raise FileNotFoundError(f"adapter directory {adapter_dir} does not exist. {fix}")
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json). {fix}")


def load_adapter(model, adapter_dir: str):
    """Wrap ``model`` with the PEFT adapter stored in ``adapter_dir`` (inference mode; files only read).

    Raises:
        FileNotFoundError: ``adapter_dir`` has no ``adapter_config.json``.
    """
    import pickle

    from peft import PeftModel
    from safetensors import SafetensorError

    from .quiet import known_warnings_silenced

    check_adapter_dir(adapter_dir)
    # PEFT (0.21) reads adapter_model.safetensors, or adapter_model.bin with torch.load(weights_only=True):
    # no pickled code is ever executed.
    try:
        with known_warnings_silenced():
            return PeftModel.from_pretrained(model, adapter_dir, is_trainable=False).eval()
    except (SafetensorError, pickle.UnpicklingError, EOFError) as exc:
        raise ValueError(f"cannot read the adapter weights in {adapter_dir} ({type(exc).__name__}: {exc}). The file is "
                         "truncated, corrupt, or a pickle holding more than tensors (refused: only weights are "
                         "loaded). Fix: re-save the adapter with save_pretrained (safetensors).") from exc
    except RuntimeError as exc:
        if "size mismatch" in str(exc) or "shape" in str(exc):
            mismatches = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
            raise ValueError(f"adapter {adapter_dir} does not match this base model: "
                             f"{'; '.join(mismatches[:3]) or str(exc).splitlines()[0]}"
                             f"{f' (+{len(mismatches) - 3} more)' if len(mismatches) > 3 else ''}. Fix: use the "
                             "base the adapter was trained on (same architecture and vocabulary size; resize the "
                             "embeddings first if the adapter was trained after adding tokens).") from exc
        raise


def load_tokenizer(*dirs: str):
    """The first tokenizer found in ``dirs`` (adapter dirs often carry the tokenizer with added tokens)."""
    from transformers import AutoTokenizer

    for d in dirs:
        if d and Path(d).is_dir() and any((Path(d) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            return AutoTokenizer.from_pretrained(d)
    return None
