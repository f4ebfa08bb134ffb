"""Every family of tied architecture (decoder-only, encoder–decoder, masked LM, VLM wrapper) through the verified
merge, in eval mode and with dropout active, each tie policy, saved by tie_guard's ``output_dir`` AND by the user's
own ``save_pretrained``; and real pretrained Gemma-3-270M.

Expectations are computed independently of tie_guard: the adapter model's logits on a probe batch (fp32 tolerance
1e-4), the base model's input embeddings (bit-equality), and for ``keep_tied`` the head's merged value
``W + s·B·A`` in float64. Measured rows go to ``$TIE_GUARD_RESULTS/families.jsonl`` (README table).
"""

import json

import pytest
import torch
from conftest import PEFT_TIES_MODULES_TO_SAVE_ONLY, VOCAB, train_adapter_a_little
from families import FAMILIES, build_family
from peft import LoraConfig, get_peft_model
from setups import SETUPS, record
from transformers import AutoModelForCausalLM

from tie_guard import MergeVerificationError, UnsupportedAdapterError, find_tied_groups, safe_merge_and_unload
from tie_guard.probe import make_probe_ids, probe_logits
from tie_guard.tie_config import RELOAD_KEEPS_DIFFERING_TIES, TIE_RECORD, tie_flags

TOL = 1e-4


def _modes(model) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


def _build_adapter(family: str, dropout: float):
    base = build_family(family, dropout)
    group = next(g for g in find_tied_groups(base) if g.output_members)
    inputs = {m.name: base.get_parameter(m.name).detach().clone() for m in group.input_members}
    head = group.output_members[0].name
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(FAMILIES[family].head_targets),
                     lora_dropout=dropout, init_lora_weights=False)
    pm = get_peft_model(base, cfg)
    if dropout:  # trained with dropout, left in train mode as the Trainer leaves it at train end
        train_adapter_a_little(pm, steps=2)
        pm.train()
    return pm, group, inputs, head, cfg


