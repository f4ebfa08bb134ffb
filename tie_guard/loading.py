"""Load what the CLI is pointed at: a packaged model name, a local checkpoint, a GGUF file or a hub id, plus an
optional PEFT adapter directory. Everything is opened read-only; nothing is written next to the inputs."""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "auto"):
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[name]


def load_model(source: str, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """``(model, tokenizer_or_None)`` from a packaged model name, a checkpoint directory, a ``.gguf`` file or a
    hub id (hub ids need network access, which this library never assumes).

    Raises:
        FileNotFoundError: a path that does not exist, a file that is not a checkpoint directory, or a name that is
            neither a packaged model nor reachable on the hub (each message lists the accepted forms).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .packaged import PACKAGED_MODELS, load_gguf, resolve_model_path

    forms = ("Fix: pass a checkpoint directory (with config.json), a .gguf file, a packaged model name "
             f"({', '.join(sorted(PACKAGED_MODELS))}) or a hub id (needs network access).")
    if source.endswith(".gguf"):
        if not Path(source).is_file():
            raise FileNotFoundError(f"GGUF file {source} not found. {forms}")
        return load_gguf(source, dtype or torch.float32)
    local = Path(source).expanduser()
    if source not in PACKAGED_MODELS and (source.startswith((".", "/", "~")) or local.exists()):
        if not local.exists():
            raise FileNotFoundError(f"{source} does not exist. {forms}")
        if not local.is_dir() or not (local / "config.json").is_file():
            raise FileNotFoundError(f"{source} is not a model checkpoint directory (no config.json). {forms}")
    path = resolve_model_path(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", trust_remote_code=trust_remote_code)
    except OSError as exc:
        if path != source or local.exists():
            raise
        raise FileNotFoundError(f"{source!r} is not a packaged model, a local path, or a hub id reachable from here "
                                f"({type(exc).__name__}). {forms}") from exc
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, AttributeError):
        # no tokenizer files: transformers 5.x raises OSError/ValueError, 4.57 an AttributeError
        tok = None
    return model.eval(), tok


def load_adapter(model, adapter_dir: str):
    """Wrap ``model`` with the PEFT adapter stored in ``adapter_dir`` (inference mode; files only read).

    Raises:
        FileNotFoundError: ``adapter_dir`` has no ``adapter_config.json``.
    """
    import pickle

    from peft import PeftModel
    from safetensors import SafetensorError

    fix = ("Fix: pass the directory written by peft's save_pretrained / trainer.save_model (it holds "
           "adapter_config.json and adapter_model.safetensors).")
    if not Path(adapter_dir).exists():
        raise FileNotFoundError(f"adapter directory {adapter_dir} does not exist. {fix}")
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json). {fix}")
    # PEFT (0.21) reads adapter_model.safetensors, or adapter_model.bin with torch.load(weights_only=True):
    # no pickled code is ever executed.
    try:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=False).eval()
    except (SafetensorError, pickle.UnpicklingError, EOFError) as exc:
        raise ValueError(f"cannot read the adapter weights in {adapter_dir} ({type(exc).__name__}: {exc}). The file is "
                         "truncated, corrupt, or a pickle holding more than tensors (refused: only weights are "
                         "loaded). Fix: re-save the adapter with save_pretrained (safetensors).") from exc
    except RuntimeError as exc:
        if "size mismatch" in str(exc) or "shape" in str(exc):
            raise ValueError(f"adapter {adapter_dir} does not match this base model: {str(exc)[:600]}. Fix: use the "
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
