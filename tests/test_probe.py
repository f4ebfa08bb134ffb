"""ProbeRun: logits compared block by block (vocabulary slices through the heads' own forward, or a few positions
at a time) must give exactly what comparing the whole (batch, seq, vocab) logits gives."""

import pytest
import torch
from conftest import VOCAB, tiny_model, train_adapter_a_little
from peft import LoraConfig, get_peft_model

import tie_guard.probe as probe_mod
from tie_guard import MergeVerificationError, safe_merge_and_unload
from tie_guard.probe import ProbeRun, make_probe_ids, probe_logits

# A sliced GEMM may round differently from the whole one: well below the float32 merge tolerance (1e-4).
SLICE_ROUNDING = 1e-5


def _scaled_logits_model(arch: str):
    """Tiny tied Cohere (logits × logit_scale) and Granite (logits / logits_scaling) models."""
    from transformers import CohereConfig, CohereForCausalLM, GraniteConfig, GraniteForCausalLM

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    if arch == "cohere":
        return CohereForCausalLM(CohereConfig(**common, logit_scale=0.25)).eval()
    return GraniteForCausalLM(GraniteConfig(**common, logits_scaling=8.0)).eval()


def _adapter(arch="gemma2", seed=0, **kw):
    base = tiny_model(arch, seed=seed) if arch not in ("cohere", "granite") else _scaled_logits_model(arch)
    cfg = dict(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj", "v_proj"])
    cfg.update(kw)
    pm = get_peft_model(base, LoraConfig(**cfg))
    return train_adapter_a_little(pm, seed=seed)


def _whole(a, b, probe):
    la, lb = probe_logits(a, probe), probe_logits(b, probe)
    return (la - lb).abs().max().item(), lb.abs().max().item()


@pytest.fixture(params=[7, 300, 1 << 20], ids=["blocks-of-7", "blocks-of-300", "one-block"])
def block(request, monkeypatch):
    monkeypatch.setattr(probe_mod, "block_elems", lambda vocab, hidden: request.param)
    return request.param


# after the head: gemma2 soft-caps, cohere multiplies by logit_scale, granite divides by logits_scaling
@pytest.mark.parametrize("arch", ["gemma2", "llama_tied", "cohere", "granite"])
def test_lora_head_vs_merged_compares_every_logit(arch, block):
    pm = _adapter(arch)
    probe = make_probe_ids(VOCAB, 2, 9)
    want_diff, want_max = _whole(_merged(pm, probe), pm, probe)
    ref, run = ProbeRun(pm, probe), ProbeRun(_merged(pm, probe), probe)
    assert ref.row_sliceable and run.row_sliceable  # vanilla LoRA head and a plain nn.Linear: vocabulary slices
    diff, mx = run.compare(ref)
    assert abs(mx - want_max) <= SLICE_ROUNDING * max(1.0, want_max)
    assert abs(diff - want_diff) <= SLICE_ROUNDING
    assert torch.allclose(ref.full_logits(), probe_logits(pm, probe), atol=SLICE_ROUNDING, rtol=0)


def _merged(pm, probe):
    if not hasattr(pm, "_test_merged"):
        pm._test_merged = safe_merge_and_unload(pm, probe_input_ids=probe)[0]
    return pm._test_merged


def test_a_wrong_logit_anywhere_is_found(block):
    """One vocabulary row of the merged head off by 0.5: the compared difference is exactly what the whole logits
    show, whichever block holds that row."""
    pm = _adapter()
    probe = make_probe_ids(VOCAB, 2, 9)
    merged = safe_merge_and_unload(pm, probe_input_ids=probe)[0]
    with torch.no_grad():
        merged.lm_head.weight[VOCAB - 3] += 0.5
    want, _ = _whole(merged, pm, probe)
    got, _ = ProbeRun(merged, probe).compare(ProbeRun(pm, probe))
    assert want > 0.1 and abs(got - want) <= SLICE_ROUNDING


@pytest.mark.parametrize("setup", ["dora", "modules_to_save"])
def test_heads_that_cannot_be_sliced_fall_back_to_positions(setup, block):
    kw = ({"use_dora": True} if setup == "dora"
          else {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]})
    pm = _adapter("llama_tied", **kw)
    probe = make_probe_ids(VOCAB, 2, 9)
    merged = safe_merge_and_unload(pm, probe_input_ids=probe)[0]
    ref = ProbeRun(pm, probe)
    assert not ref.row_sliceable
    with pytest.raises(ValueError, match="cannot compute a slice"):
        ref.block(slice(0, 1), slice(0, 2))
    want_diff, want_max = _whole(merged, pm, probe)
    diff, mx = ProbeRun(merged, probe).compare(ref)
    assert abs(diff - want_diff) <= SLICE_ROUNDING and abs(mx - want_max) <= SLICE_ROUNDING * max(1.0, want_max)


