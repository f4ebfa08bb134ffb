"""PEFT 0.21 layouts around tied weights that cannot run or that drop part of the head (tie_guard.peft_defects):
each is shown to be real on PEFT itself, reported at capture as an error with the fix, and refused by the merge
before any work (nothing written)."""

import pytest
import torch
from conftest import PEFT_TIES_MODULES_TO_SAVE_ONLY, VOCAB
from families import build_family
from peft import LoraConfig, get_peft_model

from tie_guard import TieWatcher, UnsupportedAdapterError, safe_merge_and_unload
from tie_guard.events import EventLog
from tie_guard.probe import make_probe_ids, probe_logits


def _capture_errors(pm) -> list[str]:
    events = EventLog()
    TieWatcher(pm, events).capture()
    return [e.message for e in events.events if e.event == "setup_warning" and e.level == "error"]


def _refused(pm, tmp_path, *words):
    with pytest.raises(UnsupportedAdapterError) as exc:
        safe_merge_and_unload(pm, output_dir=tmp_path / "m")
    assert all(w in str(exc.value) for w in words) and "Fix:" in str(exc.value)
    assert not (tmp_path / "m").exists()


def test_modules_to_save_head_copy_in_encoder_decoder_embedding_slots(tmp_path):
    if PEFT_TIES_MODULES_TO_SAVE_ONLY:  # PEFT 0.18 already fails inside get_peft_model on this config
        with pytest.raises(AttributeError, match="has no attribute 'modules_to_save'"):
            get_peft_model(build_family("bart"), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                                            ensure_weight_tying=True))
        return
    pm = get_peft_model(build_family("bart"), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                                         ensure_weight_tying=True))
    with pytest.raises(RuntimeError):  # PEFT's own forward: the Linear copy sits in an Embedding slot
        probe_logits(pm, make_probe_ids(VOCAB))
    messages = _capture_errors(pm)
    assert [m.split(":")[0] for m in messages] == ["model.encoder.embed_tokens", "model.decoder.embed_tokens"]
    assert all("Linear copy in place of the BartScaledWordEmbedding" in m and "Fix:" in m for m in messages)
    _refused(pm, tmp_path, "modules_to_save", "Linear")


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_trainable_tokens_on_a_biased_linear_head(family, tmp_path):
    base = build_family(family)
    probe = make_probe_ids(VOCAB)
    base_logits = probe_logits(base, probe)
    bias = base.get_output_embeddings().bias.detach().clone()
    pm = get_peft_model(base, LoraConfig(r=4, target_modules=["query"], trainable_token_indices=[1, 5, 9]))
    # The trainable-token delta starts at zero and LoRA's B at zero, yet the adapter model's logits are not the base
    # model's: PEFT drops the head's bias (the bias differs per vocabulary entry, so the logits shift).
    assert torch.allclose(probe_logits(pm, probe), base_logits - bias, atol=1e-5)
    errors = _capture_errors(pm)
    assert len(errors) == 1 and "without the head's bias" in errors[0] and "modules_to_save" in errors[0]
    _refused(pm, tmp_path, "trainable tokens", "bias")


@pytest.mark.parametrize("family", ["bart", "gemma3_vlm"])
def test_dora_on_a_head_with_a_zero_padding_row(family, tmp_path):
    base = build_family(family)
    zero_rows = (base.get_output_embeddings().weight == 0).all(dim=1)
    assert int(zero_rows.sum()) == 1  # the padding row, shared with the input embedding
    pm = get_peft_model(base, LoraConfig(r=4, target_modules=["lm_head"], use_dora=True))
    logits = probe_logits(pm, make_probe_ids(VOCAB))  # PEFT's own forward, before any training
    assert torch.equal(torch.isnan(logits).any(dim=(0, 1))[: zero_rows.numel()], zero_rows)
    (message,) = _capture_errors(pm)
    assert "DoRA" in message and "1 of its rows are all zeros" in message
    _refused(pm, tmp_path, "DoRA", "NaN")
