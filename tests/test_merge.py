import copy
import hashlib
import json

import pytest
import torch
from conftest import VOCAB, tiny_model, train_adapter_a_little
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tie_guard import MergeVerificationError, TiedMergeError, safe_merge_and_unload
from tie_guard.merge import REPORT_NAME
from tie_guard.probe import make_probe_ids, probe_logits
from tie_guard.tie_config import declared_ties

FP32_TOL = 1e-4


def _lm_head_lora(arch="gemma2", **kw):
    base = tiny_model(arch)
    base_embed = base.get_input_embeddings().weight.detach().clone()
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj", "v_proj"], **kw))
    train_adapter_a_little(pm)
    return pm, base_embed


def _state_hash(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_plain_peft_merge_changes_embeddings_but_tie_guard_does_not(tmp_path):
    pm, base_embed = _lm_head_lora()
    probe = make_probe_ids(VOCAB)
    adapter_logits = probe_logits(pm, probe)

    # The bug, on the same setup: PEFT's merge writes the head's delta into the shared matrix.
    plain = copy.deepcopy(pm).merge_and_unload()
    plain_embed_change = (plain.get_input_embeddings().weight - base_embed).abs()
    plain_logit_diff = (probe_logits(plain, probe) - adapter_logits).abs().max().item()
    assert (plain_embed_change.amax(dim=1) > 0).sum().item() == VOCAB  # every row moved
    assert plain_logit_diff > 1e-2

    merged, report = safe_merge_and_unload(pm, output_dir=tmp_path / "merged")
    assert torch.equal(merged.get_input_embeddings().weight, base_embed)
    assert report.untrained_input_embeddings_bit_identical and report.input_embeddings[0].rows_changed == 0
    assert report.max_abs_logit_diff <= FP32_TOL
    assert report.verified and report.logits_match and report.plain_merge_changes_input_embeddings
    assert merged.config.tie_word_embeddings is False
    assert merged.lm_head.weight.untyped_storage().data_ptr() != merged.model.embed_tokens.weight.untyped_storage().data_ptr()
    assert "lm_head.weight" not in declared_ties(merged)  # 5.x: all_tied_weights_keys; 4.x: what tie_weights() ties

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert reloaded.config.tie_word_embeddings is False
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    assert torch.equal(reloaded.get_input_embeddings().weight, base_embed)
    reload_diff = (probe_logits(reloaded, probe) - adapter_logits).abs().max().item()
    assert reload_diff <= FP32_TOL
    assert report.reload_max_abs_logit_diff == 0.0
    on_disk = json.loads((tmp_path / "merged" / REPORT_NAME).read_text())
    assert on_disk["verified"] is True and on_disk["untrained_input_embeddings_bit_identical"] is True
    print(f"plain PEFT: embed max change {plain_embed_change.max():.3g}, logit diff {plain_logit_diff:.3g}; "
          f"tie_guard: logit diff {report.max_abs_logit_diff:.3g}, after reload {reload_diff:.3g}")


def test_adapter_model_is_not_modified_and_stays_usable():
    pm, _ = _lm_head_lora()
    before = _state_hash(pm)
    probe = make_probe_ids(VOCAB)
    logits_before = probe_logits(pm, probe)
    safe_merge_and_unload(pm)
    assert _state_hash(pm) == before
    assert torch.equal(probe_logits(pm, probe), logits_before)
    assert pm.get_base_model().lm_head.base_layer.weight is pm.get_base_model().model.embed_tokens.weight


@pytest.mark.parametrize("arch", ["gemma3_text", "llama_tied", "qwen2_tied"])
def test_untie_merge_across_architectures(arch, tmp_path):
    pm, base_embed = _lm_head_lora(arch)
    probe = make_probe_ids(VOCAB)
    adapter_logits = probe_logits(pm, probe)
    merged, report = safe_merge_and_unload(pm, output_dir=tmp_path / "m")
    assert torch.equal(merged.get_input_embeddings().weight, base_embed)
    assert report.max_abs_logit_diff <= FP32_TOL
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert (probe_logits(reloaded, probe) - adapter_logits).abs().max().item() <= FP32_TOL


def test_keep_tied_applies_delta_exactly_once():
    pm, base_embed = _lm_head_lora()
    head = pm.get_base_model().lm_head
    expected = base_embed + head.get_delta_weight("default")  # PEFT's own delta for this layer
    merged, report = safe_merge_and_unload(pm, "keep_tied")
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert merged.config.tie_word_embeddings is True
    torch.testing.assert_close(merged.lm_head.weight.detach(), expected, rtol=0, atol=1e-6)
    assert report.max_abs_logit_diff > FP32_TOL  # moved: reported, not hidden
    assert not report.input_embeddings[0].equals_base


def test_error_policy_names_the_tied_weights():
    pm, _ = _lm_head_lora()
    with pytest.raises(TiedMergeError, match=r"lm_head\.weight.*untie"):
        safe_merge_and_unload(pm, "error")


def test_error_policy_allows_adapters_that_do_not_touch_ties():
    base = tiny_model("gemma2")
    pm = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    train_adapter_a_little(pm)
    merged, report = safe_merge_and_unload(pm, "error")
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert report.max_abs_logit_diff <= FP32_TOL


def test_resize_after_untie_merge_does_not_retie():
    pm, base_embed = _lm_head_lora()
    merged, _ = safe_merge_and_unload(pm)
    head = merged.lm_head.weight.detach().clone()
    merged.resize_token_embeddings(VOCAB + 8)
    assert merged.lm_head.weight.untyped_storage().data_ptr() != merged.model.embed_tokens.weight.untyped_storage().data_ptr()
    assert torch.equal(merged.lm_head.weight[:VOCAB], head)
    assert torch.equal(merged.model.embed_tokens.weight[:VOCAB], base_embed)


def test_failed_verification_raises_and_saves_nothing(tmp_path):
    pm, _ = _lm_head_lora()
    # A forward hook that only the adapter model runs: the merged model cannot match it.
    pm.get_base_model().lm_head.register_forward_hook(lambda mod, args, out: out + 1.0)
    with pytest.raises(MergeVerificationError, match="merged logits differ") as info:
        safe_merge_and_unload(pm, output_dir=tmp_path / "merged")
    assert info.value.report.max_abs_logit_diff == pytest.approx(1.0, abs=1e-3)
    assert not (tmp_path / "merged").exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_dir_is_refused(tmp_path):
    pm, _ = _lm_head_lora()
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        safe_merge_and_unload(pm, output_dir=tmp_path / "merged")
    assert (tmp_path / "merged" / "keep.txt").read_text() == "user data"


def test_empty_existing_output_dir_is_accepted_and_outputs_follow_umask(tmp_path):
    pm, _ = _lm_head_lora()
    (tmp_path / "merged").mkdir()
    safe_merge_and_unload(pm, output_dir=tmp_path / "merged")
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "merged").stat().st_mode) == 0o777 & ~mask
    for f in ("model.safetensors", "config.json", REPORT_NAME):
        assert stat.S_IMODE((tmp_path / "merged" / f).stat().st_mode) == 0o666 & ~mask


