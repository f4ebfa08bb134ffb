"""2 gloo ranks on CPU, started with ``accelerate launch`` (configs/accelerate/two_process_test.yaml): DDP through
the Trainer callback, a custom Accelerate loop, and FSDP2 (``fully_shard``) in the same loop. The same invariants as
the single-process tests: the groups, a break on rank 1 only caught and reported once (naming rank 1) with both
ranks stopping together, a verified merge whose input embeddings are bit-identical to the base model's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PEFT_TIES_MODULES_TO_SAVE_ONLY, ROOT
from distributed_worker import tiny_tied_llama
from transformers import AutoModelForCausalLM
from wandb_reader import find_run_dir, read_run

from tie_guard.events import read_events

CONFIG = ROOT / "configs" / "accelerate" / "two_process_test.yaml"
BREAK_MARK = "(rank 1)"


def launch(scenario: str, out: Path) -> str:
    """Run tests/distributed_worker.py on 2 ranks; returns the launcher's combined output."""
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(accelerate), "launch", "--config_file", str(CONFIG),
                           str(ROOT / "tests" / "distributed_worker.py"), scenario, str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


def ranks(run_dir: Path) -> list[dict]:
    return [json.loads((run_dir / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Each scenario launched once (~15 s each); the tests below read what the ranks left."""
    root = tmp_path_factory.mktemp("dist")
    return {s: (root / s, launch(s, root / s)) for s in ("trainer", "loop", "fsdp2")}


def assert_verified_merge_of(run_dir: Path) -> dict:
    """Rank 0's merge report: verified, logits within tolerance; and the merged model is on disk."""
    report = json.loads((run_dir / "tie_guard_merge_report.json").read_text())
    assert report["verified"] and report["max_abs_logit_diff"] <= report["logit_tolerance"]
    assert (run_dir / "merged" / "config.json").is_file()
    return report


def assert_verified_merge(run_dir: Path):
    """The merged model rank 0 saved: verified, input embeddings bit-identical to the base model's, untied on disk."""
    assert_verified_merge_of(run_dir)
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged")
    base = tiny_tied_llama()
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert not torch.equal(merged.lm_head.weight, base.lm_head.weight)  # the head's delta is in
    assert merged.config.tie_word_embeddings is False
    return merged


@pytest.mark.parametrize("scenario", ["trainer", "loop", "fsdp2"])
def test_clean_run_captures_watches_and_merges_on_rank0_only(launched, scenario):
    out, _ = launched[scenario]
    run = out / "clean"
    r0, r1 = ranks(run)
    assert (r0["world"], r1["world"]) == (2, 2)
    assert r0["global_step"] == r1["global_step"] == 4 and r0["status"] == r1["status"] == "ok"
    assert r0["divergence"]["lm_head"] > 0 and r0["divergence"] == r1["divergence"]  # combined: the same everywhere
    events = read_events(run / "tie_guard_events.jsonl")  # written by rank 0 alone: one capture, one per step
    capture = [e for e in events if e["event"] == "capture"]
    assert len(capture) == 1
    assert [(g["group"], g["member"], g["status"]) for g in capture[0]["data"]["groups"]] == [
        ("lm_head", "model.embed_tokens.weight", "tied"), ("lm_head", "lm_head.weight", "tied")]
    checks = [e["step"] for e in events if e["event"] == "check"]
    # one check per step; the loop's save_state at step 2 adds one more
    assert checks == ([1, 2, 2, 3, 4] if scenario != "trainer" else [1, 2, 3, 4])
    assert not [e for e in events if e["event"] == "break"]
    assert_verified_merge(run)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("rank")) == ["rank0.json", "rank1.json"]
    if scenario == "fsdp2":
        assert r0["sharded"] == "DTensor"


@pytest.mark.parametrize("scenario", ["trainer", "fsdp2"])
def test_break_on_rank1_is_reported_once_and_both_ranks_stop(launched, scenario):
    out, log = launched[scenario]
    run = out / "broken"
    r0, r1 = ranks(run)
    assert r0["global_step"] == r1["global_step"] == 2  # on_break="stop" on both ranks at the same step
    assert r0["status"] == r1["status"] == "broken"
    breaks = [e for e in read_events(run / "tie_guard_events.jsonl") if e["event"] == "break"]
    kind = "tie_broken" if scenario == "trainer" else "frozen_modified"
    assert [(b["step"], b["data"]["kind"], b["data"]["ranks"]) for b in breaks] == [(2, kind, [1])]
    assert log.count(BREAK_MARK) == 1  # Python logging: once, from rank 0, naming rank 1


def test_trainer_wandb_run_only_on_rank0(launched):
    out, _ = launched["trainer"]
    for name, alerts in (("clean", 0), ("broken", 1)):
        runs = list((out / name).rglob("offline-run-*"))
        assert len(runs) == 1, runs
        rec = read_run(find_run_dir(out / name))
        assert len(rec["alerts"]) == alerts
        assert rec["summary"]["tie_guard/status"] == ("ok" if name == "clean" else "broken")
        steps = [h["train/global_step"] for h in rec["history"] if "tie_guard/breaks" in h]
        assert steps[:2] == [1, 2]


@pytest.mark.parametrize("run", ["clean", "mts"])
def test_fsdp2_matches_ddp(launched, run):
    """The same loop, data and seed under DDP and FSDP2, with LoRA on the head (``clean``: low-rank divergence from
    row shards + the gathered A factor) or a modules_to_save copy of it (``mts``: chunked difference over local rows):
    the divergence from shards equals the one from replicas, and the merged models agree."""
    ddp, fsdp = ranks(launched["loop"][0] / run)[0], ranks(launched["fsdp2"][0] / run)[0]
    assert ddp["status"] == fsdp["status"] == "ok" and ddp["global_step"] == fsdp["global_step"] == 4
    assert ddp["divergence"]["lm_head"] > 0
    assert fsdp["divergence"]["lm_head"] == pytest.approx(ddp["divergence"]["lm_head"], rel=1e-5)
    a = assert_verified_merge(launched["loop"][0] / run).lm_head.weight
    b = assert_verified_merge(launched["fsdp2"][0] / run).lm_head.weight
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scenario", ["loop", "fsdp2"])
def test_save_state_checkpoint_is_checked(launched, scenario):
    state = json.loads((launched[scenario][0] / "clean" / "checkpoint-2" / "tie_guard_state.json").read_text())
    assert state["check"]["step"] == 2 and state["check"]["ok"] and state["check"]["divergence"]["lm_head"] > 0
    assert state["attributes"]["resume_baseline"]["lm_head"]["physical"] is True


def test_ranks_with_different_groups_fail_together(launched):
    r0, r1 = ranks(launched["loop"][0] / "mismatch")
    assert r0["error"] == r1["error"]
    assert "ranks see different tie groups" in r0["error"] and "rank 1: []" in r0["error"] and "Fix:" in r0["error"]


@pytest.mark.integration
def test_example_accelerate_loop_on_smollm2(tmp_path, smollm2_dir):
    """scripts/train_accelerate_loop.py on 2 ranks with real SmolLM2 and real chats: save_state checked, verified
    merge on rank 0, one W&B run (Accelerate's tracker, which tie_guard logs into)."""
    accelerate = Path(sys.executable).parent / "accelerate"
    out = tmp_path / "run"
    proc = subprocess.run(
        [str(accelerate), "launch", "--config_file", str(CONFIG), str(ROOT / "scripts/train_accelerate_loop.py"),
         "--config", str(ROOT / "configs/smollm2_lora.yaml"), "--output_dir", str(out), "--max_steps", "3",
         "--per_device_train_batch_size", "1", "--max_length", "64", "--max_conversations", "16",
         "--check_every", "1", "--save_strategy", "steps", "--save_steps", "2"],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
        env={**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads((out / "tie_guard_merge_report.json").read_text())
    assert report["verified"] and report["max_abs_logit_diff"] <= report["logit_tolerance"]
    assert all(e["equals_base"] for e in report["input_embeddings"])
    state = json.loads((out / "checkpoint-2" / "tie_guard_state.json").read_text())
    assert state["check"]["ok"] and state["check"]["step"] == 2
    rec = read_run(find_run_dir(out))
    assert len(list(out.rglob("offline-run-*"))) == 1
    assert rec["summary"]["tie_guard/status"] == "ok" and rec["summary"]["tie_guard/merge/verified"] == 1
    assert [h["train/global_step"] for h in rec["history"] if "tie_guard/breaks" in h][:3] == [1, 2, 2]


def test_one_small_collective_per_check(launched):
    """torch's CommDebugMode around one check: DDP and FSDP2 issue one all_reduce; with the divergence, FSDP2 adds one
    all-gather (the LoRA A factor, r × hidden): no vocab × hidden matrix is gathered."""
    ddp = ranks(launched["loop"][0] / "clean")[0]["comm_counts"]
    fsdp = ranks(launched["fsdp2"][0] / "clean")[0]["comm_counts"]
    assert ddp == {"divergence=False": {"allreduce_": 1}, "divergence=True": {"allreduce_": 1}}
    assert fsdp == {"divergence=False": {"allreduce_": 1},
                    "divergence=True": {"all_gather_into_tensor": 1, "allreduce_": 1}}


def test_resume_compares_with_the_save_state_checkpoint(launched):
    out, log = launched["loop"]
    r0, r1 = ranks(out / "resume")
    assert r0["status"] == r1["status"] == "broken"
    breaks = [e for e in read_events(out / "resume" / "tie_guard_events.jsonl") if e["event"] == "break"]
    # once at resume_from=..., once more from accelerator.load_state(...) (its pre-hook): each reported once
    assert [(b["step"], b["data"]["kind"], b["data"]["ranks"]) for b in breaks] == [(2, "tie_broken", [0, 1])] * 2
    assert "since the checkpoint" in breaks[0]["message"] and log.count("since the checkpoint") == 2
    assert "tie_guard_state.json not found" in r0["missing_state_error"] and "Fix:" in r0["missing_state_error"]


def test_fsdp2_shard_groups_that_split_a_tie_are_named(launched):
    out, _ = launched["fsdp2"]
    r0, _ = ranks(out / "split")
    assert r0["groups"] == [[["model.embed_tokens.weight", "lm_head.weight"], "declared_not_tied"]]
    errors = [e["message"] for e in read_events(out / "split" / "tie_guard_events.jsonl")
              if e["event"] == "setup_warning" and e["level"] == "error"]
    assert len(errors) == 1 and "model.embed_tokens.weight in model.embed_tokens" in errors[0]
    assert "lm_head.weight in the root group" in errors[0] and "Fix: fully_shard only the decoder layers" in errors[0]
    assert r0["rank0_alone_findings"] == []  # TieWatcher(combine=False) checked on rank 0 alone, without waiting


def test_fsdp2_other_peft_doors(launched):
    """Trainable tokens: the divergence is not computed on shards (one warning, naming why), the rest is checked and
    the merge verified. modules_to_save of both embeddings with ensure_weight_tying: one shared copy, divergence 0."""
    out, _ = launched["fsdp2"]
    r0, r1 = ranks(out / "setups")
    for rec in (r0, r1):
        assert rec["trainable_tokens"] == {"divergence": {}, "findings": [], "status": "ok"}
        if PEFT_TIES_MODULES_TO_SAVE_ONLY:  # PEFT 0.18 trains the two copies separately: divergence measured
            assert rec["modules_to_save_tied"]["divergence"]["lm_head"] > 0
            assert rec["modules_to_save_tied"]["findings"] == [] and rec["modules_to_save_tied"]["status"] == "ok"
        else:
            assert rec["modules_to_save_tied"] == {"divergence": {"lm_head": 0.0}, "findings": [], "status": "ok"}
    for name in ("trainable_tokens", "modules_to_save_tied"):
        assert_verified_merge_of(out / "setups" / name)
    warnings = [e["message"] for e in read_events(out / "setups" / "trainable_tokens" / "tie_guard_events.jsonl")
                if e["event"] == "setup_warning" and "not computed on sharded weights" in e["message"]]
    assert len(warnings) == 1 and "'rows' change" in warnings[0]
