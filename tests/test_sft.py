"""TRL's SFTTrainer paths on tied models: new special tokens, modules_to_save copies, the clone_chat_template layout."""

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import PEFT_0_18_ENSURE_TYING_ERROR, PEFT_TIES_MODULES_TO_SAVE_ONLY, ROOT
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from setups import TRL_CLONE_LAYOUTS
from train_sft import SFTScriptArguments, add_chat_template_tokens
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer

from tie_guard import TieGuardCallback, TieWatcher
from tie_guard.events import EventLog, read_events
from tie_guard.probe import make_probe_ids, probe_logits


def _tiny_llama(vocab):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


def _chats(n=16):
    return Dataset.from_list([{"messages": [{"role": "user", "content": f"hello {i}"},
                                            {"role": "assistant", "content": f"hi there number {i}"}]}
                              for i in range(n)])


def _sft_args(out, **kw):
    return SFTConfig(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                     report_to=[], use_cpu=True, bf16=False, save_strategy="no", max_length=32, seed=0, **kw)


@pytest.mark.parametrize("layout", list(TRL_CLONE_LAYOUTS))
def test_trl_clone_layout_is_reported_with_the_fix(layout):
    model = _tiny_llama(256)
    if PEFT_TIES_MODULES_TO_SAVE_ONLY and TRL_CLONE_LAYOUTS[layout].get("ensure_weight_tying"):
        with pytest.raises(AttributeError, match=re.escape(PEFT_0_18_ENSURE_TYING_ERROR)):  # PEFT 0.18's own bug
            get_peft_model(model, LoraConfig(r=4, **TRL_CLONE_LAYOUTS[layout]))
        return
    pm = get_peft_model(model, LoraConfig(r=4, **TRL_CLONE_LAYOUTS[layout]))
    events = EventLog()
    TieWatcher(pm, events).capture()
    errors = [e.message for e in events.events if e.event == "setup_warning" and e.level == "error"]
    assert len(errors) == 1
    assert "cannot run that layer's forward" in errors[0] and "Fix:" in errors[0]
    assert "ensure_weight_tying=True" in errors[0]


@pytest.mark.parametrize("ensure", [True, False])
def test_sft_trainer_new_tokens_modules_to_save(smollm2_dir, tmp_path, ensure):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = _tiny_llama(len(tok))
    added = add_chat_template_tokens(model, tok, SFTScriptArguments())
    assert len(added) == 4 and model.vocab_size % 64 == 0
    assert model.lm_head.weight is model.model.embed_tokens.weight  # resize keeps the tie
    cb = TieGuardCallback(check_every=1)
    trainer = SFTTrainer(model=model, args=_sft_args(tmp_path / "run"), train_dataset=_chats(), processing_class=tok,
                         peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                modules_to_save=["embed_tokens", "lm_head"],
                                                ensure_weight_tying=ensure),
                         callbacks=[cb])
    trainer.train()
    pm = trainer.model
    assert cb.status == "ok" and cb.merge_report.verified and cb.merge_report.logits_match
    assert cb.merged_model is not None and "forward" not in vars(cb.merged_model)  # not TRL's patched forward
    probe = make_probe_ids(model.vocab_size)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged", dtype=torch.float32)
    assert (probe_logits(reloaded, probe) - probe_logits(pm, probe)).abs().max().item() <= 1e-4
    base = pm.get_base_model()
    assert torch.equal(reloaded.lm_head.weight, base.lm_head.modules_to_save["default"].weight)
    assert torch.equal(reloaded.model.embed_tokens.weight, base.model.embed_tokens.modules_to_save["default"].weight)
    # PEFT 0.18 keeps two trained copies even with ensure_weight_tying: tie_guard unties them (merge verified above)
    tied = reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert tied == (ensure and not PEFT_TIES_MODULES_TO_SAVE_ONLY)
    saved_tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "merged")
    assert saved_tok.convert_tokens_to_ids("<|assistant|>") == added[2]


def test_sft_trainer_clone_chat_template_path_is_explained_before_it_fails(smollm2_dir, tmp_path):
    """TRL's own clone_chat_template route on a tied model: tie_guard reports the broken layout (with the fix)
    at train start; the first step then fails inside TRL/PEFT."""
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    source = AutoTokenizer.from_pretrained(smollm2_dir)
    source.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    source.save_pretrained(tmp_path / "source_tok")
    cb = TieGuardCallback(check_every=1)
    trainer = SFTTrainer(model=_tiny_llama(len(tok)), args=_sft_args(tmp_path / "run",
                                                                        chat_template_path=str(tmp_path / "source_tok")),
                         train_dataset=_chats(), processing_class=tok,
                         peft_config=LoraConfig(r=4, target_modules=["q_proj"]), callbacks=[cb])
    cfg = trainer.model.peft_config["default"]
    assert "lm_head" in cfg.modules_to_save and cfg.trainable_token_indices["embed_tokens"]
    with pytest.raises((AttributeError, ValueError)):
        trainer.train()
    events = read_events(tmp_path / "run" / "tie_guard_events.jsonl")
    errors = [e for e in events if e["event"] == "setup_warning" and e["level"] == "error"]
    assert errors and "Fix:" in errors[0]["message"]


@pytest.mark.integration
def test_sft_job_runs_and_generates(tmp_path):
    out = tmp_path / "sft"
    cmd = [sys.executable, str(ROOT / "scripts" / "train_sft.py"), "--config", str(ROOT / "configs" / "smollm2_sft.yaml"),
           "--max_steps", "2", "--max_conversations", "16", "--output_dir", str(out), "--compare_plain_merge", "false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok"
    merge = summary["tie_guard_merge"]
    assert merge["max_abs_logit_diff"] <= merge["logit_tolerance"]
    # The reloaded model holds the same bits; its logits agree to float32 rounding (measured 0.0 to 5.7e-6: the
    # reloaded weights sit in freshly loaded, differently aligned storage, which can change the BLAS kernel path).
    assert merge["reload_max_abs_logit_diff"] <= 1e-5
    gen = summary["generation"]
    assert gen["merged_reloaded"]["token_ids"] and gen["identical_tokens"]
    assert gen["adapter_model"]["token_ids"] == gen["merged_reloaded"]["token_ids"]
    tok = AutoTokenizer.from_pretrained(merge["merged_dir"])
    assert tok.convert_tokens_to_ids("<|end|>") >= 49152 and "<|assistant|>" in tok.chat_template
