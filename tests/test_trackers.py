"""tie_guard's metrics in every tracker a Trainer run reports to, read back from each tracker's real local store.

One tiny Trainer run (tied Llama, LoRA on lm_head, 4 steps, checks every 2) reports to TensorBoard, MLflow
(sqlite store) and Trackio (local sqlite) at once; each test reads its tracker's store with the tracker's own
reader. Nothing reaches the network.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path

# Trackio reads TRACKIO_DIR when it is first imported: point it at a temporary folder before any import of it.
os.environ.setdefault("TRACKIO_DIR", tempfile.mkdtemp(prefix="tie_guard_trackio_"))

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import VOCAB, tiny_model  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from tie_guard import TieGuardCallback, TieGuardConfig  # noqa: E402
from tie_guard.events import read_events  # noqa: E402
from tie_guard.sinks import resolve_sinks  # noqa: E402

PROJECT = "tie_guard_trackers_test"


HAS_TRACKIO = importlib.util.find_spec("trackio") is not None


def _dataset(n=16, seq=16, seed=0):
    ids = torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": r, "labels": r} for r in ids]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The run: returns (output_dir, the JSONL check events, mlflow tracking uri, trackio run name)."""
    tmp = tmp_path_factory.mktemp("trackers")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": PROJECT}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    name = f"run-{tmp.name}"
    from mlflow import MlflowClient

    # artifacts (the groups table) under tmp too: a sqlite store's default artifact root is ./mlruns
    MlflowClient(tracking_uri=uri).create_experiment(PROJECT, artifact_location=(tmp / "artifacts").as_uri())
    try:
        pm = get_peft_model(tiny_model("llama_tied"), LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"]))
        args = TrainingArguments(
            output_dir=str(tmp / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
            report_to=["tensorboard", "mlflow"] + (["trackio"] if HAS_TRACKIO else []), logging_steps=2, save_strategy="no", use_cpu=True,
            seed=0, dataloader_num_workers=0, run_name=name, project=PROJECT,
        )
        cb = TieGuardCallback(check_every=2)
        Trainer(model=pm, args=args, train_dataset=_dataset(), callbacks=[cb]).train()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    events = read_events(tmp / "out" / "tie_guard_events.jsonl")
    assert cb.status == "ok" and cb.merge_report.verified
    return tmp / "out", events, uri, name


def _checks(events):
    checks = [e for e in events if e["event"] == "check"]
    assert [e["step"] for e in checks] == [2, 4]  # the end reuses the step-4 check
    return checks


def test_tensorboard_gets_divergence_breaks_and_merge_at_trainer_steps(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, events, _, _ = run
    run_dirs = list((out / "runs").iterdir())
    assert len(run_dirs) == 1  # tie_guard wrote into the TensorBoardCallback's own run directory
    acc = EventAccumulator(str(run_dirs[0]), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert "train/loss" in scalars  # the Trainer's own logs, same run
    div = [(s.step, s.value) for s in acc.Scalars("tie_guard/divergence/lm_head")]
    assert [s for s, _ in div] == [2, 4]
    assert [v for _, v in div] == pytest.approx([e["metrics"]["divergence/lm_head"] for e in _checks(events)],
                                                rel=1e-6)  # float32 in the event file
    assert all(0 < v < 10 for _, v in div)
    assert [(s.step, s.value) for s in acc.Scalars("tie_guard/breaks")] == [(2, 0.0), (4, 0.0)]
    assert [s.step for s in acc.Scalars("train/loss")] == [2, 4]  # same steps as the Trainer's loss
    merge = acc.Scalars("tie_guard/merge/verified")
    assert [(s.step, s.value) for s in merge] == [(4, 1.0)]
    assert acc.Scalars("tie_guard/merge/max_abs_logit_diff")[0].value <= 1e-4
    texts = acc.Tags()["tensors"]
    assert "tie_guard/groups/text_summary" in texts and "tie_guard/status/text_summary" in texts
    status = acc.Tensors("tie_guard/status/text_summary")[-1]
    assert status.tensor_proto.string_val[0] == b"ok"


def test_mlflow_gets_metrics_table_and_final_tags_in_the_trainers_run(run):
    from mlflow import MlflowClient

    out, events, uri, name = run
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(PROJECT)
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_name for r in runs] == [name]  # one run: the Trainer's, not a second one
    run_id = runs[0].info.run_id
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [2, 4]
    div = client.get_metric_history(run_id, "tie_guard/divergence/lm_head")
    assert [(m.step, m.value) for m in div] == [(e["step"], e["metrics"]["divergence/lm_head"])
                                                for e in _checks(events)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "tie_guard/breaks")] == [(2, 0), (4, 0)]
    merge = client.get_metric_history(run_id, "tie_guard/merge/verified")
    assert [(m.step, m.value) for m in merge] == [(4, 1.0)]  # logged after MLflowCallback ended the run
    tags = client.get_run(run_id).data.tags
    assert tags["tie_guard/status"] == "ok" and tags["tie_guard/groups"] == "1"
    table = json.loads(Path(client.download_artifacts(run_id, "tie_guard/groups.json", str(out))).read_text())
    member = table["columns"].index("member")
    assert [row[member] for row in table["data"]] == ["model.embed_tokens.weight", "lm_head.weight"]


@pytest.mark.skipif(not HAS_TRACKIO, reason="trackio needs huggingface-hub 1.x, which transformers 4.x refuses: "
                    "not installed on the old stack")
def test_trackio_gets_records_with_the_trainers_global_step(run):
    from trackio.sqlite_storage import SQLiteStorage

    out, events, _, name = run
    logs = SQLiteStorage.get_logs(PROJECT, name)
    assert [r["train/global_step"] for r in logs if "train/loss" in r] == [2, 4]
    div = [(r["train/global_step"], r["tie_guard/divergence/lm_head"]) for r in logs
           if "tie_guard/divergence/lm_head" in r]
    assert div == [(e["step"], e["metrics"]["divergence/lm_head"]) for e in _checks(events)]
    merge = [r for r in logs if "tie_guard/merge/verified" in r]
    assert len(merge) == 1 and merge[0]["train/global_step"] == 4 and merge[0]["tie_guard/merge/verified"] == 1
    final = [r for r in logs if "tie_guard/summary/status" in r]
    assert len(final) == 1 and final[0]["tie_guard/summary/status"] == "ok"
    groups = [r for r in logs if "tie_guard/groups" in r]
    assert len(groups) == 1 and groups[0]["train/global_step"] == 0
    assert SQLiteStorage.get_alerts(PROJECT, run_name=name) == []


def test_missing_tracker_package_warns_once_with_the_install_line(tmp_path, monkeypatch, caplog):
    import importlib.util

    from tie_guard.sinks import base

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a, **k: None if n == "mlflow" else real(n, *a, **k))
    monkeypatch.setattr(base, "_warned", set())  # as in a fresh process
    with caplog.at_level("WARNING", logger="tie_guard"):
        first = resolve_sinks(TieGuardConfig(), tmp_path, report_to=["mlflow"])
        second = resolve_sinks(TieGuardConfig(), tmp_path, report_to=["mlflow"])
    assert first == [] and second == []
    msgs = [r.getMessage() for r in caplog.records if "mlflow" in r.getMessage()]
    assert len(msgs) == 1 and 'pip install "tie_guard[mlflow]"' in msgs[0] and "mlflow-skinny" in msgs[0]


def test_accelerate_loop_logs_into_the_accelerators_tensorboard_tracker(tmp_path):
    from accelerate import Accelerator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tie_guard import guard_accelerator

    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path / "tb"))
    accelerator.init_trackers("loop")
    pm = get_peft_model(tiny_model("llama_tied"), LoraConfig(r=4, target_modules=["lm_head"]))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    model, opt = accelerator.prepare(pm, opt)
    guard = guard_accelerator(accelerator, model, output_dir=tmp_path / "out", check_every=1, merge_at_end=False)
    for step, batch in enumerate(_dataset(n=8), 1):
        loss = model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        accelerator.log({"loss": loss.item()}, step=step)
        guard.step(step)
        if step == 3:
            break
    guard.finish(accelerator.unwrap_model(model))
    accelerator.end_training()
    acc = EventAccumulator(str(tmp_path / "tb" / "loop"))
    acc.Reload()
    assert [s.step for s in acc.Scalars("loss")] == [1, 2, 3]
    div = acc.Scalars("tie_guard/divergence/lm_head")
    assert [s.step for s in div] == [1, 2, 3] and all(s.value > 0 for s in div)
    assert not list((tmp_path / "out").glob("runs"))  # the accelerator's writer, not an own one


def test_report_to_all_and_tracker_settings():
    from tie_guard.sinks import requested_trackers

    everything = TrainingArguments(output_dir="unused", report_to="all").report_to  # transformers expands "all"
    assert {"wandb", "tensorboard", "mlflow"} | ({"trackio"} if HAS_TRACKIO else set()) <= set(
        requested_trackers("auto", everything))
    assert requested_trackers("none", everything) == []
    assert requested_trackers("mlflow, trackio", ["wandb"]) == ["mlflow", "trackio"]
    with pytest.raises(ValueError, match="trackers must be"):
        TieGuardConfig(trackers="tensorboard,comet")
