"""Every tuner of the installed PEFT on a tiny tied Llama's ``lm_head`` (plus ``q_proj``), trained a few real steps:
either an exact verified merge or a refusal raised before any work (issue 11, "every tuner").

Exact rows: max |Δlogit| merged vs adapter model within the fp32 tolerance, the input embedding bit-identical to the
pretrained one (or, for trainable tokens, changed only in the trained rows), save → reload by ``output_dir`` AND by
the user's own ``merged.save_pretrained()`` + ``AutoModelForCausalLM.from_pretrained()`` computing the same logits,
and the adapter model bit-identical afterwards. Refused rows: ``UnsupportedAdapterError`` naming the tuner and the
fix, nothing written, adapter model unchanged. Rows where PEFT 0.21 itself cannot build or run the adapter on this
model are recorded as PEFT's own failure (the test checks that PEFT still fails, so the row is revisited when it
stops failing). Each row's numbers go to ``$TIE_GUARD_RESULTS/tuners.jsonl`` (rendered by
``scripts/compat_table.py --tuners``).
"""

from __future__ import annotations

import warnings
import peft
import pytest
import setups
import torch
from conftest import VOCAB, tiny_model, train_adapter_a_little, untied_llama
from peft import get_peft_model
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tie_guard import UnsupportedAdapterError, safe_merge_and_unload
from tie_guard.probe import logit_tolerance, make_probe_ids, probe_logits
from tie_guard.watch import TieWatcher

T = ["q_proj", "lm_head"]
C = peft.PEFT_TYPE_TO_CONFIG_MAPPING
P = peft.PeftType

