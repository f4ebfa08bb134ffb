"""TieGuardCallback in TRL 1.16's preference and RL trainers on tiny tied models: DPOTrainer (PEFT; the reference
is the model with its adapter disabled) and GRPOTrainer (a simple reward function, generation on CPU with
transformers, no vLLM), the embeddings trained as ``modules_to_save`` copies (TRL refuses a LoRA adapter on
``lm_head``: both trainers compute log-probs from ``lm_head.weight`` directly). Plus the capture warning for a
Gemma-family model whose head trains apart from its input embedding (a vLLM rollout would sample from the input
embedding).
"""

from __future__ import annotations

import pytest
import torch
from conftest import PEFT_TIES_MODULES_TO_SAVE_ONLY, tiny_model
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer

from tie_guard import TieGuardCallback, TieWatcher
from tie_guard.events import EventLog, read_events
from tie_guard.probe import make_probe_ids, probe_logits

WORDS = "the a cat dog sat ran on mat fast slow is good bad yes no red blue one two three".split()


def _tokenizer():
    """A word-level tokenizer built offline (no hub): [PAD]=0, [EOS]=1, [UNK]=2, then ``WORDS``."""
    vocab = {w: i for i, w in enumerate(["[PAD]", "[EOS]", "[UNK]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def _tied_llama(vocab=64):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                        pad_token_id=0, eos_token_id=1, bos_token_id=1))


def _peft(ensure: bool) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      modules_to_save=["embed_tokens", "lm_head"], ensure_weight_tying=ensure)


def _common(out, **kw):
    return dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, learning_rate=5e-2, report_to=[],
                use_cpu=True, bf16=False, save_strategy="no", logging_steps=1, seed=0, dataloader_num_workers=0,
                **kw)


def _check_run(cb, trainer, out, ensure: bool):
    """Groups captured, divergence logged at every step, merge verified, merged model on disk = adapter model."""
    assert cb.status == "ok" and [list(g.names) for g in cb.watcher.groups] == [
        ["model.embed_tokens.weight", "lm_head.weight"]]
    checks = [e for e in read_events(out / "tie_guard_events.jsonl") if e["event"] == "check"]
    div = [e["metrics"]["divergence/lm_head"] for e in checks]
    assert [e["step"] for e in checks] == [1, 2]
    if ensure and not PEFT_TIES_MODULES_TO_SAVE_ONLY:  # PEFT 0.18 still trains two copies with ensure_weight_tying
        assert div == [0.0, 0.0]  # one shared modules_to_save copy: still one matrix
    else:
        assert all(d > 0 for d in div)  # two copies trained apart
    rep = cb.merge_report
    assert rep.verified and rep.logits_match and rep.max_abs_logit_diff <= 1e-4
    pm = trainer.model
    reloaded = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    probe = make_probe_ids(pm.get_base_model().config.vocab_size)
    assert (probe_logits(reloaded, probe) - probe_logits(pm, probe)).abs().max().item() <= 1e-4
    base = pm.get_base_model()
    assert torch.equal(reloaded.lm_head.weight, base.lm_head.modules_to_save["default"].weight)
    one_copy = ensure and not PEFT_TIES_MODULES_TO_SAVE_ONLY
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == one_copy


@pytest.mark.parametrize("ensure", [True, False])
def test_dpo_trainer_peft_reference_is_the_disabled_adapter(tmp_path, ensure):
    data = Dataset.from_list([{"prompt": "the cat", "chosen": " sat on the mat", "rejected": " ran fast"},
                              {"prompt": "a dog", "chosen": " is good", "rejected": " is bad"}] * 4)
    cb = TieGuardCallback(check_every=1)
    trainer = DPOTrainer(model=_tied_llama(), args=DPOConfig(**_common(tmp_path, max_length=16)),
                         train_dataset=data, processing_class=_tokenizer(), peft_config=_peft(ensure), callbacks=[cb])
    assert trainer.ref_model is None  # PEFT: TRL scores the reference with the adapter disabled
    trainer.train()
    _check_run(cb, trainer, tmp_path, ensure)
    assert trainer.state.log_history[0]["rewards/chosen"] is not None


def _reward_short_and_red(completions, **kwargs):
    """Simple rule reward: +1 for each 'red' in the completion, -0.1 per word."""
    return [c.split().count("red") - 0.1 * len(c.split()) for c in completions]


def test_grpo_trainer_generates_on_cpu_and_merges(tmp_path):
    data = Dataset.from_list([{"prompt": p} for p in ["the cat is", "a dog is", "one two", "the mat is"] * 2])
    args = GRPOConfig(**_common(tmp_path, num_generations=4, max_completion_length=6, use_vllm=False,
                                temperature=1.0))
    cb = TieGuardCallback(check_every=1)
    trainer = GRPOTrainer(model=_tied_llama(), reward_funcs=_reward_short_and_red, args=args, train_dataset=data,
                          processing_class=_tokenizer(), peft_config=_peft(False), callbacks=[cb])
    trainer.train()
    assert "reward" in trainer.state.log_history[0]
    _check_run(cb, trainer, tmp_path, ensure=False)


def _vllm_warnings(model, **lora):
    events = EventLog()
    TieWatcher(get_peft_model(model, LoraConfig(r=4, **lora)), events).capture()
    return [e.message for e in events.events if e.event == "setup_warning" and "vLLM" in e.message]


@pytest.mark.parametrize("lora", [
    dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"], ensure_weight_tying=False),
    dict(target_modules=["lm_head"], ensure_weight_tying=False),
], ids=["modules_to_save_copies", "lora_on_head"])
def test_gemma_head_trained_apart_warns_about_vllm_rollouts(lora):
    messages = _vllm_warnings(tiny_model("gemma3_text"), **lora)
    assert len(messages) == 1
    assert "INPUT embedding" in messages[0] and "ensure_weight_tying=True" in messages[0]
    assert "use_vllm" in messages[0]


def test_gemma_one_tied_copy_has_no_vllm_warning():
    warned = _vllm_warnings(tiny_model("gemma2"), target_modules=["q_proj"],
                            modules_to_save=["embed_tokens", "lm_head"], ensure_weight_tying=True)
    # one tied matrix: vLLM's head is the trained head; PEFT 0.18 trains two copies even so, and is warned about
    assert len(warned) == (1 if PEFT_TIES_MODULES_TO_SAVE_ONLY else 0)


def test_llama_head_trained_apart_has_no_vllm_warning():
    # vLLM's Llama keeps its own lm_head: no rollout mismatch to warn about
    assert _vllm_warnings(tiny_model("llama_tied"), target_modules=["q_proj"],
                          modules_to_save=["embed_tokens", "lm_head"], ensure_weight_tying=False) == []