def test_non_finite_logits_compare_as_inf(block):
    pm = _adapter()
    probe = make_probe_ids(VOCAB, 2, 9)
    merged = safe_merge_and_unload(pm, probe_input_ids=probe)[0]
    with torch.no_grad():
        merged.lm_head.weight[5, 0] = float("nan")
    diff, _ = ProbeRun(merged, probe).compare(ProbeRun(pm, probe))
    assert diff == float("inf")
    assert ProbeRun(merged, probe).max_abs() == float("inf")


@pytest.mark.parametrize("family", ["t5", "bart", "bert", "gemma3_vlm"])
def test_other_families_compare_like_the_whole_logits(family, block):
    """T5 rescales before its head, BART adds final_logits_bias after it, BERT's head has a (tied) bias, the VLM
    wraps a language model: the blocks still give what the whole logits give."""
    from families import FAMILIES, build_family

    base = build_family(family)
    vocab = base.get_output_embeddings().weight.shape[0]
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=list(FAMILIES[family].head_targets)))
    train_adapter_a_little(pm, vocab=VOCAB)
    probe = make_probe_ids(VOCAB, 2, 9)
    merged = safe_merge_and_unload(pm, probe_input_ids=probe)[0]
    want_diff, want_max = _whole(merged, pm, probe)
    ref = ProbeRun(pm, probe)
    assert ref.vocab == vocab
    diff, mx = ProbeRun(merged, probe).compare(ref)
    assert abs(diff - want_diff) <= SLICE_ROUNDING and abs(mx - want_max) <= SLICE_ROUNDING * max(1.0, want_max)


def test_probe_leaves_modes_and_grad_mode_as_they_were():
    pm = _adapter()
    pm.train()
    modes = {n: m.training for n, m in pm.named_modules()}
    run = ProbeRun(pm, make_probe_ids(VOCAB, 1, 4))
    run.max_abs()
    assert torch.is_grad_enabled()
    assert {n: m.training for n, m in pm.named_modules()} == modes


def test_inplace_merge_refuses_a_broken_adapter_before_writing_its_layer():
    pm = _adapter()
    layer = pm.get_base_model().model.layers[1].self_attn.q_proj
    before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(MergeVerificationError, match=r"layers\.1\.self_attn\.q_proj.*lora_B\.default\.weight.*NaN"):
        safe_merge_and_unload(pm, inplace=True)
    assert torch.equal(layer.base_layer.weight, before)


