import math

import pytest
import torch
from conftest import VOCAB, tiny_model, train_adapter_a_little
from peft import LoraConfig, get_peft_model

from tie_guard import TieWatcher
from tie_guard.events import EventLog
from tie_guard.fingerprint import CHUNK_ELEMS, Fingerprint


def _watched_lora():
    pm = get_peft_model(tiny_model("gemma2"), LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]))
    train_adapter_a_little(pm)
    w = TieWatcher(pm, EventLog())
    w.capture()
    return pm, w


def test_clean_check_and_exact_low_rank_divergence():
    pm, w = _watched_lora()
    res = w.check(1)
    assert res.ok
    head = pm.get_base_model().lm_head
    dense = head.get_delta_weight("default")  # full vocab × hidden delta, built here only to check the number
    want = (torch.linalg.norm(dense) / torch.linalg.norm(head.base_layer.weight)).item()
    assert res.divergence["lm_head"] == pytest.approx(want, rel=1e-5)
    assert want > 0


def test_new_lm_head_parameter_breaks_the_tie():
    pm, w = _watched_lora()
    base = pm.get_base_model()
    base.lm_head.base_layer.weight = torch.nn.Parameter(base.lm_head.base_layer.weight.detach().clone())
    res = w.check(2)
    assert [f.kind for f in res.findings] == ["tie_broken"]
    assert "lm_head.weight" in res.findings[0].message and "tie_weights" in res.findings[0].message
    assert w.check(3).ok  # reported once, then the new state is the baseline


def test_in_place_write_into_frozen_shared_weight_is_caught():
    pm, w = _watched_lora()
    with torch.no_grad():
        pm.get_base_model().model.embed_tokens.weight.data.add_(1e-3)  # .data: bypasses the version counter
    res = w.check(2)
    assert [f.kind for f in res.findings] == ["frozen_modified"]


def test_single_element_change_is_caught_within_one_rotation():
    t = torch.randn(3 * CHUNK_ELEMS + 5)
    fp = Fingerprint(t)
    t.data[2 * CHUNK_ELEMS + 7] += 1.0  # avoid the version counter
    reasons = [fp.quick_check(t) for _ in range(fp.n_chunks)]
    assert fp.n_chunks == 4
    assert sum(r is not None for r in reasons) >= 1
    assert fp.full_check(t) is not None


def test_version_bump_without_value_change_is_not_a_break():
    t = torch.randn(1000)
    fp = Fingerprint(t)
    t.mul_(1.0)
    assert t._version != fp.version
    assert fp.quick_check(t) is None and fp.version == t._version


def test_nan_in_adapter_is_reported():
    pm, w = _watched_lora()
    with torch.no_grad():
        pm.get_base_model().lm_head.lora_B["default"].weight[0, 0] = float("nan")
    res = w.check(2)
    assert [f.kind for f in res.findings] == ["nonfinite"]
    assert math.isnan(res.divergence["lm_head"])


def test_full_fine_tuning_tie_holds_and_stale_flag_retie_is_caught():
    model = tiny_model("llama_tied")
    w = TieWatcher(model, EventLog())
    w.capture()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, VOCAB, (2, 8))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    res = w.check(1)
    assert res.ok and res.divergence["lm_head"] == 0.0
    # Someone unties on purpose but leaves the flag True; resize_token_embeddings -> tie_weights() re-ties.
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() + 1.0)
    assert [f.kind for f in w.check(2).findings] == ["tie_broken"]
    model.resize_token_embeddings(VOCAB + 8)
    assert [f.kind for f in w.check(3).findings] == ["tie_appeared"]
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the trained head was silently replaced


def test_setup_warnings_name_the_fix():
    ev = EventLog()
    pm = get_peft_model(tiny_model("llama_tied"), LoraConfig(r=4, target_modules=["lm_head"]))
    TieWatcher(pm, ev).capture()
    warnings = [e.message for e in ev.events if e.event == "setup_warning"]
    assert len(warnings) == 1 and "merge_and_unload" in warnings[0] and "safe_merge_and_unload" in warnings[0]

    ev = EventLog()
    pm = get_peft_model(tiny_model("llama_tied"), LoraConfig(r=4, target_modules=["q_proj"],
                                                             modules_to_save=["embed_tokens"]))
    TieWatcher(pm, ev).capture()
    msgs = [e.message for e in ev.events if e.event == "setup_warning"]
    assert any("ensure_weight_tying=True" in m and "input embedding" in m for m in msgs)
    assert any("MiB extra" in m for m in msgs)


def test_no_tied_weights_is_a_quiet_noop():
    from conftest import untied_llama

    ev = EventLog()
    w = TieWatcher(untied_llama(), ev)
    assert w.capture() == []
    assert [e.event for e in ev.events] == ["capture", "no_tied_weights"]
    assert all(e.level == "info" for e in ev.events)
    assert w.check(1).ok


def test_cheap_check_catches_nan_within_one_rotation_without_divergence():
    pm, w = _watched_lora()
    assert w.check(1, divergence=False).divergence == {}
    with torch.no_grad():
        pm.get_base_model().lm_head.lora_B["default"].weight[-1, -1] = float("inf")
    kinds = [f.kind for f in w.check(2, divergence=False).findings]  # tiny adapter: one slice covers it
    assert kinds == ["nonfinite"]