# row name → (config factory, expectation). Expectations: "exact"; ("refused", words the message must contain);
# ("peft_fails", words of PEFT's own error). Tuner sizes are shrunk to the tiny model (hidden 32, vocab 256).
TUNERS: dict[str, tuple] = {
    "LoRA": (lambda: peft.LoraConfig(r=4, target_modules=T), "exact"),
    "LoRA use_rslora": (lambda: peft.LoraConfig(r=4, target_modules=T, use_rslora=True), "exact"),
    "LoRA use_dora": (lambda: peft.LoraConfig(r=4, target_modules=T, use_dora=True), "exact"),
    "LoRA use_dora, ensure_weight_tying": (
        lambda: peft.LoraConfig(r=4, target_modules=T, use_dora=True, ensure_weight_tying=True), "exact"),
    "LoRA MonteCLoRA": (lambda: peft.LoraConfig(r=4, target_modules=T,
                                                monteclora_config=peft.tuners.lora.config.MontecloraConfig()),
                        "exact"),
    "LoRA lora_bias (lm_head only)": (lambda: peft.LoraConfig(r=4, target_modules=["lm_head"], lora_bias=True),
                       ("refused", "lm_head", "lora_bias=True", "has no bias")),
    "AdaLoRA": (lambda: peft.AdaLoraConfig(target_modules=T, init_r=4, target_r=2, total_step=10), "exact"),
    "TrainableTokens (standalone)": (
        lambda: peft.TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[1, 5, 9]), "exact"),
    "LoHa": (lambda: C[P.LOHA](target_modules=T, r=4), "exact"),
    "LoKr": (lambda: C[P.LOKR](target_modules=T, r=4), "exact"),
    "OFT": (lambda: C[P.OFT](target_modules=T), "exact"),
    "BOFT": (lambda: C[P.BOFT](target_modules=T), "exact"),
    "IA3": (lambda: C[P.IA3](target_modules=T, feedforward_modules=[]), "exact"),
    "VeRA": (lambda: C[P.VERA](target_modules=T, r=4), "exact"),
    "PVeRA": (lambda: C[P.PVERA](target_modules=T, r=4), "exact"),
    "FourierFT": (lambda: C[P.FOURIERFT](target_modules=T, n_frequency=16), "exact"),
    "WaveFT": (lambda: C[P.WAVEFT](target_modules=T, n_frequency=16), "exact"),
    "HRA": (lambda: C[P.HRA](target_modules=T), "exact"),
    "MiSS (Bone)": (lambda: C[P.MISS](target_modules=T, r=4), "exact"),
    "Bone (PEFT < 0.21's name for MiSS)": (lambda: C[P.BONE](target_modules=T, r=4), ("refused", "bone", "Fix:")),
    "LN-tuning": (lambda: C[P.LN_TUNING](target_modules=T), "exact"),
    "VB-LoRA": (lambda: C[P.VBLORA](target_modules=T, vector_length=8, num_vectors=16), "exact"),
    "UniLoRA": (lambda: C[P.UNILORA](target_modules=T), "exact"),
    "RandLoRA": (lambda: C[P.RANDLORA](target_modules=T, r=4), "exact"),
    "C3A": (lambda: C[P.C3A](target_modules=T, block_size=8), "exact"),
    "SHiRA": (lambda: C[P.SHIRA](target_modules=T, r=4), "exact"),
    "RoAd": (lambda: C[P.ROAD](target_modules=T, group_size=8), "exact"),
    "FRoD": (lambda: C[P.FROD](target_modules=T), "exact"),
    "GLoRA": (lambda: C[P.GLORA](target_modules=T), "exact"),
    "HiRA": (lambda: C[P.HIRA](target_modules=T), "exact"),
    "OSF": (lambda: C[P.OSF](target_modules=T), "exact"),
    "DeLoRA": (lambda: C[P.DELORA](target_modules=T), "exact"),
    "GraLoRA": (lambda: C[P.GRALORA](target_modules=T), "exact"),
    "TinyLoRA": (lambda: C[P.TINYLORA](target_modules=T), "exact"),
    "PSOFT": (lambda: C[P.PSOFT](target_modules=T), "exact"),
    "PEANuT": (lambda: C[P.PEANUT](target_modules=T), "exact"),
    "SuperTuning": (lambda: C[P.SUPERTUNING](target_modules=T), "exact"),
    "DEFT": (lambda: C[P.DEFT](target_modules=T), "exact"),
    "Lily": (lambda: C[P.LILY](target_modules=T), ("refused", "no exact merge for Lily")),
    "BEFT": (lambda: C[P.BEFT](target_modules=T), ("refused", "BEFT bias", "has no bias")),
    "Poly": (lambda: C[P.POLY](task_type="CAUSAL_LM", target_modules=T, r=4, n_tasks=2), ("refused", "no exact merge for Poly")),
    "Adaption prompt": (lambda: C[P.ADAPTION_PROMPT](adapter_layers=1, adapter_len=4),
                        ("refused", "adaption prompt", "nothing to merge")),
    "Prompt tuning": (lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
                      ("refused", "prompt-learning")),
    "Prefix tuning": (lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
                      ("refused", "prompt-learning")),
    "P-tuning": (lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
                 ("refused", "prompt-learning")),
    "Multitask prompt tuning": (lambda: peft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                                          num_tasks=2), ("refused", "prompt-learning")),
    "CPT": (lambda: peft.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[1, 2, 3], cpt_mask=[1, 1, 1],
                                   cpt_tokens_type_mask=[1, 2, 2]), ("refused", "prompt-learning")),
    "Cartridge": (lambda: peft.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
                  ("refused", "prompt-learning")),
    "Shadow": (lambda: C[P.SHADOW](target_modules=T), ("peft_fails", "ShadowCarrier")),
}

#: Tuners needing task_ids in every forward (Poly, multitask prompt tuning): trained with task 0.
_TASK_IDS = {"Poly", "Multitask prompt tuning"}


def test_matrix_covers_every_installed_tuner():
    """Every PeftType of the installed PEFT has a row (X-LoRA and AdaMSS are covered by their own tests below)."""
    covered = {type(cfg).__name__ for cfg in map(_config, TUNERS.values()) if cfg is not None} | {
        "XLoraConfig", "AdamssConfig"}
    missing = sorted(C[t].__name__ for t in P if C[t].__name__ not in covered)
    assert not missing, f"tuners without a row in tests/test_tuners.py: {missing}"


def _config(entry):
    """The tuner's config, or ``None`` when the installed PEFT does not have that tuner (an older PEFT)."""
    try:
        return entry[0]()
    except (AttributeError, KeyError):
        return None


def _train(pm, name: str, steps: int = 3):
    if name not in _TASK_IDS:
        return train_adapter_a_little(pm, steps=steps)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-2)
    pm.train()
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (4, 16), generator=gen)
        pm(input_ids=ids, labels=ids, task_ids=torch.zeros(4, dtype=torch.long)).loss.backward()
        opt.step()
        opt.zero_grad()
    return pm.eval()


def _state(pm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pm.state_dict().items()}