def _expected_head(pm, head: str) -> torch.Tensor:
    """W + s·B·A in float64, read straight from the PEFT layer (independent of tie_guard.effective)."""
    layer = pm.get_submodule("base_model.model." + head.rsplit(".", 1)[0])
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    return (layer.base_layer.weight.double() + layer.scaling["default"] * (b @ a)).float()


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["eval", "dropout"])
@pytest.mark.parametrize("policy", ["untie", "keep_tied"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family(family, policy, dropout, tmp_path):
    pm, group, inputs, head, cfg = _build_adapter(family, dropout)
    probe = make_probe_ids(VOCAB)
    adapter = probe_logits(pm, probe)
    modes_before = _modes(pm)
    expected_head = _expected_head(pm, head)

    merged, report = safe_merge_and_unload(pm, policy, output_dir=tmp_path / "ours", probe_input_ids=probe)
    assert report.verified
    # Nothing the user gave changes, mode included; the merged model comes back in the mode PEFT's would.
    assert _modes(pm) == modes_before
    twin = get_peft_model(build_family(family, dropout), cfg)
    if dropout:
        twin.train()
    assert _modes(merged) == _modes(twin.merge_and_unload())

    merged.save_pretrained(tmp_path / "user")  # the user's own save
    row = {"family": family, "kind": FAMILIES[family].kind, "policy": policy, "mode": "dropout" if dropout else "eval",
           "members": len(group.members), "logit_diff": report.max_abs_logit_diff, "copies": len(report.saved_copies)}
    for route in ("ours", "user"):
        reloaded = type(merged).from_pretrained(tmp_path / route, dtype=torch.float32)
        reload_logits = probe_logits(reloaded, probe)
        for m in group.members:  # every member (biases too) comes back as merged, not re-initialised
            assert torch.equal(reloaded.get_parameter(m.name), merged.get_parameter(m.name)), (route, m.name)
        shared = sorted(sorted(g.names) for g in find_tied_groups(reloaded) if g.physical)
        assert shared == sorted(report.shared_after_reload), route
        if policy == "untie":
            assert (reload_logits - adapter).abs().max().item() <= TOL, route
            for name, before in inputs.items():
                assert torch.equal(reloaded.get_parameter(name), before), (route, name)
        else:
            assert (reload_logits - probe_logits(merged, probe)).abs().max().item() <= TOL, route
            for name in inputs:
                assert torch.equal(reloaded.get_parameter(name), reloaded.get_parameter(head)), (route, name)
        row[f"reload_logit_diff_{route}"] = (reload_logits - adapter).abs().max().item()

    # transformers 4.x T5 rescales the decoder output by d_model**-0.5 only while the tie flag is True: an untie
    # merge folds that factor into the untied head (logits unchanged, checked above and after reload).
    folded = any("d_model**-0.5" in a for a in report.actions)
    assert folded == (not TIE_RECORD and family == "t5" and policy == "untie")
    if folded:
        expected_head = expected_head * merged.config.d_model ** -0.5
    if policy == "untie":
        assert report.max_abs_logit_diff <= TOL
        for name, before in inputs.items():
            assert torch.equal(merged.get_parameter(name), before), name
        assert (merged.get_parameter(head) - expected_head).abs().max().item() <= 1e-6
        # Input members stay one tensor in memory where the saved config re-ties them, else equal copies.
        assert all(torch.equal(merged.get_parameter(n), next(iter(inputs.values()))) for n in inputs)
    else:
        assert all(merged.get_parameter(n) is merged.get_parameter(head) for n in inputs)
        assert (merged.get_parameter(head) - expected_head).abs().max().item() <= 1e-6
    record(row, "families.jsonl")


def test_group_of_four_keeps_input_ties_where_the_config_re_ties_them(tmp_path):
    """T5Config forces tie_word_embeddings=True: the three input embeddings stay one tensor; BART's flag really
    goes False, so its encoder/decoder copies become own tensors (reported with their bytes)."""
    for family, expect_copies in (("t5", 0), ("bart", 2)):
        pm, group, inputs, head, _ = _build_adapter(family, 0.0)
        assert len(group.members) == 4 and len(inputs) == 3
        merged, report = safe_merge_and_unload(pm, output_dir=tmp_path / family)
        assert len(report.saved_copies) == expect_copies
        assert all(c["nbytes"] == VOCAB * 32 * 4 for c in report.saved_copies)
        if family == "t5":
            assert merged.shared.weight is merged.encoder.embed_tokens.weight is merged.decoder.embed_tokens.weight
            if TIE_RECORD:  # transformers 5.x: T5Config forces the flag True; the warning says what that means
                assert any("forces" in w and "tie_weights()" in w for w in report.warnings)
            else:  # 4.x: the flag really goes False (one nn.Embedding module shared by construction) and the
                # d_model**-0.5 output rescale it also switched off is folded into the head
                assert merged.config.tie_word_embeddings is False and not report.warnings
                assert any("d_model**-0.5" in a for a in report.actions)
        else:
            assert merged.model.shared.weight is not merged.model.encoder.embed_tokens.weight
        assert merged.get_parameter(head) is not merged.get_parameter(next(iter(inputs)))


def test_nested_text_config_flags(tmp_path):
    pm, group, _, _, _ = _build_adapter("gemma3_vlm", 0.0)
    assert group.names == ("model.language_model.embed_tokens.weight", "lm_head.weight")
    # transformers 5.x: both levels carry a meaningful flag; 4.x: only the text config's flag ties anything
    # (vision_config carries True too and ties nothing), so only that level is reported.
    levels = ["config.tie_word_embeddings", "config.text_config.tie_word_embeddings"] if TIE_RECORD else [
        "config.text_config.tie_word_embeddings"]
    assert tie_flags(pm.get_base_model().config) == dict.fromkeys(levels, True)
    merged, _ = safe_merge_and_unload(pm, output_dir=tmp_path / "m")
    assert tie_flags(merged.config) == dict.fromkeys(levels, False)
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["tie_word_embeddings"] is False and saved["text_config"]["tie_word_embeddings"] is False


@pytest.mark.integration
def test_real_gemma3_270m(tmp_path):
    from tie_guard.packaged import packaged_checkpoint

    path = packaged_checkpoint("gemma-3-270m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    (g,) = find_tied_groups(model)
    assert g.status == "tied" and g.members[0].shape == (262144, 640)
    base_embed = model.get_input_embeddings().weight.detach().clone()
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["lm_head", "q_proj", "v_proj"]))
    train_adapter_a_little(pm, steps=2, lr=1e-3, vocab=262144)
    probe = make_probe_ids(262144, batch=1, seq_len=16)
    adapter = probe_logits(pm, probe)
    merged, report = safe_merge_and_unload(pm, output_dir=tmp_path / "m", probe_input_ids=probe)
    assert report.verified and report.max_abs_logit_diff <= report.logit_tolerance
    assert torch.equal(merged.get_input_embeddings().weight, base_embed)
    del merged
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert torch.equal(reloaded.get_input_embeddings().weight, base_embed)
    ours = (probe_logits(reloaded, probe) - adapter).abs().max().item()
    del reloaded
    plain = pm.merge_and_unload()  # last use of pm: PEFT's in-place merge
    plain_diff = (probe_logits(plain, probe) - adapter).abs().max().item()
    assert not torch.equal(plain.get_input_embeddings().weight, base_embed)
    assert ours <= report.logit_tolerance and plain_diff > 100 * ours
    print(f"real Gemma-3-270M: plain PEFT |Δlogit| {plain_diff:.3g}; tie_guard after reload {ours:.3g}")


# PEFT module names per family for the setups of tests/setups.py (written for Llama's names).
_NAMES = {
    "bart": {"embed_tokens": "shared"},
    "t5": {"embed_tokens": "shared", "q_proj": "q"},
    "bert": {"lm_head": "decoder", "embed_tokens": "word_embeddings", "q_proj": "query"},
    "gemma3_vlm": {},
}
# Layouts PEFT 0.21 itself cannot run or computes without the head's bias (tie_guard.peft_defects): refused.
# BART/T5 + ensure_weight_tying put the head's Linear copy into the embedding slots; BERT's head has a bias that
# PEFT's trainable tokens drop; DoRA divides by the zero norm of the padding row that BART/BERT/Gemma heads share.
_DEFECTS = {(f, s) for f in ("bart", "t5") for s in ("modules_to_save lm_head, ensure_weight_tying",
                                                     "modules_to_save both, ensure_weight_tying")} | {
    ("bert", s) for s in SETUPS if s.startswith("trainable tokens")} | {
    (f, "lora lm_head, use_dora") for f in ("bart", "bert", "gemma3_vlm")}


def _renamed(kwargs: dict, names: dict) -> dict:
    def rename(v):
        if isinstance(v, dict):
            return {names.get(k, k): x for k, x in v.items()}
        if isinstance(v, list):
            return [names.get(x, x) if isinstance(x, str) else x for x in v]
        return v
    return {k: rename(v) for k, v in kwargs.items()}


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("family", sorted(_NAMES))
def test_every_peft_door_on_other_families(family, setup, tmp_path):
    """Every PEFT door into a tied group (tests/setups.py) on a group of four (BART's shared + encoder/decoder
    embeddings + head; T5), a masked-LM head with a tied bias (BERT) and a VLM wrapper: verified, and the user's
    own save → reload computes the adapter model's logits."""
    cfg = LoraConfig(r=4, lora_alpha=8, **_renamed(SETUPS[setup], _NAMES[family]))
    try:
        pm = get_peft_model(build_family(family), cfg)
    except AttributeError as exc:  # PEFT 0.18's own failure on modules_to_save + ensure_weight_tying
        assert PEFT_TIES_MODULES_TO_SAVE_ONLY and "has no attribute 'modules_to_save'" in str(exc), exc
        return
    if (family, setup) in _DEFECTS:
        with pytest.raises(UnsupportedAdapterError, match="Fix:"):
            safe_merge_and_unload(pm)
        return
    train_adapter_a_little(pm, steps=2, lr=1e-2)
    probe = make_probe_ids(VOCAB)
    adapter = probe_logits(pm, probe)
    if family == "bert" and not RELOAD_KEEPS_DIFFERING_TIES and setup.startswith(("modules_to_save lm_head",
                                                                                "modules_to_save both")):
        # transformers 4.x ties cls.predictions.decoder.bias to cls.predictions.bias on every load, so the trained
        # copy's bias cannot survive a reload: the reload check refuses the merge and nothing is saved.
        with pytest.raises(MergeVerificationError, match="cls.predictions.decoder.bias"):
            safe_merge_and_unload(pm, output_dir=tmp_path / "ours", probe_input_ids=probe)
        assert not (tmp_path / "ours").exists()
        return
    merged, report = safe_merge_and_unload(pm, output_dir=tmp_path / "ours", probe_input_ids=probe)
    assert report.verified and report.max_abs_logit_diff <= TOL
    merged.save_pretrained(tmp_path / "user")
    reloaded = type(merged).from_pretrained(tmp_path / "user", dtype=torch.float32)
    assert (probe_logits(reloaded, probe) - adapter).abs().max().item() <= TOL
    assert sorted(sorted(g.names) for g in find_tied_groups(reloaded) if g.physical) == \
        sorted(report.shared_after_reload)
