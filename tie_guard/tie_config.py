"""What transformers believes is tied, and how to make it believe the truth.

The one module that knows how transformers versions differ here (nothing else in tie_guard checks a version).

transformers 5.x (checked with 5.24):

* ``PreTrainedModel._tied_weights_keys`` is a ``{target: source}`` dict; after ``post_init`` every
  ``PreTrainedModel`` instance carries ``all_tied_weights_keys`` (expanded, for that submodel), which
  ``save_pretrained`` uses to drop tied targets and ``tie_weights(recompute_mapping=False)`` uses to re-tie.
* ``get_expanded_tied_weights_keys`` returns ``{}`` when the model's ``config.tie_word_embeddings`` is False, so
  ``tie_weights()`` (called by ``resize_token_embeddings``, ``from_pretrained`` and accelerate's FSDP2 prepare)
  re-reads that flag. The flag may live on the outer config, a nested ``text_config`` / ``decoder`` config, or both.
* ``from_pretrained`` skips (with a warning) a declared tie whose two tensors are both in the checkpoint and differ.

transformers 4.56–4.57 (checked with 4.57.6):

* ``_tied_weights_keys`` is a list of target patterns without sources (``["lm_head.weight"]``) and there is no
  runtime record. ``tie_weights()`` (run by ``post_init`` and ``from_pretrained``) ties, per ``PreTrainedModel``,
  ``get_output_embeddings().weight = get_input_embeddings().weight`` when
  ``config.get_text_config(decoder=True).tie_word_embeddings`` is True, the encoder to the decoder when
  ``config.tie_encoder_decoder`` is True, and whatever a module's own ``_tie_weights()`` ties (BART's encoder/decoder
  ``embed_tokens`` to ``shared``, BERT's ``decoder.bias`` to ``predictions.bias``). Every sub-config (even
  ``vision_config``) carries ``tie_word_embeddings=True``; only the text/decoder config's flag ties.
* ``from_pretrained`` re-ties whenever the flag is True, even when both tensors are in the checkpoint and differ:
  the only way to make a checkpoint never re-tie is the flag False.
* T5-style models (T5, mT5, UMT5, LongT5, SwitchTransformers, Pop2Piano, UDOP) also rescale the decoder output by
  ``d_model**-0.5`` before ``lm_head`` when the flag is True (5.x: ``scale_decoder_outputs``), so untying changes
  their logits unless the factor is folded into the head (:func:`fold_untie_side_effects`).

What tie_guard needs is answered the same on both: :func:`declared_ties` (``{target: source}``),
:func:`ties_on_reload`, :func:`forget_ties`, :func:`fold_untie_side_effects`.
"""

from __future__ import annotations

import copy
import re
from typing import Iterator

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

TIE_FLAG = "tie_word_embeddings"

#: The installed transformers major version. A checkpoint folder written by one major is not always readable by
#: the other (5.x writes ``"tokenizer_class": "TokenizersBackend"``, unknown to 4.x), so caches are kept per major.
TRANSFORMERS_MAJOR = Version(transformers.__version__).major
#: transformers ≥ 5: ties are a runtime ``{target: source}`` record (``all_tied_weights_keys``).
TIE_RECORD = TRANSFORMERS_MAJOR >= 5
#: Whether ``from_pretrained`` keeps two declared-tied tensors that are both saved and differ (5.4+), instead of
#: re-tying them (4.x: the source replaces the target).
RELOAD_KEEPS_DIFFERING_TIES = Version(transformers.__version__) >= Version("5.4")
#: transformers 4.x model types whose ``forward`` multiplies the decoder output by ``d_model**-0.5`` before the LM
#: head when ``tie_word_embeddings`` is True (their ``...ForConditionalGeneration`` classes).
_V4_RESCALED_WHEN_TIED = {"t5", "mt5", "umt5", "longt5", "switch_transformers", "pop2piano", "udop"}


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
    """``{"config.tie_word_embeddings": True, "config.text_config.tie_word_embeddings": ...}`` for every config
    level whose flag means something: on transformers 5.x every level that carries the flag explicitly (attribute
    present in the config object); on 4.x only the text/decoder config (``config.get_text_config(decoder=True)``),
    since the flag that every other sub-config carries (``vision_config``: True) ties nothing there."""
    gate = None if TIE_RECORD else _decoder_text_config(config)
    out: dict[str, bool] = {}
    for p, cfg in iter_configs(config):
        if gate is not None and cfg is not gate:
            continue
        if TIE_FLAG in vars(cfg) or hasattr(type(cfg), TIE_FLAG):
            value = getattr(cfg, TIE_FLAG, None)
            if value is not None:
                out[f"{p}.{TIE_FLAG}"] = bool(value)
    return out


