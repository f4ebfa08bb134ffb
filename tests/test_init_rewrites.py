"""LoRA inits that rewrite the base weight (PiSSA, OLoRA, KaSA) on a tied lm_head: seen at capture, at merge and by
`tie-guard verify`, and undone by the untie merge when the pretrained embedding is known (issue 11, item 6)."""

import json
import warnings

import pytest
import torch
from conftest import VOCAB, tiny_model, train_adapter_a_little
from peft import LoraConfig, get_peft_model
from peft.tuners import lora as peft_lora

from tie_guard.cli import main as cli_main
from tie_guard.events import EventLog
from tie_guard.merge import safe_merge_and_unload
from tie_guard.watch import TieWatcher

EMB = "model.embed_tokens.weight"
REWRITING = {"pissa": {"init_lora_weights": "pissa"}, "pissa_niter_4": {"init_lora_weights": "pissa_niter_4"},
             "olora": {"init_lora_weights": "olora"}}
if hasattr(peft_lora, "KasaConfig"):  # KaSA came with PEFT 0.19
    REWRITING["kasa"] = {"kasa_config": peft_lora.KasaConfig()}
NO_KASA = pytest.mark.skipif("kasa" not in REWRITING, reason="this PEFT has no KaSA (added in 0.19)")


def _inits(*names):
    """``names`` that this PEFT offers, as pytest params (KaSA marked skipped where PEFT lacks it)."""
    return [pytest.param(n, marks=NO_KASA) if n == "kasa" else n for n in names]


