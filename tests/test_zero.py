"""DeepSpeed ZeRO-3 and ZeRO-2 run for real on CPU (``DS_ACCELERATOR=cpu``: DeepSpeed's CPU accelerator over gloo),
on 1 and 2 ranks, started with ``accelerate launch --config_file configs/accelerate/zero3_cpu.yaml`` (ZeRO-2:
``--zero_stage 2``). tests/zero_worker.py runs the Trainer + ``TieGuardCallback`` and a custom Accelerate loop with
``guard_accelerator``; each launch runs once (module fixture, ~20–60 s) and the tests read what the ranks left: the
tie found by identity on partitioned parameters, checks combined over ranks, a tie broken on rank 1 reported once,
the verified merge (input embeddings bit-identical to the base built from the same seed), the adapter of
``trainer.save_model()`` merged again with ``tie-guard merge``, and resuming from ZeRO checkpoints."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from distributed_worker import tiny_tied_llama
from safetensors.torch import load_file

from tie_guard.events import read_events

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="DeepSpeed is not installed: pip install -e '.[deepspeed]'")

CONFIG = ROOT / "configs" / "accelerate" / "zero3_cpu.yaml"
#: launch name → (processes, ZeRO stage, runs of tests/zero_worker.py, in order)
LAUNCHES = {
    "zero3-1rank": (1, 3, "trainer,trainer_resume,loop,loop_resume,loop_resume_broken"),
    "zero3-2ranks": (2, 3, "trainer,trainer_resume,trainer_broken,loop,loop_resume,loop_broken"),
    "zero2-2ranks": (2, 2, "trainer,loop"),
}
CLEAN = [(launch, run) for launch in LAUNCHES for run in ("trainer", "loop")]
ENV = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def launch_command(processes: int, stage: int, script: Path, *args: str) -> list[str]:
    """The ``accelerate launch`` command line of a ZeRO run on CPU (run with :data:`ENV`)."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    return [accelerate, "launch", "--config_file", str(CONFIG), "--num_processes", str(processes),
            "--zero_stage", str(stage), str(script), *args]


def run_launch(cmd: list[str]) -> tuple[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log, time.perf_counter() - t0


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """``launched(name)`` → ``(out, log)``: each launch of :data:`LAUNCHES` runs once, when a test first needs it."""
    root, done = tmp_path_factory.mktemp("zero"), {}

    def get(name: str) -> tuple[Path, str]:
        if name not in done:
            processes, stage, runs = LAUNCHES[name]
            log, seconds = run_launch(launch_command(processes, stage, ROOT / "tests" / "zero_worker.py", runs,
                                                     str(root / name)))
            print(f"{name}: {seconds:.1f} s")
            done[name] = (root / name, log)
        return done[name]

    return get


def ranks(run_dir: Path, processes: int) -> list[dict]:
    return [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(processes)]


def merged_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "merged" / "model.safetensors")