def test_heads_with_accelerate_hooks_are_not_sliced(block):
    """accelerate's add_hook_to_module (device_map dispatch) puts an instance-level forward on the module that runs
    the original's full weights: such heads are computed whole per position block, and still compare exactly."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    pm = _adapter()
    probe = make_probe_ids(VOCAB, 2, 9)
    merged = safe_merge_and_unload(pm, probe_input_ids=probe)[0]
    add_hook_to_module(merged.lm_head, ModelHook())
    add_hook_to_module(pm.get_base_model().lm_head, ModelHook())
    ref, run = ProbeRun(pm, probe), ProbeRun(merged, probe)
    assert not ref.row_sliceable and not run.row_sliceable
    want_diff, want_max = _whole(merged, pm, probe)
    diff, mx = run.compare(ref)
    assert abs(diff - want_diff) <= SLICE_ROUNDING and abs(mx - want_max) <= SLICE_ROUNDING * max(1.0, want_max)


# ------------------------------------------------------------------------------------------------ what follows the head
# Found by a review of the block design: a post-head step read from a config attribute by name was applied where
# the model applies something else, or nothing. ProbeRun now keeps a candidate only if it reproduces the logits the
# model's own forward returned, and otherwise holds the model's whole logits.
def _post_head_models():
    import transformers as T

    V, H = VOCAB, 32
    common = dict(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2)
    builds = {
        # soft-capping under another config name than Gemma's
        "recurrent_gemma": lambda: T.RecurrentGemmaForCausalLM(T.RecurrentGemmaConfig(
            vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, lru_width=H, attention_window_size=16, logits_soft_cap=2.0,
            block_types=["recurrent", "attention"])),
        # logit_scale in the config, never applied by MptForCausalLM (and a documented string value)
        "mpt_float_scale": lambda: T.MptForCausalLM(T.MptConfig(d_model=H, n_heads=4, n_layers=1, vocab_size=V,
                                                                logit_scale=0.25)),
        "mpt_string_scale": lambda: T.MptForCausalLM(T.MptConfig(d_model=H, n_heads=4, n_layers=1, vocab_size=V,
                                                                 logit_scale="inv_sqrt_d_model")),
        # a vocabulary-wide bias added after the head: the forward needs the whole vocabulary
        "bart_final_logits_bias": lambda: _with_bias(T.BartForConditionalGeneration(T.BartConfig(
            vocab_size=V, d_model=H, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64))),
        # get_output_embeddings() is the decoder's INPUT embedding; the real head is another module
        "fsmt": lambda: T.FSMTForConditionalGeneration(T.FSMTConfig(
            langs=["en", "de"], src_vocab_size=V, tgt_vocab_size=V, d_model=H, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
            tie_word_embeddings=True)),
    }
    if hasattr(T, "HyperCLOVAXForCausalLM"):  # transformers 5.x only: MULTIPLIES by logits_scaling
        builds["hyperclovax"] = lambda: T.HyperCLOVAXForCausalLM(T.HyperCLOVAXConfig(
            **common, logits_scaling=0.125, tie_word_embeddings=True))
    if hasattr(T, "MiniCPM3ForCausalLM"):  # 5.x only: divides the hidden state by logits_scaling BEFORE the head
        builds["minicpm3"] = lambda: T.MiniCPM3ForCausalLM(T.MiniCPM3Config(
            **{**common, "num_key_value_heads": 4}, dim_model_base=8, q_lora_rank=16, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8))
    return builds


def _with_bias(model):
    with torch.no_grad():
        model.final_logits_bias.normal_(0, 5.0)
    return model


POST_HEAD = _post_head_models()


@pytest.mark.parametrize("name", sorted(POST_HEAD))
def test_what_follows_the_head_is_checked_against_the_models_own_logits(name):
    import copy

    torch.manual_seed(0)
    base = POST_HEAD[name]().eval()
    targets = ["q_proj", "v_proj", "fc1"] if name == "fsmt" else ["lm_head"]
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    other = copy.deepcopy(pm).merge_and_unload()  # PEFT's merge: for a tied head, a different function
    probe = make_probe_ids(VOCAB, 2, 9)
    want_diff, want_max = _whole(other, pm, probe)
    diff, mx = ProbeRun(other, probe).compare(ProbeRun(pm, probe))
    assert abs(diff - want_diff) <= SLICE_ROUNDING * max(1.0, want_diff)
    assert abs(mx - want_max) <= SLICE_ROUNDING * max(1.0, want_max)
    if name in ("fsmt", "bart_final_logits_bias"):
        assert ProbeRun(pm, probe).logits is not None  # held whole: the head's outputs alone are not the logits


def test_a_pre_hook_on_the_head_runs_once():
    pm = _adapter("llama_tied")
    probe = make_probe_ids(VOCAB, 2, 9)
    merged = safe_merge_and_unload(pm, probe_input_ids=probe)[0]
    for m in (merged.lm_head, pm.get_base_model().lm_head):
        m.register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
    want_diff, want_max = _whole(merged, pm, probe)
    diff, mx = ProbeRun(merged, probe).compare(ProbeRun(pm, probe))
    assert abs(diff - want_diff) <= SLICE_ROUNDING and abs(mx - want_max) <= SLICE_ROUNDING * max(1.0, want_max)