def _unchanged(pm, before: dict[str, torch.Tensor]) -> bool:
    after = pm.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def _reload_logits(path, probe) -> torch.Tensor:
    return probe_logits(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), probe)


def record(row: dict) -> None:
    """Append a measured row to $TIE_GUARD_RESULTS/tuners.jsonl (rendered by scripts/compat_table.py --tuners)."""
    setups.record(row, "tuners.jsonl")


def _build(name: str, make):
    base = tiny_model("llama_tied")
    base_embed = base.get_input_embeddings().weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(base, make())
        _train(pm, name)
    return pm, base_embed


@pytest.mark.parametrize("name", list(TUNERS))
def test_tuner_on_tied_lm_head(name, tmp_path):
    make, expect = TUNERS[name]
    if _config(TUNERS[name]) is None:
        pytest.skip(f"{name} is not in peft {peft.__version__}")
    row = {"tuner": name, "peft": peft.__version__, "targets": "lm_head (tied), q_proj"}
    if expect[0] == "peft_fails":
        with pytest.raises(Exception, match=expect[1]):
            _build(name, make)
        record({**row, "outcome": "peft_fails", "message": expect[1]})
        return
    pm, base_embed = _build(name, make)
    probe = make_probe_ids(VOCAB)
    if not peft_is_prompt_learning(pm):
        watcher = TieWatcher(pm)
        watcher.capture()
        watcher.check(1)  # must not crash for any tuner
    before = _state(pm)
    out = tmp_path / "merged"
    if expect != "exact":
        with pytest.raises(UnsupportedAdapterError) as info:
            safe_merge_and_unload(pm, output_dir=out, probe_input_ids=probe)
        msg = str(info.value)
        for words in expect[1:]:
            assert words.lower() in msg.lower(), msg
        assert "Fix:" in msg, msg
        assert not out.exists() and not list(tmp_path.iterdir())  # nothing written
        assert _unchanged(pm, before)
        record({**row, "outcome": "refused", "message": msg})
        return

    adapter = probe_logits(pm, probe)
    with pm.disable_adapter():
        plain = probe_logits(pm, probe)
    effect = (adapter - plain).abs().max().item()
    assert effect > 1e-3, f"{name}: the trained adapter does not change the logits ({effect:.2e})"
    tol = logit_tolerance(torch.float32, float(adapter.abs().max()))

    merged, rep = safe_merge_and_unload(pm, output_dir=out, probe_input_ids=probe)
    diff = (probe_logits(merged, probe) - adapter).abs().max().item()
    assert rep.verified and diff <= tol, (name, diff, tol)
    embed = merged.get_input_embeddings().weight
    trains_input = any(e.trained_by_adapter for e in rep.input_embeddings)
    if trains_input:  # ensure_weight_tying / trainable tokens: the adapter's own input embedding, merged
        every_id = torch.arange(VOCAB)[None]
        with torch.no_grad():
            want = pm.get_input_embeddings()(every_id)[0]
        assert torch.allclose(embed, want, atol=1e-6, rtol=0)
        if name.startswith("TrainableTokens"):  # only the trained rows differ, bit for bit
            assert int((embed != base_embed).any(dim=1).sum()) <= 3
    else:
        assert torch.equal(embed, base_embed)
    reload_out = (_reload_logits(out, probe) - adapter).abs().max().item()
    user_dir = tmp_path / "user_saved"
    merged.save_pretrained(user_dir)
    reload_user = (_reload_logits(user_dir, probe) - adapter).abs().max().item()
    assert reload_out <= tol and reload_user <= tol, (name, reload_out, reload_user, tol)
    assert _unchanged(pm, before)
    record({**row, "outcome": "exact", "adapter_effect": effect, "logit_diff": diff, "tolerance": tol,
            "reload_output_dir_diff": reload_out, "reload_user_save_diff": reload_user,
            "untrained_input_embeddings_bit_identical": rep.untrained_input_embeddings_bit_identical, "adapter_trains_input": trains_input,
            "tied_after": merged.get_input_embeddings().weight is merged.get_output_embeddings().weight})


def peft_is_prompt_learning(pm) -> bool:
    return pm.peft_config["default"].is_prompt_learning