def _decoder_text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The config object whose ``tie_word_embeddings`` gates the embedding tie on transformers 4.x: the one
    sub-config named ``decoder`` / ``generator`` / ``text_config``, else ``config`` itself. Same search as 4.57's
    ``config.get_text_config(decoder=True)``, which returns a modified deep copy for flat encoder-decoder configs
    (T5), so its result cannot be matched to a config level by identity."""
    subs = [sub for name in ("decoder", "generator", "text_config")
            if isinstance(sub := getattr(config, name, None), PretrainedConfig)]
    return subs[0] if len(subs) == 1 else config


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

    transformers 5.x: reads ``all_tied_weights_keys`` of every ``PreTrainedModel`` in ``model`` (the runtime
    record, which :func:`forget_ties` edits). transformers 4.x has no record: the answer is what ``tie_weights()``
    would tie for the model's current config, read from an empty shell of the model built on the meta device (see
    :func:`_shell_ties`); a target is a member matching a ``_tied_weights_keys`` pattern, its source the member that
    matches none (the one ``save_pretrained`` keeps). A PEFT model's base model is used when given a ``PeftModel``.
    """
    from .peft_layout import base_model_of

    root = base_model_of(model)
    if not TIE_RECORD:
        if not isinstance(root, PreTrainedModel):
            return {}
        ties = _shell_ties(type(root), copy.deepcopy(root.config))
        return ties if ties is not None else _embedding_ties(root)
    out: dict[str, str] = {}
    for prefix, sub in iter_pretrained_submodels(root):
        keys = getattr(sub, "all_tied_weights_keys", None) or {}
        for target, source in keys.items():
            t = f"{prefix}.{target}" if prefix else target
            s = f"{prefix}.{source}" if prefix else source
            out.setdefault(t, s)
    return out


#: ``(model class, config JSON) -> ties`` of transformers 4.x shells already built (a shell costs one meta init).
_SHELL_CACHE: dict[tuple[type, str], dict[str, str] | None] = {}


def _build_shell(cls: type, config: PretrainedConfig) -> nn.Module | None:
    """``cls(config)`` on the meta device (no memory, no initialisation), or None when ``__init__`` needs more."""
    try:
        with torch.device("meta"):
            return cls(config)
    except Exception:  # noqa: BLE001 - any failure to build the shell: the caller falls back
        return None


def _shell_ties(cls: type, config: PretrainedConfig) -> dict[str, str] | None:
    """transformers 4.x: ``{target: source}`` that ``tie_weights()`` makes for ``cls(config)``, or None when the
    shell cannot be built.

    Sharing made in ``__init__`` does not count: 4.57's BART passes ``shared`` to its encoder and decoder, yet
    ``from_pretrained`` loads tensors over that sharing and a checkpoint without them comes back re-initialised,
    unless ``tie_weights()`` ties them again. So every shell parameter gets its own (meta) tensor first, then
    ``tie_weights()`` runs (embedding tie gated by the decoder text config's flag, ``tie_encoder_decoder``, each
    module's ``_tie_weights``: BART's ``embed_tokens`` to ``shared``, BERT's ``decoder.bias``), and members sharing
    one ``Parameter`` object afterwards are tied.
    """
    key = (cls, config.to_json_string(use_diff=False))
    if key not in _SHELL_CACHE:
        if len(_SHELL_CACHE) >= 64:
            _SHELL_CACHE.clear()
        shell = _build_shell(cls, config)
        if shell is not None:
            for module in shell.modules():
                for attr, p in list(module._parameters.items()):
                    if p is not None:
                        module._parameters[attr] = nn.Parameter(torch.empty_like(p), requires_grad=p.requires_grad)
            shell.tie_weights()
        _SHELL_CACHE[key] = None if shell is None else _identity_ties(shell)
    ties = _SHELL_CACHE[key]
    return dict(ties) if ties is not None else None


def _embedding_ties(root: nn.Module) -> dict[str, str]:
    """transformers 4.x fallback: ``get_output_embeddings().weight → get_input_embeddings().weight`` of every
    ``PreTrainedModel`` in ``root`` whose decoder text config has ``tie_word_embeddings`` True (canonical names)."""
    from .peft_layout import iter_base_parameters, unwrapped_module

    names = {id(bp.module): bp.name for bp in iter_base_parameters(root) if bp.attr == "weight"}
    out: dict[str, str] = {}
    for _, sub in iter_pretrained_submodels(root):
        if not getattr(_decoder_text_config(sub.config), TIE_FLAG, True):
            continue
        try:
            head, emb = sub.get_output_embeddings(), sub.get_input_embeddings()
        except (NotImplementedError, AttributeError, TypeError):
            continue
        t, s = names.get(id(unwrapped_module(head))), names.get(id(unwrapped_module(emb)))
        if t and s and t != s:
            out.setdefault(t, s)
    return out


