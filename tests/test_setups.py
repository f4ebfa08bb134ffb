"""Every PEFT door into a tied group: warning at train start, the watch, and the verified merge per tie_policy.

Each setup trains a few real steps (non-zero adapter) on a tiny tied Llama, then compares PEFT's plain merge
with tie_guard's 'untie' and 'keep_tied' on a probe batch (fp32 tolerance 1e-4). Measured rows are appended to
$TIE_GUARD_RESULTS/compat.jsonl when set (scripts/compat_table.py renders the README table from them).
"""

import re

import pytest
import torch
from conftest import (PEFT_0_18_ENSURE_TYING_ERROR, PEFT_TIES_MODULES_TO_SAVE_ONLY, tiny_model,
                      train_adapter_a_little)
from peft import LoraConfig, get_peft_model
from setups import SETUPS, measure, record

from tie_guard import TieWatcher
from tie_guard.events import EventLog

TOL = 1e-4
# Setups whose two sides are adapted differently: one tied matrix cannot hold both.
KEEP_TIED_REFUSES = {"lora lm_head + embed_tokens", "modules_to_save both"}
# Setups where PEFT's own merge_and_unload gives logits that differ from the adapter model's.
PLAIN_MERGE_WRONG = {
    "lora lm_head", "lora lm_head, use_dora", "lora lm_head, use_rslora", "lora lm_head + embed_tokens",
    "lora lm_head, ensure_weight_tying", "lora lm_head + embed_tokens, ensure_weight_tying",
}
# Setups where the adapter model treats input and output embedding differently (train-start warning expected).
WARNS = {"lora lm_head", "lora lm_head, use_dora", "lora lm_head, use_rslora", "lora lm_head + embed_tokens",
         "modules_to_save lm_head", "modules_to_save embed_tokens", "modules_to_save both"}
# modules_to_save=["embed_tokens", "lm_head"] with ensure_weight_tying=True: copies PEFT keeps of the tied matrix.
TIED_MTS_COPIES = 1
# Setups PEFT itself cannot build, with its error message.
PEFT_FAILS: dict[str, str] = {}
if PEFT_TIES_MODULES_TO_SAVE_ONLY:
    # PEFT 0.18: LoRA on both sides and trainable tokens on both sides stay two separate deltas with
    # ensure_weight_tying (0.19+ share one), a modules_to_save pair stays two trained copies, and
    # modules_to_save=["lm_head"] with it fails inside PEFT. tie_guard sees the separate training (warning,
    # divergence) and 'untie' still merges them exactly.
    _SEPARATE = {"lora lm_head + embed_tokens, ensure_weight_tying", "modules_to_save both, ensure_weight_tying",
                 "trainable tokens (dict: embed_tokens + lm_head)", "trainable tokens (dict: both), ensure_weight_tying"}
    KEEP_TIED_REFUSES |= _SEPARATE
    WARNS |= _SEPARATE | {"lora lm_head, ensure_weight_tying"}
    # PEFT 0.18's merge_and_unload writes both trainable-token deltas into the one shared matrix.
    PLAIN_MERGE_WRONG |= {"trainable tokens (dict: embed_tokens + lm_head)",
                          "trainable tokens (dict: both), ensure_weight_tying"}
    TIED_MTS_COPIES = 2
    PEFT_FAILS["modules_to_save lm_head, ensure_weight_tying"] = PEFT_0_18_ENSURE_TYING_ERROR


@pytest.mark.parametrize("setup", list(SETUPS))
def test_merge_matrix(setup):
    if setup in PEFT_FAILS:  # this PEFT version cannot build the adapter at all: nothing for tie_guard to merge
        with pytest.raises(AttributeError, match=re.escape(PEFT_FAILS[setup])):
            measure(setup)
        return
    row = measure(setup)
    record(row)
    plain, untie, keep = row["plain"], row["untie"], row["keep_tied"]

    # tie_guard 'untie': always exact, before and after save -> reload.
    assert untie["outcome"] == "verified"
    assert untie["logit_diff"] <= TOL and untie["reload_logit_diff"] <= TOL
    if not untie["adapter_trains_input"]:
        assert untie["embed_rows_changed"] == 0
    assert untie["tied_after"] == untie["reload_tied"]  # reload keeps what the merge decided
    assert untie["tie_flag"] == untie["tied_after"]  # and the config says so

    # 'keep_tied': one matrix, delta once; refused where the sides differ.
    if setup in KEEP_TIED_REFUSES:
        assert keep["outcome"] == "refused" and "untie" in keep["message"]
    else:
        assert keep["outcome"] == "verified" and keep["tied_after"] and keep["reload_tied"]
        if untie["tied_after"]:  # the adapter itself kept both sides equal: keep_tied is exact too
            assert keep["logit_diff"] <= TOL

    # PEFT's own merge, side by side.
    if setup in PLAIN_MERGE_WRONG:
        assert plain["logit_diff"] > 0.1 and plain["embed_rows_changed"] > 0
        assert plain["logit_diff"] > 1000 * untie["logit_diff"]
    else:
        assert plain["logit_diff"] <= TOL