def assert_verified_merge(run_dir: Path) -> dict[str, torch.Tensor]:
    """Rank 0's merge: verified within tolerance; on disk the input embedding is bit-identical to the base model's
    (built from the same seed), the head carries the delta, and the tie flag is off."""
    report = json.loads((run_dir / "tie_guard_merge_report.json").read_text())
    assert report["verified"] and report["max_abs_logit_diff"] <= report["logit_tolerance"]
    assert report["reload_max_abs_logit_diff"] <= report["logit_tolerance"]
    assert report["untrained_input_embeddings_bit_identical"]
    weights, base = merged_weights(run_dir), tiny_tied_llama()
    assert torch.equal(weights["model.embed_tokens.weight"], base.model.embed_tokens.weight)
    assert not torch.equal(weights["lm_head.weight"], base.lm_head.weight)
    assert json.loads((run_dir / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    return weights


@pytest.mark.parametrize("name,run", CLEAN)
def test_clean_run_partitioned_tie_found_by_identity_checked_and_merged(launched, name, run):
    out, _ = launched(name)
    processes, stage, _ = LAUNCHES[name]
    recs = ranks(out / run, processes)
    for rec in recs:
        assert rec["world"] == processes and rec["global_step"] == 4 and rec["status"] == "ok"
        # ZeRO-3: one partitioned parameter (ds_id, empty data) for both names; ZeRO-2 keeps full replicas
        assert rec["partitioning"] == ({"ds_id": True, "data_numel": 0, "head_is_embedding": True} if stage == 3
                                       else {"ds_id": False, "data_numel": 256 * 32, "head_is_embedding": True})
        assert rec["groups"] == [[["model.embed_tokens.weight", "lm_head.weight"], "tied"]]
        assert rec["divergence"] == recs[0]["divergence"]  # combined over ranks: the same value everywhere
    assert recs[0]["divergence"]["lm_head"] > 0
    events = read_events(out / run / "tie_guard_events.jsonl")  # rank 0 alone writes
    assert len([e for e in events if e["event"] == "capture"]) == 1
    checks = [e["step"] for e in events if e["event"] == "check"]
    assert checks == ([1, 2, 3, 4] if run == "trainer" else [1, 2, 2, 3, 4])  # + the check of save_state
    assert not [e for e in events if e["event"] in ("break", "setup_warning") and e["level"] == "error"]
    assert_verified_merge(out / run)


def test_zero3_and_zero2_train_the_same(launched):
    """Same data, seed and 2 ranks: ZeRO-3 (partitioned) and ZeRO-2 (replicated parameters) give the same divergence
    and the same merged head."""
    for run in ("trainer", "loop"):
        z3 = ranks(launched("zero3-2ranks")[0] / run, 2)[0]["divergence"]["lm_head"]
        z2 = ranks(launched("zero2-2ranks")[0] / run, 2)[0]["divergence"]["lm_head"]
        assert z3 == pytest.approx(z2, rel=1e-5)
        a = merged_weights(launched("zero3-2ranks")[0] / run)["lm_head.weight"]
        b = merged_weights(launched("zero2-2ranks")[0] / run)["lm_head.weight"]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["zero3-2ranks", "zero2-2ranks"])
def test_save_model_adapter_merges_again_with_the_cli(launched, name):
    """``trainer.save_model()`` under ``zero3_save_16bit_model`` (gathered weights) wrote the adapter; ``tie-guard
    merge`` of it onto the saved base verifies and equals the callback's merge."""
    out, _ = launched(name)
    cli = subprocess.run([sys.executable, "-m", "tie_guard.cli", "merge", str(out / "base"),
                          str(out / "trainer" / "adapter"), str(out / "cli"), "--quiet"],
                         capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr[-3000:]
    summary = json.loads(cli.stdout)
    assert summary["verified"] and summary["untrained_input_embeddings_bit_identical"]
    assert summary["max_abs_logit_diff"] <= summary["logit_tolerance"]
    cli_weights = load_file(out / "cli" / "model.safetensors")
    callback = merged_weights(out / "trainer")
    assert torch.equal(cli_weights["model.embed_tokens.weight"], callback["model.embed_tokens.weight"])
    torch.testing.assert_close(cli_weights["lm_head.weight"], callback["lm_head.weight"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["zero3-1rank", "zero3-2ranks"])
def test_resume_from_zero3_checkpoint_compares_and_continues_exactly(launched, name):
    """The step-2 checkpoint carries tie_guard's state (Trainer: the callback state; loop: tie_guard_state.json);
    resuming from it (DeepSpeed's partitioned optimizer and parameter states) compares with that state and reaches
    the uninterrupted run's divergence and merged head."""
    out, _ = launched(name)
    processes = LAUNCHES[name][0]
    trainer_state = json.loads((out / "trainer" / "checkpoint-2" / "trainer_state.json").read_text())
    baseline = trainer_state["stateful_callbacks"]["TieGuardCallback"]["attributes"]["resume_baseline"]
    assert baseline["lm_head"]["physical"] is True and baseline["lm_head"]["digest"]
    loop_state = json.loads((out / "loop" / "checkpoint-2" / "tie_guard_state.json").read_text())
    assert loop_state["check"]["step"] == 2 and loop_state["check"]["ok"]
    assert loop_state["attributes"]["resume_baseline"]["lm_head"]["physical"] is True
    for run in ("trainer", "loop"):
        resumed, full = ranks(out / f"{run}_resume", processes), ranks(out / run, processes)
        assert [r["global_step"] for r in resumed] == [4] * processes and all(r["status"] == "ok" for r in resumed)
        assert resumed[0]["divergence"]["lm_head"] == pytest.approx(full[0]["divergence"]["lm_head"], rel=1e-6)
        events = read_events(out / f"{run}_resume" / "tie_guard_events.jsonl")
        resumes = [e for e in events if e["event"] == "resume"]
        # Trainer: the restored callback state; loop: resume_from=, then load_state's pre-hook
        assert [("match" in e["message"]) for e in resumes] == [True] * (1 if run == "trainer" else 2)
        assert not [e for e in events if e["event"] == "break"]
        a = assert_verified_merge(out / f"{run}_resume")["lm_head.weight"]
        torch.testing.assert_close(a, merged_weights(out / run)["lm_head.weight"], rtol=0, atol=1e-6)


def test_resume_with_tie_broken_since_the_zero3_checkpoint_is_reported_before_deepspeed_fails(launched):
    out, log = launched("zero3-1rank")
    (rec,) = ranks(out / "loop_resume_broken", 1)
    assert rec["status"] == "broken" and rec["groups"][0][1] == "declared_not_tied"
    breaks = [e for e in read_events(out / "loop_resume_broken" / "tie_guard_events.jsonl") if e["event"] == "break"]
    # by guard_accelerator(resume_from=...), before DeepSpeed's own KeyError; accelerate 1.15 runs load_state
    # pre-hooks only after DeepSpeed engines have loaded, so the hook never gets to compare here
    assert [(b["step"], b["data"]["kind"]) for b in breaks] == [(2, "tie_broken")]
    assert "since the checkpoint" in breaks[0]["message"] and "Fix:" in breaks[0]["message"]
    assert rec["load_state_error"] == "KeyError: 'base_model.model.lm_head.base_layer.weight'"


@pytest.mark.parametrize("run", ["trainer_broken", "loop_broken"])
def test_tie_broken_on_rank1_reported_once_all_ranks_stop_and_refuse_the_merge(launched, run):
    out, log = launched("zero3-2ranks")
    r0, r1 = ranks(out / run, 2)
    assert r0["global_step"] == r1["global_step"] == 2  # on_break="stop" on both ranks at the same step
    events = read_events(out / run / "tie_guard_events.jsonl")
    breaks = [e for e in events if e["event"] == "break"]
    assert [(b["step"], b["data"]["kind"], b["data"]["ranks"]) for b in breaks] == [(2, "tie_broken", [1])]
    # Python logging, rank 0 only: once per broken run of this launch (trainer_broken and loop_broken), naming rank 1
    assert log.count(breaks[0]["message"]) == 2 and breaks[0]["message"].endswith("(rank 1)")
    # The ranks' models differ (rank 1 has another head parameter): gathering would deadlock; both ranks refuse.
    assert r0["status"] == r1["status"] == "merge_failed" and not r0["merged"]
    (merge,) = [e for e in events if e["event"] == "merge"]
    assert merge["level"] == "error" and "ranks see different ZeRO-3 partitioned parameters" in merge["message"]
    assert "lm_head.base_layer.weight" in merge["message"] and "Fix:" in merge["message"]


def test_check_zero3_script_on_cpu(tmp_path):
    """scripts/check_zero3.py (its GPU mode unchanged) on CPU: a 4096 × 256 tied Llama, whose embedding is above
    DeepSpeed's persistence threshold and so partitioned with the default settings."""
    log, _ = run_launch(launch_command(1, 3, ROOT / "scripts" / "check_zero3.py", "--output_dir", str(tmp_path),
                                       "--max_steps", "4"))
    result = json.loads(next(line for line in log.splitlines() if line.startswith('{"groups"')))
    assert result["ok"] and result["merge_verified"] and result["embeddings_bit_identical_to_base"]
    assert result["cli_merge_exit"] == 0 and result["divergence"]["lm_head"] > 0