def _tied_patterns(model: nn.Module) -> list[str]:
    """transformers 4.x: every submodule's ``_tied_weights_keys`` / ``_dynamic_tied_weights_keys`` as full-name
    regex patterns (what ``save_pretrained`` matches to drop a shared tensor)."""
    out: list[str] = []
    for prefix, module in model.named_modules():
        for attr in ("_tied_weights_keys", "_dynamic_tied_weights_keys"):
            for k in getattr(module, attr, None) or []:
                out.append(f"{prefix}.{k}" if prefix else k)
    return out


def _identity_ties(model: nn.Module) -> dict[str, str]:
    """``{target: source}`` among parameters of ``model`` that are one ``Parameter`` object (transformers 4.x)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    patterns = _tied_patterns(model)
    out: dict[str, str] = {}
    for names in by_id.values():
        if len(names) < 2:
            continue
        names = sorted(names)
        kept = [n for n in names if not any(re.search(pat, n) for pat in patterns)]
        source = kept[0] if kept else names[0]
        out.update({n: source for n in names if n != source})
    return out


def forget_ties(model: nn.Module, targets: set[str]) -> list[str]:
    """Remove the canonical ``targets`` from every ``all_tied_weights_keys`` record in ``model`` so that
    ``save_pretrained`` keeps them and ``tie_weights(recompute_mapping=False)`` leaves them alone (transformers 5.x).

    transformers 4.x keeps no record: what it ties follows the config flag and the class (set the flag with
    :func:`set_tie_flags`), so nothing is removed there and ``[]`` is returned.

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


def fold_untie_side_effects(model: nn.Module, flags_before: dict[str, bool]) -> list[str]:
    """Keep ``model``'s output unchanged after its tie flag went from True (``flags_before``, from
    :func:`tie_flags` before the change) to False, where the flag switched on more than the tie.

    transformers 4.x T5-style models (``model_type`` in ``_V4_RESCALED_WHEN_TIED``) multiply the decoder output by
    ``d_model**-0.5`` before ``lm_head`` only while the flag is True; here the factor is folded into the untied head
    (``lm_head.weight`` (vocab, d_model) becomes a new ``Parameter`` ``weight * d_model**-0.5``, computed in
    float32 and cast back), so logits agree within rounding and a reload (flag False) computes the same.
    transformers 5.x keeps the rescale under its own ``scale_decoder_outputs``: nothing to do.

    Returns one sentence per change made (for the merge report).
    """
    config = getattr(model, "config", None)
    if TIE_RECORD or config is None or getattr(config, "model_type", None) not in _V4_RESCALED_WHEN_TIED:
        return []
    if not any(flags_before.values()) or any(tie_flags(config).values()):
        return []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        return []
    scale = float(config.d_model) ** -0.5
    w = head.weight
    head.weight = nn.Parameter((w.detach().float() * scale).to(w.dtype), requires_grad=w.requires_grad)
    return [f"{type(config).__name__} (transformers {transformers.__version__}) rescales the decoder output by "
            f"d_model**-0.5 = {scale:.6g} only while tie_word_embeddings is True; folded that factor into the "
            "untied output embedding so logits are unchanged with the flag False"]


def ties_on_reload(model: PreTrainedModel) -> dict[str, str]:
    """What ``from_pretrained`` will tie when a checkpoint saved from ``model`` is loaded into ``type(model)``:
    ``{target: source}`` canonical names.

    The config goes through the same ``to_dict`` → ``from_dict`` round trip as ``save_pretrained`` /
    ``from_pretrained`` (so a config class that forces the tie flag in ``__init__``, like ``T5Config``, says what
    the saved file will say), and an empty shell of the model is built from it on the meta device (no memory, no
    initialisation); its ties are read as :func:`declared_ties` reads them. transformers 5.x (checked with 5.24)
    computes that record in ``post_init`` from each submodel's ``config.tie_word_embeddings``, and
    ``from_pretrained`` ties exactly those pairs (skipping, with a warning, a pair whose two tensors are both in the
    checkpoint and differ, since 5.4: :data:`RELOAD_KEEPS_DIFFERING_TIES`). transformers 4.x ties them whatever the
    saved tensors hold.

    Falls back to the model's own current record (``declared_ties(model)``) when the shell cannot be built
    (a class whose ``__init__`` needs more than its config).
    """
    config = model.config
    reloaded = type(config).from_dict(config.to_dict())
    if not TIE_RECORD:
        ties = _shell_ties(type(model), reloaded)
        return ties if ties is not None else declared_ties(model)
    shell = _build_shell(type(model), reloaded)
    if shell is None:
        return declared_ties(model)
    return declared_ties(shell)
