"""`tie-guard verify` blames only what the evidence shows: a base of another shape is a usage error naming both
shapes; a plain merge is named when the change is the adapter's head delta (or low-rank); other weights are "not
from this base"."""

import json

import pytest
import torch
from conftest import VOCAB, tiny_model, train_adapter_a_little
from peft import LoraConfig, get_peft_model

from tie_guard.cli import main


@pytest.fixture
def dirs(tmp_path):
    base = tiny_model("llama_tied")
    base.save_pretrained(tmp_path / "base")
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]))
    train_adapter_a_little(pm, steps=3)
    pm.save_pretrained(tmp_path / "adapter")
    pm.merge_and_unload().save_pretrained(tmp_path / "plain")  # PEFT's own merge: the shared matrix gets the delta
    tiny_model("gpt2").save_pretrained(tmp_path / "gpt2")
    tiny_model("llama_tied", seed=1).save_pretrained(tmp_path / "other_llama")
    return tmp_path


def verify(capfd, *argv):
    rc = main(["verify", *map(str, argv)])
    out, err = capfd.readouterr()
    return rc, out, err


def test_base_of_another_architecture_is_a_usage_error(dirs, capfd):
    rc, out, err = verify(capfd, dirs / "plain", "--base", dirs / "gpt2", "--adapter", dirs / "adapter")
    assert rc == 2 and out == ""
    assert "GPT2LMHeadModel" in err and f"({VOCAB}, 32)" in err and "LlamaForCausalLM" in err and "Fix:" in err


@pytest.mark.parametrize("with_adapter", [True, False])
def test_plain_merge_is_named_with_its_evidence(dirs, capfd, with_adapter):
    extra = ["--adapter", dirs / "adapter"] if with_adapter else []
    rc, out, _ = verify(capfd, dirs / "plain", "--base", dirs / "base", "--json", *extra)
    rep = json.loads(out)
    assert rc == 1 and rep["input_embedding_rows_changed"] == VOCAB
    (problem,) = [p for p in rep["problems"] if "input embeddings" in p]
    assert "a plain merge" in problem
    assert ("head delta" if with_adapter else "rank 4") in problem


def test_other_weights_are_not_blamed_on_a_plain_merge(dirs, capfd):
    rc, out, _ = verify(capfd, dirs / "other_llama", "--base", dirs / "base", "--json")
    rep = json.loads(out)
    assert rc == 1
    (problem,) = [p for p in rep["problems"] if "input embeddings" in p]
    assert "does not come from this base" in problem and "plain merge" not in problem
    assert rep["input_embedding_rows_changed"] == VOCAB
    assert torch.isfinite(torch.tensor(rep["input_embedding_max_abs_change"]))