def test_bad_probe_and_adapter_names_are_clear_errors():
    pm, _ = _lm_head_lora()
    with pytest.raises(ValueError, match=r"vocabulary is \[0, 256\).*Fix"):
        safe_merge_and_unload(pm, probe_input_ids=torch.tensor([[1, 2, 300]]))
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        safe_merge_and_unload(pm, probe_input_ids=torch.tensor([1, 2, 3]))
    merged, report = safe_merge_and_unload(pm, adapter_names="default")  # a single name, as in PEFT
    assert report.adapter_names == ["default"]


def test_keep_tied_reports_logits_do_not_match_but_is_verified():
    pm, _ = _lm_head_lora()
    _, report = safe_merge_and_unload(pm, "keep_tied")
    assert report.verified and not report.logits_match
    assert report.max_abs_logit_diff > report.logit_tolerance


def test_non_peft_model_is_a_type_error():
    with pytest.raises(TypeError, match="peft.get_peft_model"):
        safe_merge_and_unload(tiny_model("gemma2"))


def test_inplace_merges_untied_layers_in_place_and_still_unties_the_head(tmp_path):
    pm, base_embed = _lm_head_lora()
    probe = make_probe_ids(VOCAB)
    adapter_logits = probe_logits(pm, probe)
    q_before = pm.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    merged, report = safe_merge_and_unload(pm, inplace=True, probe_input_ids=probe)
    assert report.verified and report.max_abs_logit_diff <= FP32_TOL
    assert merged.model.layers[0].self_attn.q_proj.weight is q_before  # merged in place, no copy
    assert torch.equal(merged.get_input_embeddings().weight, base_embed)  # tied head never written in place
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    assert (probe_logits(merged, probe) - adapter_logits).abs().max().item() <= FP32_TOL


def test_merged_config_gets_inference_use_cache_back(tmp_path):
    """Training switches use_cache off (Trainer, gradient checkpointing); the merged model is for inference."""
    base = tiny_model("gemma2")
    base.config.use_cache = False
    pm = get_peft_model(base, LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
    merged, report = safe_merge_and_unload(pm, output_dir=tmp_path / "m")
    assert merged.config.use_cache is True and pm.get_base_model().config.use_cache is False
    assert json.loads((tmp_path / "m" / "config.json").read_text())["use_cache"] is True
    assert any("use_cache = True" in a for a in report.actions)
