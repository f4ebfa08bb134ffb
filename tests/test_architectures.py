"""Tied architectures, tiny random (real config classes) and real pretrained: verified 'untie' merge of a LoRA head."""

import json

import pytest
import torch
from conftest import TINY, VOCAB, tiny_model, train_adapter_a_little
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
)

from tie_guard import find_tied_groups, safe_merge_and_unload
from tie_guard.probe import make_probe_ids, probe_logits
from tie_guard.tie_config import tie_flags

TOL = 1e-4


def tiny_t5():
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                               num_heads=4, decoder_start_token_id=0)).eval()


def tiny_gemma3_multimodal():
    """Gemma3ForConditionalGeneration: the tie flag sits on the outer config and on the nested text_config."""
    torch.manual_seed(0)
    cfg = Gemma3Config(
        text_config=dict(vocab_size=VOCAB + 4, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, boi_token_index=VOCAB + 1, eoi_token_index=VOCAB + 2, image_token_index=VOCAB + 3,
    )
    return Gemma3ForConditionalGeneration(cfg).eval()


def _check_untie(model, targets, tmp_path, reload_cls):
    inputs = {g_name: model.get_parameter(g_name).detach().clone()
              for g in find_tied_groups(model) for g_name in [m.name for m in g.input_members]}
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    train_adapter_a_little(pm, steps=3)
    probe = make_probe_ids(VOCAB)
    adapter = probe_logits(pm, probe)
    merged, report = safe_merge_and_unload(pm, output_dir=tmp_path / "m", probe_input_ids=probe)
    assert report.verified and report.max_abs_logit_diff <= TOL
    for name, before in inputs.items():
        assert torch.equal(merged.get_parameter(name), before), name
    reloaded = reload_cls.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert (probe_logits(reloaded, probe) - adapter).abs().max().item() <= TOL
    for name, before in inputs.items():
        assert torch.equal(reloaded.get_parameter(name), before), name
    return merged, reloaded, report


@pytest.mark.parametrize("arch", sorted(TINY))
def test_decoder_only(arch, tmp_path):
    merged, reloaded, report = _check_untie(tiny_model(arch), ["lm_head"], tmp_path, AutoModelForCausalLM)
    assert set(tie_flags(merged.config).values()) == {False}
    assert reloaded.get_output_embeddings().weight is not reloaded.get_input_embeddings().weight
    assert report.warnings == []


def test_t5_group_of_four_keeps_input_ties(tmp_path):
    model = tiny_t5()
    (g,) = find_tied_groups(model)
    assert len(g.members) == 4 and [m.role for m in g.members].count("input_embedding") == 3
    merged, reloaded, report = _check_untie(model, ["lm_head", "q"], tmp_path, T5ForConditionalGeneration)
    # The three input embeddings stay one matrix; only the head is untied.
    assert merged.shared.weight is merged.encoder.embed_tokens.weight is merged.decoder.embed_tokens.weight
    assert merged.lm_head.weight is not merged.shared.weight
    assert reloaded.shared.weight is reloaded.encoder.embed_tokens.weight
    assert reloaded.lm_head.weight is not reloaded.shared.weight
    # T5Config forces tie_word_embeddings=True: reported with its consequence.
    assert any("forces" in w and "tie_weights()" in w for w in report.warnings)


def test_nested_text_config_flags(tmp_path):
    model = tiny_gemma3_multimodal()
    assert tie_flags(model.config) == {"config.tie_word_embeddings": True, "config.text_config.tie_word_embeddings": True}
    (g,) = find_tied_groups(model)
    assert g.names == ("model.language_model.embed_tokens.weight", "lm_head.weight")
    merged, reloaded, report = _check_untie(model, ["lm_head"], tmp_path, Gemma3ForConditionalGeneration)
    assert tie_flags(merged.config) == {"config.tie_word_embeddings": False,
                                        "config.text_config.tie_word_embeddings": False}
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["tie_word_embeddings"] is False and saved["text_config"]["tie_word_embeddings"] is False
    assert reloaded.lm_head.weight is not reloaded.model.language_model.embed_tokens.weight


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