@pytest.mark.parametrize("setup", list(SETUPS))
def test_warning_and_watch(setup):
    base = tiny_model("llama_tied")
    if setup in PEFT_FAILS:
        with pytest.raises(AttributeError, match=re.escape(PEFT_FAILS[setup])):
            get_peft_model(base, LoraConfig(r=4, lora_alpha=8, **SETUPS[setup]))
        return
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, **SETUPS[setup]))
    events = EventLog()
    watcher = TieWatcher(pm, events)
    (group,) = watcher.capture()
    warnings = [e.message for e in events.events if e.event == "setup_warning" and e.level == "warning"]
    if setup in WARNS:
        assert len(warnings) == 1 and "Fix:" in warnings[0]
    else:
        assert warnings == []
    train_adapter_a_little(pm, steps=3)
    res = watcher.check(3)
    assert res.ok, res.findings
    if setup in WARNS:
        assert res.divergence["lm_head"] > 0
    else:
        assert res.divergence["lm_head"] == 0.0  # one shared delta: the effective tie holds exactly


def test_modules_to_save_copies_report_extra_bytes():
    for spec, copies in ((dict(modules_to_save=["embed_tokens", "lm_head"]), 2),
                         (dict(modules_to_save=["embed_tokens", "lm_head"], ensure_weight_tying=True),
                          TIED_MTS_COPIES)):
        pm = get_peft_model(tiny_model("llama_tied"), LoraConfig(r=4, target_modules=["q_proj"], **spec))
        events = EventLog()
        (g,) = TieWatcher(pm, events).capture()
        (info,) = [e.message for e in events.events if "MiB extra" in e.message]
        assert f"{copies} full copy(ies)" in info
        assert f"({copies * g.nbytes} bytes)" in info


def test_several_adapters_merge_one_keep_others_usable():
    from tie_guard import safe_merge_and_unload
    from tie_guard.probe import make_probe_ids, probe_logits

    base = tiny_model("gemma2")
    base_embed = base.get_input_embeddings().weight.detach().clone()
    pm = get_peft_model(base, LoraConfig(r=4, target_modules=["lm_head", "q_proj"]), adapter_name="a")
    train_adapter_a_little(pm, steps=3, seed=1)
    pm.add_adapter("b", LoraConfig(r=4, target_modules=["lm_head", "v_proj"]))
    pm.set_adapter("b")
    train_adapter_a_little(pm, steps=3, seed=2)
    probe = make_probe_ids(256)
    logits_b = probe_logits(pm, probe)
    pm.set_adapter("a")
    logits_a = probe_logits(pm, probe)
    pm.set_adapter("b")

    merged, report = safe_merge_and_unload(pm, adapter_names=["a"])
    assert report.adapter_names == ["a"]
    assert (probe_logits(merged, probe) - logits_a).abs().max().item() <= TOL
    assert torch.equal(merged.get_input_embeddings().weight, base_embed)
    # The other adapter is still active and unchanged.
    assert pm.active_adapters == ["b"]
    assert torch.equal(probe_logits(pm, probe), logits_b)


def test_merge_adapter_roundtrip_and_merged_state_is_refused():
    from tie_guard import UnsupportedAdapterError, safe_merge_and_unload

    base = tiny_model("gemma2")
    pm = get_peft_model(base, LoraConfig(r=4, target_modules=["lm_head"]))
    train_adapter_a_little(pm, steps=3)
    w0 = base.model.embed_tokens.weight.detach().clone()
    events = EventLog()
    watcher = TieWatcher(pm, events)
    watcher.capture()
    pm.merge_adapter()  # PEFT's in-place merge: writes into the shared matrix
    assert not torch.equal(base.model.embed_tokens.weight, w0)
    assert [f.kind for f in watcher.check(1).findings] == ["frozen_modified"]
    with pytest.raises(UnsupportedAdapterError, match="unmerge_adapter"):
        safe_merge_and_unload(pm)
    pm.unmerge_adapter()
    # PEFT promises a restore up to float rounding (it subtracts the same delta), not bit-equality.
    torch.testing.assert_close(base.model.embed_tokens.weight.detach(), w0, rtol=0, atol=1e-6)
    merged, report = safe_merge_and_unload(pm)
    assert report.verified
