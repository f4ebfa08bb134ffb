import json
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_model, untied_llama
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments
from wandb_reader import find_run_dir, read_run

from tie_guard import TieBrokenError, TieGuardCallback
from tie_guard.events import read_events
from tie_guard.probe import make_probe_ids, probe_logits


def _dataset(n=48, seq=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, seq), generator=gen)
    return [{"input_ids": r, "labels": r} for r in ids]


def _args(out, steps=6, report_to=("wandb",), **kw):
    return TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=list(report_to), logging_steps=2, save_strategy="no", use_cpu=True, seed=0,
        dataloader_num_workers=0, **kw,
    )


def _finish_wandb():
    import wandb

    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()  # drop wandb's process-wide settings (WANDB_DIR is per test)


class BreakTieAt(TrainerCallback):
    """Fault injection: gives lm_head its own Parameter at step ``step`` (an accidental untie)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == self.step:
            head = model.get_base_model().lm_head
            layer = head.base_layer if hasattr(head, "base_layer") else head
            layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)


def test_trainer_run_logs_to_wandb_jsonl_and_merges(tmp_path, wandb_dir):
    base = tiny_model("gemma2")
    base_embed = base.get_input_embeddings().weight.detach().clone()
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj", "v_proj"]))
    cb = TieGuardCallback(check_every=2)
    Trainer(model=pm, args=_args(tmp_path / "run"), train_dataset=_dataset(), callbacks=[cb]).train()
    _finish_wandb()

    # --- merged model on disk ---
    merged_dir = tmp_path / "run" / "merged"
    assert (merged_dir / "model.safetensors").exists() and (merged_dir / "config.json").exists()
    assert json.loads((merged_dir / "config.json").read_text())["tie_word_embeddings"] is False
    report = json.loads((tmp_path / "run" / "tie_guard_merge_report.json").read_text())
    assert report["verified"] and report["untrained_input_embeddings_bit_identical"]
    reloaded = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert torch.equal(reloaded.get_input_embeddings().weight, base_embed)
    probe = make_probe_ids(VOCAB)
    assert (probe_logits(reloaded, probe) - probe_logits(pm, probe)).abs().max().item() <= 1e-4

    # --- JSONL ---
    events = read_events(tmp_path / "run" / "tie_guard_events.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds[0] == "capture" and "setup_warning" in kinds and kinds.count("merge") == 1
    checks = [e for e in events if e["event"] == "check"]
    assert [e["step"] for e in checks] == [2, 4, 6]  # every 2 steps; the end reuses the step-6 check
    assert events[-1]["event"] == "summary" and events[-1]["data"]["status"] == "ok"

    # --- W&B, read back from the offline run file ---
    run = read_run(find_run_dir(wandb_dir))
    hist = run["history"]
    tables = [h for h in hist if h.get("tie_guard/groups/_type") == "table-file"]
    assert len(tables) == 1 and tables[0]["tie_guard/groups/nrows"] == 2
    table_file = next(find_run_dir(wandb_dir).rglob("*.table.json"))
    table = json.loads(table_file.read_text())
    assert [row[table["columns"].index("member")] for row in table["data"]] == [
        "model.embed_tokens.weight", "lm_head.weight"]
    div = [(h["train/global_step"], h["tie_guard/divergence/lm_head"]) for h in hist
           if "tie_guard/divergence/lm_head" in h]
    assert [s for s, _ in div] == [2, 4, 6]
    assert all(v > 0 and v < 10 for _, v in div)
    assert [v for _, v in div] == [e["metrics"]["divergence/lm_head"] for e in checks]
    merge = [h for h in hist if "tie_guard/merge/verified" in h]
    assert len(merge) == 1 and merge[0]["tie_guard/merge/verified"] == 1
    assert merge[0]["tie_guard/merge/max_abs_logit_diff"] <= 1e-4
    assert merge[0]["tie_guard/merge/logits_match"] == 1
    assert merge[0]["tie_guard/merge/untrained_input_embeddings_bit_identical"] == 1
    assert run["summary"]["tie_guard/status"] == "ok"
    assert run["summary"]["tie_guard/merge/verified"] is True
    assert run["alerts"] == []


def test_break_stops_training_and_alerts_once(tmp_path, wandb_dir):
    pm = get_peft_model(tiny_model("gemma2"), LoraConfig(r=4, target_modules=["lm_head"]))
    cb = TieGuardCallback(check_every=2, on_break="stop", merge_at_end=False)
    trainer = Trainer(model=pm, args=_args(tmp_path / "run", steps=10), train_dataset=_dataset(),
                      callbacks=[BreakTieAt(3), cb])
    trainer.train()
    _finish_wandb()
    assert trainer.state.global_step == 4  # broken after step 3, caught at the step-4 check, stopped
    run = read_run(find_run_dir(wandb_dir))
    assert len(run["alerts"]) == 1 and "tie broken" in run["alerts"][0][1]
    assert run["summary"]["tie_guard/status"] == "broken"
    breaks = [h["tie_guard/breaks"] for h in run["history"] if "tie_guard/breaks" in h]
    assert breaks == [0, 1]  # step 2, step 4 (the end reuses the step-4 check)


def test_break_raises_when_asked(tmp_path):
    pm = get_peft_model(tiny_model("gemma2"), LoraConfig(r=4, target_modules=["lm_head"]))
    cb = TieGuardCallback(check_every=1, on_break="raise", merge_at_end=False)
    trainer = Trainer(model=pm, args=_args(tmp_path / "run", report_to=()), train_dataset=_dataset(),
                      callbacks=[BreakTieAt(2), cb])
    with pytest.raises(TieBrokenError, match="tie broken"):
        trainer.train()
    assert trainer.state.global_step == 2


def test_no_tied_weights_is_one_info_event_and_no_wandb_run(tmp_path, wandb_dir):
    pm = get_peft_model(untied_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    cb = TieGuardCallback(check_every=2)
    Trainer(model=pm, args=_args(tmp_path / "run", report_to=()), train_dataset=_dataset(),
            callbacks=[cb]).train()
    events = read_events(tmp_path / "run" / "tie_guard_events.jsonl")
    assert [e["event"] for e in events if e.get("level") not in ("debug", None)][:2] == ["capture", "no_tied_weights"]
    assert not any(e.get("level") in ("warning", "error") for e in events)
    assert not list(Path(wandb_dir).rglob("*.wandb"))  # report_to=none and wandb="auto": no run started
    assert cb.merge_report.verified


def test_wandb_always_starts_an_offline_run(tmp_path, wandb_dir):
    pm = get_peft_model(tiny_model("gemma2"), LoraConfig(r=4, target_modules=["lm_head"]))
    cb = TieGuardCallback(check_every=3, wandb="always", merge_at_end=False)
    Trainer(model=pm, args=_args(tmp_path / "run", report_to=()), train_dataset=_dataset(),
            callbacks=[cb]).train()
    run = read_run(find_run_dir(tmp_path / "run"))
    assert run["summary"]["tie_guard/status"] == "ok"
    assert [h["train/global_step"] for h in run["history"] if "tie_guard/divergence/lm_head" in h] == [3, 6]


def test_full_fine_tuning_keeps_the_tie(tmp_path):
    model = tiny_model("llama_tied")
    cb = TieGuardCallback(check_every=1)
    Trainer(model=model, args=_args(tmp_path / "run", report_to=()), train_dataset=_dataset(),
            callbacks=[cb]).train()
    assert cb.status == "ok" and model.lm_head.weight is model.model.embed_tokens.weight
    events = read_events(tmp_path / "run" / "tie_guard_events.jsonl")
    assert "merge_skipped" in [e["event"] for e in events]
    assert all(e["metrics"]["divergence/lm_head"] == 0.0 for e in events if e["event"] == "check")


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="tie_policy"):
        TieGuardCallback(tie_policy="merge")
    with pytest.raises(ValueError, match="on_break"):
        TieGuardCallback(on_break="ignore")
