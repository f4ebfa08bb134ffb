"""PEFT layouts around tied weights that cannot run, or that compute something other than the base module would.

Each was reproduced with peft 0.21.2 on tiny tied models (see tests/test_peft_defects.py):

* trainable tokens wrapped around a ``modules_to_save`` copy (what TRL 1.16's ``clone_chat_template`` builds on a
  tied model): the layer's forward raises ``TrainableTokensLayer wraps an unknown layer type``;
* a ``modules_to_save`` copy of another class than the module it stands in for: with ``ensure_weight_tying=True``
  and ``modules_to_save=["lm_head"]`` on an encoder–decoder model (BART), PEFT puts the head's ``nn.Linear`` copy
  into the encoder/decoder ``embed_tokens`` slots, whose forward then multiplies token ids
  (``expected m1 and m2 to have the same dtype``);
* trainable tokens on a tied ``nn.Linear`` head that has a bias (BERT/RoBERTa masked-LM heads):
  ``TrainableTokensLayer.forward`` calls ``F.linear(x, W)`` without the bias, so the adapter model computes the
  head without it while the base model (and any merge) adds it.

:func:`unrunnable_layouts` (forward fails: a merge cannot be verified, so it is refused before any work) and
:func:`layout_defects` (all three, for the warnings at capture) are the one place that knows them.
"""

from __future__ import annotations

from torch import nn

from .peft_layout import BaseParameter


def _per_module(base_params: list[BaseParameter]):
    seen = set()
    for bp in base_params:
        if bp.parts and bp.module_path not in seen:
            seen.add(bp.module_path)
            yield bp


def unrunnable_layouts(base_params: list[BaseParameter]) -> list[str]:
    """Messages (each naming the module, the PEFT layout and the fix) for wrapped modules whose forward fails in
    peft 0.21; empty when every wrapped module can run."""
    out = []
    for bp in _per_module(base_params):
        kinds = [p.kind for p in bp.parts]
        if kinds[:2] == ["trainable_tokens", "modules_to_save"]:
            out.append(
                f"{bp.module_path}: PEFT wraps trainable tokens around a modules_to_save copy "
                f"({', '.join(p.describe() for p in bp.parts)}); PEFT 0.21 cannot run that layer's forward "
                "('TrainableTokensLayer wraps an unknown layer type'). TRL's SFTTrainer builds it when "
                "clone_chat_template adds tokens to a tied model. Fix: add the tokens yourself "
                "(tokenizer.add_special_tokens + model.resize_token_embeddings) and train "
                "modules_to_save=['embed_tokens','lm_head'] with ensure_weight_tying=True, or only "
                "trainable_token_indices.")
        for part in bp.parts:
            if part.kind != "modules_to_save":
                continue
            for name in part.adapter_names:
                copy_cls = type(part.wrapper.modules_to_save[name])
                orig_cls = type(part.wrapper.original_module)
                if copy_cls is not orig_cls:
                    out.append(
                        f"{bp.module_path}: PEFT's modules_to_save[{name!r}] holds a {copy_cls.__name__} copy in "
                        f"place of the {orig_cls.__name__} it wraps (ensure_weight_tying shared another tied "
                        "module's copy into this slot), so this module's forward fails. Fix: name every tied "
                        "module in modules_to_save (e.g. ['embed_tokens', 'lm_head'], or 'shared' for "
                        "encoder-decoder models), or drop ensure_weight_tying.")
    return out


def layout_defects(base_params: list[BaseParameter]) -> list[tuple[str, str]]:
    """``(level, message)`` for every known defect: the unrunnable layouts (``"error"``) and trainable tokens on a
    biased linear head (``"error"``: the adapter model computes that head without its bias, and a merged model
    would add it back, so the merge cannot match what was trained)."""
    out = [("error", m) for m in unrunnable_layouts(base_params)]
    for bp in _per_module(base_params):
        first = bp.parts[0]
        if first.kind == "trainable_tokens" and isinstance(bp.module, nn.Linear) and bp.module.bias is not None:
            out.append(("error",
                        f"{bp.module_path}: PEFT 0.21 computes trainable tokens on a linear head without the "
                        f"head's bias ({bp.module_path}.bias is skipped by TrainableTokensLayer.forward), so the "
                        "adapter model trains and predicts without it while the merged model adds it back. Fix: "
                        "put the head in modules_to_save (ensure_weight_tying=True keeps it tied) instead of "
                        "trainable_token_indices."))
    return out
