"""The tie-guard console script, run as a subprocess against real SmolLM2 and an adapter trained here."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, train_adapter_a_little
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from tie_guard import TieGuardCallback

CLI = [sys.executable, "-m", "tie_guard.cli"]


def run(*args, timeout=600):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def tree_hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def adapter_dir(smollm2_dir, tmp_path_factory):
    """A LoRA adapter (lm_head, q_proj, v_proj) trained a few real steps on real SmolLM2."""
    out = tmp_path_factory.mktemp("adapter")
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    pm = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["lm_head", "q_proj", "v_proj"]))
    train_adapter_a_little(pm, steps=2, lr=2e-3, vocab=49152)
    pm.save_pretrained(out)
    return out


pytestmark = pytest.mark.integration


def test_merge_then_verify_is_sound(smollm2_dir, adapter_dir, tmp_path):
    before = {**tree_hashes(Path(smollm2_dir)), **{f"a/{k}": v for k, v in tree_hashes(adapter_dir).items()}}
    proc = run("merge", smollm2_dir, adapter_dir, tmp_path / "out", "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["verified"] and summary["untrained_input_embeddings_bit_identical"]
    assert summary["max_abs_logit_diff"] <= summary["logit_tolerance"]
    for f in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
              "tie_guard_merge_report.json"):
        assert (tmp_path / "out" / f).is_file(), f
    after = {**tree_hashes(Path(smollm2_dir)), **{f"a/{k}": v for k, v in tree_hashes(adapter_dir).items()}}
    assert after == before

    proc = run("verify", tmp_path / "out", "--base", smollm2_dir, "--adapter", adapter_dir, "--json")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    audit = json.loads(proc.stdout)
    assert audit["sound"] and audit["input_embedding_rows_changed"] == 0
    assert audit["max_abs_logit_diff"] <= audit["logit_tolerance"]
    assert audit["tie_flags"] == {"config.tie_word_embeddings": False}

    proc = run("merge", smollm2_dir, adapter_dir, tmp_path / "out", "--quiet")
    assert proc.returncode == 2 and "--force" in proc.stderr


def test_plain_peft_checkpoint_fails_verify(smollm2_dir, adapter_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    plain.save_pretrained(tmp_path / "plain")
    proc = run("verify", tmp_path / "plain", "--base", smollm2_dir, "--adapter", adapter_dir)
    assert proc.returncode == 1
    assert "UNSOUND" in proc.stdout and "input embeddings changed in 49152 of 49152 rows" in proc.stdout
    proc = run("verify", tmp_path / "plain", "--base", smollm2_dir, "--json")
    audit = json.loads(proc.stdout)
    assert proc.returncode == 1 and audit["input_embedding_rows_changed"] == 49152
    assert len(audit["changed_tokens"]) == 10 and audit["changed_tokens"][0]["token"]


def test_interrupted_merge_leaves_no_output(smollm2_dir, adapter_dir, tmp_path):
    before = {**tree_hashes(Path(smollm2_dir)), **{f"a/{k}": v for k, v in tree_hashes(adapter_dir).items()}}
    out = tmp_path / "out"
    proc = subprocess.Popen([*CLI, "merge", str(smollm2_dir), str(adapter_dir), str(out), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    killed = False
    while time.time() < deadline and proc.poll() is None:
        tmp = [p for p in tmp_path.glob(".out.tmp-*") if any(p.iterdir())]
        if tmp:  # the save has started writing
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    proc.wait()
    assert killed, "merge finished before it could be interrupted"
    assert not out.exists()
    after = {**tree_hashes(Path(smollm2_dir)), **{f"a/{k}": v for k, v in tree_hashes(adapter_dir).items()}}
    assert after == before


def test_inspect_json_names_what_the_adapter_touches(smollm2_dir, adapter_dir):
    proc = run("inspect", smollm2_dir, "--adapter", adapter_dir, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout)
    rows = {r["member"]: r for r in info["groups"]}
    assert rows["lm_head.weight"]["touched_by"] == "lora[default]"
    assert rows["model.embed_tokens.weight"]["touched_by"] == "-"
    assert info["plain_merge_changes_input_embeddings"] is True
    assert info["divergence"]["lm_head"] > 0
    assert any("merge_and_unload" in w["message"] for w in info["warnings"])
    proc = run("inspect", smollm2_dir)
    assert proc.returncode == 0 and "lm_head" in proc.stdout and "tied" in proc.stdout


def test_usage_errors_exit_2(tmp_path):
    assert run("verify", tmp_path).returncode == 2  # --base missing
    proc = run("merge", tmp_path / "nope", tmp_path / "nope2", tmp_path / "out")
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Fix:" in proc.stderr


def test_report_png(tmp_path):
    import matplotlib.image as mpimg

    pm = get_peft_model(tiny_model("gemma2"), LoraConfig(r=4, target_modules=["lm_head"]))
    ids = torch.randint(0, 256, (24, 16), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True)
    Trainer(model=pm, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids],
            callbacks=[TieGuardCallback(check_every=1)]).train()
    proc = run("report", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    png = Path(proc.stdout.strip())
    assert png == tmp_path / "run" / "tie_guard_report.png"
    img = mpimg.imread(png)
    assert img.shape[0] == 1000 and img.shape[1] == 1000
    rgb = img[..., :3]
    assert rgb.std() > 0.05  # not blank
    assert (rgb < 0.5).mean() > 0.005  # lines and text drawn


@pytest.mark.integration
def test_benchmark_smoke(tmp_path):
    """The benchmark is not a timed test: CI only checks that it runs (tiny models) and prints its table."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "scripts" / "benchmark.py"),
                           "--smoke", "--out", str(tmp_path / "bench.json")], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| tie_guard check, % of step |" in proc.stdout
    result = json.loads((tmp_path / "bench.json").read_text())
    assert set(result["models"]) == {"smollm2-135m-instruct", "gemma-3-270m"}
    assert result["job"]["tie_guard_s"] > 0
