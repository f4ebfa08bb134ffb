"""Runs into the same output_dir: each run's events carry a run id, `tie-guard report` says which run it draws and
can draw another, and a later run does not replace an earlier run's merged model unless asked (it stops at train
begin, before any step)."""

import hashlib

import pytest
from conftest import tiny_model
from peft import LoraConfig, get_peft_model
from test_callback import _args, _dataset
from transformers import Trainer

from tie_guard import TieGuardCallback
from tie_guard.cli import main
from tie_guard.events import read_events, split_runs


def _train(out, **guard):
    pm = get_peft_model(tiny_model("gemma2"), LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]))
    trainer = Trainer(model=pm, args=_args(out, steps=2, report_to=()), train_dataset=_dataset(),
                      callbacks=[TieGuardCallback(check_every=1, **guard)])
    trainer.train()
    return trainer


def _digest(d):
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file())).hexdigest()


def test_second_run_keeps_the_first_merge_unless_asked(tmp_path, capfd):
    out = tmp_path / "run"
    _train(out)
    first = _digest(out / "merged")
    with pytest.raises(FileExistsError, match="overwrite_merged=True"):
        _train(out)
    assert _digest(out / "merged") == first  # nothing replaced
    trainer = _train(out, overwrite_merged=True)
    assert trainer.state.global_step == 2 and _digest(out / "merged") != first

    runs = split_runs(read_events(out / "tie_guard_events.jsonl"))
    ids = [r[0]["run_id"] for r in runs]
    # The refused run stopped before capture: it wrote nothing. The two that ran are told apart by their ids.
    assert len(runs) == 2 and len(set(ids)) == 2 and all(len({e["run_id"] for e in r}) == 1 for r in runs)
    assert all(r[0]["event"] == "capture" and any(e["event"] == "merge" for e in r) for r in runs)

    capfd.readouterr()
    assert main(["report", str(out)]) == 0
    o, err = capfd.readouterr()
    assert f"drew run {ids[1]} (2 of 2" in err and o.strip().endswith("tie_guard_report.png")
    assert main(["report", str(out), "--run", "1", "--out", str(tmp_path / "first.png")]) == 0
    assert f"drew run {ids[0]} (1 of 2" in capfd.readouterr().err
    assert main(["report", str(out), "--run", "7"]) == 2
    assert "holds 2 run(s)" in capfd.readouterr().err

    import matplotlib.image as mpimg  # the picture exists and is not blank

    img = mpimg.imread(tmp_path / "first.png")
    assert img.shape[:2] == (1000, 1000) and img[..., :3].std() > 0.05