def _adapter_model(init_kwargs, train=True):
    """Tiny tied Llama (seed 0) + LoRA r=4 on lm_head and q_proj; also returns the untouched pretrained model."""
    pretrained = tiny_model("llama_tied")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's generic tied-layer warning
        pm = get_peft_model(tiny_model("llama_tied"),
                            LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"], **init_kwargs))
    if train:
        train_adapter_a_little(pm, steps=2)
    return pm, pretrained


def _emb(model):
    return model.get_input_embeddings().weight


def _setup_errors(pm):
    events = EventLog(log=False)
    TieWatcher(pm, events, combine=False).capture()
    return [e for e in events.events if e.event == "setup_warning" and e.level == "error"]


@pytest.mark.parametrize("init", sorted(REWRITING))
def test_rewriting_init_changes_tied_embedding_before_training_and_capture_says_so(init):
    pm, pretrained = _adapter_model(REWRITING[init], train=False)
    diff = (_emb(pm) - _emb(pretrained)).detach().abs()
    assert int((diff.amax(dim=1) > 0).sum()) == VOCAB  # every row rewritten by get_peft_model, no step taken
    assert 1e-3 < float(diff.max()) < 0.5
    assert _emb(pm) is pm.base_model.model.lm_head.base_layer.weight  # still one shared matrix
    errors = _setup_errors(pm)
    assert len(errors) == 1
    msg = errors[0].message
    assert ("kasa_config" if init == "kasa" else f"init_lora_weights={init!r}") in msg
    assert "lm_head" in msg and EMB in msg and "untie before get_peft_model" in msg and "plain init" in msg


@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_plain_init_no_rewrite_no_warning_and_merge_keeps_pretrained(init):
    pm, pretrained = _adapter_model({"init_lora_weights": init})
    assert torch.equal(_emb(pm), _emb(pretrained))
    assert _setup_errors(pm) == []
    merged, report = safe_merge_and_unload(pm)
    assert report.base_rewritten_by_init == []
    assert report.untrained_input_embeddings_bit_identical and torch.equal(_emb(merged), _emb(pretrained))
    assert not any("initialisation" in w for w in report.warnings)


@pytest.mark.parametrize("init", _inits("pissa", "kasa"))
def test_merge_without_original_reports_rewrite_and_claims_nothing(init):
    pm, pretrained = _adapter_model(REWRITING[init])
    merged, report = safe_merge_and_unload(pm)
    assert report.verified and report.logits_match  # the merged model is the trained one ...
    assert torch.equal(_emb(merged), _emb(pm)) and not torch.equal(_emb(merged), _emb(pretrained))
    assert not report.untrained_input_embeddings_bit_identical  # ... but its input embedding is not the pretrained one
    (rw,) = report.base_rewritten_by_init
    assert rw["init"] == init and rw["module"] == "lm_head" and rw["input_members"] == (EMB,)
    assert rw["restored"] is None and "original_base=" in rw["note"]
    assert ("initial_adapter=" in rw["note"]) == (init == "pissa")  # KaSA's truncation is lossy
    assert any(w.startswith(f"{init} initialisation") and "NOT the pretrained" in w for w in report.warnings)
    assert report.to_dict()["untrained_input_embeddings_bit_identical"] is False


@pytest.mark.parametrize("init", _inits("pissa", "olora", "kasa"))
def test_untie_merge_restores_pretrained_embedding_from_original_base(init, tmp_path):
    pm, pretrained = _adapter_model(REWRITING[init])
    rewritten = _emb(pm).detach().clone()
    head_before = pm.base_model.model.lm_head
    merged, report = safe_merge_and_unload(pm, original_base=pretrained, output_dir=tmp_path / "m")
    assert torch.equal(_emb(merged), _emb(pretrained))  # bit-exact restore
    assert torch.equal(_emb(pm), rewritten) and pm.base_model.model.lm_head is head_before  # adapter model untouched
    (rw,) = report.base_rewritten_by_init
    assert rw["restored"] == "original" and rw["rows_changed"] == VOCAB and rw["max_abs_change"] > 1e-3
    # The head keeps its trained value W_res + s·B·A; the input side moved back, so logits move (reported).
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        shift = float((merged(input_ids=ids).logits - pm(input_ids=ids).logits).abs().max())
        w_eff = pm.base_model.model.lm_head(torch.eye(32)).T  # PEFT's own forward on the identity: W_eff
    assert torch.allclose(merged.lm_head.weight, w_eff, atol=1e-6)
    assert shift > 1e-2 and 0 < rw["restore_logit_shift"] < 10
    assert report.untrained_input_embeddings_bit_identical and report.reload_input_embeddings_match_merged
    on_disk = json.loads((tmp_path / "m" / "tie_guard_merge_report.json").read_text())
    assert on_disk["base_rewritten_by_init"][0]["restored"] == "original"
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert torch.equal(_emb(reloaded), _emb(pretrained)) and torch.equal(reloaded.lm_head.weight, merged.lm_head.weight)


def test_untie_merge_rebuilds_pissa_embedding_from_initial_adapter(tmp_path):
    pm, pretrained = _adapter_model(REWRITING["pissa"], train=False)
    pm.save_pretrained(tmp_path / "init")  # PEFT's path_initial_model_for_weight_conversion
    train_adapter_a_little(pm, steps=2)
    merged, report = safe_merge_and_unload(pm, initial_adapter=tmp_path / "init")
    (rw,) = report.base_rewritten_by_init
    assert rw["restored"] == "initial_adapter"
    err = float((_emb(merged) - _emb(pretrained)).detach().abs().max())
    assert err <= 1e-6  # W_res + s·B0·A0: float rounding only (rewrite itself was up to ~0.05)
    assert not report.untrained_input_embeddings_bit_identical  # not claimed bit-exact
    assert any("exact up to float rounding" in w for w in report.warnings)


@NO_KASA
def test_kasa_is_not_rebuilt_from_initial_adapter(tmp_path):
    pm, pretrained = _adapter_model(REWRITING["kasa"], train=False)
    pm.save_pretrained(tmp_path / "init")
    train_adapter_a_little(pm, steps=2)
    merged, report = safe_merge_and_unload(pm, initial_adapter=tmp_path / "init")
    (rw,) = report.base_rewritten_by_init
    assert rw["restored"] is None and "discards information" in rw["note"]
    assert torch.equal(_emb(merged), _emb(pm)) and not report.untrained_input_embeddings_bit_identical


def test_verify_against_original_base_names_the_init(tmp_path, capfd):
    pretrained = tiny_model("llama_tied")
    pretrained.save_pretrained(tmp_path / "base")
    results = {}
    for init in [i for i in ("pissa", "olora", "kasa", "pissa_niter_4") if i in REWRITING]:
        pm, _ = _adapter_model(REWRITING[init])
        pm.save_pretrained(tmp_path / f"adapter_{init}")
        safe_merge_and_unload(pm, output_dir=tmp_path / init)
        # pissa_niter's randomised SVD is not recognisable from the weights: the adapter's config names it.
        extra = ["--adapter", str(tmp_path / f"adapter_{init}")] if init == "pissa_niter_4" else []
        rc = cli_main(["verify", str(tmp_path / init), "--base", str(tmp_path / "base"), "--json", *extra])
        results[init] = (rc, json.loads(capfd.readouterr().out))
    for init, (rc, rep) in results.items():
        assert rc == 1 and not rep["sound"], init
        assert rep["base_rewritten_by_init"] == init
        assert any(f"by a {init} rewrite" in p and "original_base=" in p for p in rep["problems"]), rep["problems"]
    # The restored merge is sound against the original base.
    pm, _ = _adapter_model(REWRITING["pissa"])
    safe_merge_and_unload(pm, original_base=pretrained, output_dir=tmp_path / "restored")
    rc = cli_main(["verify", str(tmp_path / "restored"), "--base", str(tmp_path / "base"), "--json"])
    rep = json.loads(capfd.readouterr().out)
    assert rc == 0 and rep["sound"] and rep["input_embedding_rows_changed"] == 0 and rep["base_rewritten_by_init"] is None