def test_adalora_merge_equals_peft_delta():
    """AdaLoRA's merged head is W + PEFT's own get_delta_weight (B @ (A ⊙ E) · scaling / (ranknum + 1e-5)),
    the input embedding untouched."""
    pm, base_embed = _build("AdaLoRA", TUNERS["AdaLoRA"][0])
    head = pm.base_model.model.lm_head
    assert float(head.lora_E["default"].abs().max()) > 0  # E moved away from its zero init
    want = base_embed + head.get_delta_weight("default").detach()
    merged, _ = safe_merge_and_unload(pm)
    assert torch.allclose(merged.lm_head.weight, want, atol=1e-6, rtol=0)
    assert torch.equal(merged.model.embed_tokens.weight, base_embed)


def test_standalone_trainable_tokens_on_untied_model_matches_peft_merge():
    """On an untied model PEFT's own merge is exact: tie_guard's merged embedding equals it bit for bit."""
    def build():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(untied_llama(), TUNERS["TrainableTokens (standalone)"][0]())
        return train_adapter_a_little(pm, steps=3)

    probe = make_probe_ids(VOCAB)
    pm = build()
    adapter = probe_logits(pm, probe)
    merged, rep = safe_merge_and_unload(pm, probe_input_ids=probe)
    peft_merged = build().merge_and_unload()  # same seeds: the same adapter, merged by PEFT in place
    assert torch.equal(merged.model.embed_tokens.weight, peft_merged.model.embed_tokens.weight)
    assert (probe_logits(merged, probe) - adapter).abs().max().item() <= rep.logit_tolerance


def test_lora_bias_merges_exactly_where_the_base_has_a_bias(tmp_path):
    """Qwen2's q_proj has a bias: lora_bias=True merges into it exactly (the tied lm_head is not targeted)."""
    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    embed = base.model.embed_tokens.weight.detach().clone()
    pm = train_adapter_a_little(get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True)),
                                steps=3)
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    want_bias = q.base_layer.bias + q.lora_B["default"].bias * q.scaling["default"]
    assert float(q.lora_B["default"].bias.abs().max()) > 0
    probe = make_probe_ids(VOCAB)
    merged, rep = safe_merge_and_unload(pm, output_dir=tmp_path / "m", probe_input_ids=probe)
    assert torch.allclose(merged.model.layers[0].self_attn.q_proj.bias, want_bias, atol=1e-6, rtol=0)
    assert rep.verified and rep.max_abs_logit_diff <= rep.logit_tolerance
    assert torch.equal(merged.model.embed_tokens.weight, embed)


def test_xlora_refused_before_any_work(tmp_path):
    """X-LoRA (PEFT 0.21 refuses LoRA experts on the tied lm_head itself: "Got unexpected keys"; experts on q_proj
    load) mixes experts per token: refused up front, nothing written."""
    for i in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expert = get_peft_model(tiny_model("llama_tied", seed=i), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                                      init_lora_weights=False))
        expert.save_pretrained(tmp_path / f"expert{i}")
    base = tiny_model("llama_tied")
    base.config.use_cache = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(base, peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, adapters={
            "0": str(tmp_path / "expert0"), "1": str(tmp_path / "expert1")}))
    before = _state(pm)
    with pytest.raises(UnsupportedAdapterError, match="no exact merge for X-LoRA"):
        safe_merge_and_unload(pm, output_dir=tmp_path / "m")
    assert not (tmp_path / "m").exists() and _unchanged(pm, before)
    record({"tuner": "X-LoRA", "peft": peft.__version__, "targets": "q_proj (PEFT refuses experts on lm_head)",
            "outcome": "refused", "message": "no exact merge for X-LoRA"})


def test_adamss_row():
    """AdaMSS needs scikit-learn (not a tie_guard dependency); with it installed it must merge exactly."""
    pytest.importorskip("sklearn")
    pm, base_embed = _build("AdaMSS", lambda: C[P.ADAMSS](target_modules=T))
    merged, rep = safe_merge_and_unload(pm)
    assert rep.verified and torch.equal(merged.get_input_embeddings().weight, base_embed)


def test_lora_bias_refusal_happens_before_the_probe(tmp_path, monkeypatch):
    """Refusals come before any work: the probe forward is never run."""
    import tie_guard.merge as merge

    calls = []
    monkeypatch.setattr(merge, "ProbeRun", lambda *a, **k: calls.append(1))
    pm, _ = _build("LoRA lora_bias", TUNERS["LoRA lora_bias (lm_head only)"][0])
    with pytest.raises(UnsupportedAdapterError):
        safe_merge_and_unload(pm, output_dir=tmp_path / "m")
    assert calls == []
