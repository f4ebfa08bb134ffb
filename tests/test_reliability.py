"""Bad inputs and injected faults: each gets the exact error (type + a message naming problem and fix), and nothing
the user gave us changes."""

import contextlib
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_model, train_adapter_a_little
from peft import IA3Config, LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from tie_guard import TieGuardCallback, UnsupportedAdapterError, safe_merge_and_unload
from tie_guard.cli import main as cli
from tie_guard.events import read_events
from tie_guard.probe import make_probe_ids, probe_logits


def tree_hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def base_and_adapter(tmp_path):
    base = tiny_model("gemma2")
    base.save_pretrained(tmp_path / "base")
    pm = get_peft_model(tiny_model("gemma2"), LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))
    train_adapter_a_little(pm, steps=2)
    pm.save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


def test_other_tuner_on_tied_module_merges_exactly():
    """IA3 on a tied lm_head (scaled-embedding Gemma2) merges through PEFT's own layer merge on a copy: logits
    match and the input embedding stays bit-identical (every tuner: tests/test_tuners.py)."""
    base = tiny_model("gemma2")
    embed = base.model.embed_tokens.weight.detach().clone()
    pm = train_adapter_a_little(get_peft_model(base, IA3Config(target_modules=["lm_head"], feedforward_modules=[])),
                                steps=2)
    merged, rep = safe_merge_and_unload(pm)
    assert rep.verified and rep.max_abs_logit_diff <= rep.logit_tolerance
    assert torch.equal(merged.model.embed_tokens.weight, embed)


def test_prompt_tuning_has_nothing_to_merge():
    pm = get_peft_model(tiny_model("gemma2"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(UnsupportedAdapterError, match="prompt-learning.*Fix"):
        safe_merge_and_unload(pm)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_merge_within_stated_tolerance(dtype, tmp_path):
    from tie_guard.probe import LOGIT_TOLERANCES

    base = tiny_model("gemma2").to(dtype)
    embed = base.get_input_embeddings().weight.detach().clone()
    pm = get_peft_model(base, LoraConfig(r=4, target_modules=["lm_head", "q_proj"], init_lora_weights=False))
    adapter = probe_logits(pm, make_probe_ids(VOCAB))
    merged, report = safe_merge_and_unload(pm, output_dir=tmp_path / "m")
    assert report.dtype == str(dtype) and report.verified
    atol, rtol = LOGIT_TOLERANCES[dtype]
    # The bound is taken from the head's outputs, before Gemma2's final soft-capping (tanh shrinks them: |capped|
    # ≤ |raw|), so it sits at or a hair above the bound on the final logits.
    final_bound = atol + rtol * adapter.abs().max().item()
    assert final_bound - 1e-6 <= report.logit_tolerance <= final_bound * 1.01
    assert report.max_abs_logit_diff <= report.logit_tolerance
    assert torch.equal(merged.get_input_embeddings().weight, embed)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=dtype)
    assert reloaded.lm_head.weight.dtype == dtype and torch.equal(reloaded.get_input_embeddings().weight, embed)


def test_only_safetensors_are_written(base_and_adapter, tmp_path, capsys):
    base, adapter = base_and_adapter
    assert cli(["merge", str(base), str(adapter), str(tmp_path / "out"), "--quiet"]) == 0
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "model.safetensors" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]


def test_mismatched_adapter_and_base(base_and_adapter, tmp_path, capsys):
    _, adapter = base_and_adapter
    bigger = tiny_model("gemma2")
    bigger.resize_token_embeddings(VOCAB + 64)
    bigger.save_pretrained(tmp_path / "bigger")
    before = tree_hashes(adapter)
    assert cli(["merge", str(tmp_path / "bigger"), str(adapter), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "does not match this base model" in err and "Fix:" in err
    assert not (tmp_path / "out").exists() and tree_hashes(adapter) == before


def test_truncated_adapter_file(base_and_adapter, tmp_path, capsys):
    base, adapter = base_and_adapter
    f = adapter / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert cli(["merge", str(base), str(adapter), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "truncated, corrupt" in err and "Fix:" in err and not (tmp_path / "out").exists()


def test_missing_files_are_usage_errors(tmp_path, capsys):
    """Each wrong input names what is wrong and the accepted forms (exit 2: usage, not an unsound merge)."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a model")
    base_forms = "Fix: pass a checkpoint directory (with config.json), a .gguf file, a packaged model name"
    for base, problem in [(tmp_path / "missing", "does not exist"),
                          (tmp_path / "notes.txt", "is not a model checkpoint directory"),
                          (tmp_path / "empty", "is not a model checkpoint directory"),
                          ("smollm2-135m", "not a packaged model, a local path, or a hub id in the local cache "
                                           "(offline). Did you mean 'smollm2-135m-instruct'?")]:
        assert cli(["inspect", str(base)]) == 2
        err = capsys.readouterr().err
        assert problem in err and base_forms in err and "smollm2-135m-instruct" in err, err
    tiny_model("gemma2").save_pretrained(tmp_path / "base")
    for adapter, problem in [(tmp_path / "missing", "does not exist"), (tmp_path / "empty", "no adapter_config.json")]:
        assert cli(["merge", str(tmp_path / "base"), str(adapter), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert problem in err and "Fix: pass the directory written by peft's save_pretrained" in err, err
    assert not (tmp_path / "out").exists()


def test_pickle_adapter_is_loaded_weights_only(base_and_adapter, tmp_path, capsys):
    """A .bin adapter is read with torch.load(weights_only=True): tensors load, code in a pickle never runs."""
    base, adapter = base_and_adapter
    weights = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    weights.save_pretrained(tmp_path / "bin_adapter", safe_serialization=False)
    assert (tmp_path / "bin_adapter" / "adapter_model.bin").exists()
    assert cli(["merge", str(base), str(tmp_path / "bin_adapter"), str(tmp_path / "out"), "--quiet"]) == 0

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil_adapter"
    evil.mkdir()
    (evil / "adapter_config.json").write_text((tmp_path / "bin_adapter" / "adapter_config.json").read_text())
    torch.save({"x": Payload()}, evil / "adapter_model.bin")
    assert cli(["merge", str(base), str(evil), str(tmp_path / "out2"), "--quiet"]) == 2
    assert "Fix:" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out2").exists()


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """Mount a tmpfs with ``options`` at ``path`` for the block (root only; skips the test elsewhere)."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


@pytest.mark.parametrize("options, error", [
    ("size=48k", "No space left on device"),  # the save runs out of space
    ("ro,size=64k", "Read-only file system.*Fix: choose a writable location"),  # root ignores permission bits
])
def test_failed_writes_leave_no_partial_output(tmp_path, options, error):
    """No output dir, no temporary left, the adapter model untouched."""
    with tmpfs(tmp_path / "fs", options) as fs:
        pm = get_peft_model(tiny_model("gemma2"), LoraConfig(r=4, target_modules=["lm_head"]))
        train_adapter_a_little(pm, steps=1)
        state = {k: v.clone() for k, v in pm.state_dict().items()}
        with pytest.raises(OSError, match=error):
            safe_merge_and_unload(pm, output_dir=fs / "merged")
        assert list(fs.iterdir()) == []
        assert all(torch.equal(state[k], v) for k, v in pm.state_dict().items())


def _resume_args(out, steps, **kw):
    return TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="steps", save_steps=2, use_cpu=True, seed=0,
                             restore_callback_states_from_checkpoint=True, **kw)


def _ds():
    ids = torch.randint(0, VOCAB, (32, 16), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": r, "labels": r} for r in ids]


def test_resume_restores_state_without_false_alarm_and_catches_earlier_break(tmp_path):
    model = tiny_model("gemma2")
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["lm_head"]))
    Trainer(model=pm, args=_resume_args(tmp_path / "run", 2), train_dataset=_ds(),
            callbacks=[TieGuardCallback(check_every=1, merge_at_end=False)]).train()
    state = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["TieGuardCallback"]["attributes"]["resume_baseline"]
    assert saved["lm_head"]["physical"] is True and saved["lm_head"]["digest"]

    trainer = Trainer(model=pm, args=_resume_args(tmp_path / "run", 4), train_dataset=_ds(),
                      callbacks=[TieGuardCallback(check_every=1, merge_at_end=False)])
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    events = read_events(tmp_path / "run" / "tie_guard_events.jsonl")
    after = events[[i for i, e in enumerate(events) if e["event"] == "capture"][-1]:]
    assert [e["event"] for e in after if e["event"] in ("resume", "break")] == ["resume"]

    # The tie is broken before resuming from the step-2 checkpoint: caught at train begin.
    head = pm.get_base_model().lm_head
    head.base_layer.weight = torch.nn.Parameter(head.base_layer.weight.detach().clone(), requires_grad=False)
    trainer = Trainer(model=pm, args=_resume_args(tmp_path / "run", 4), train_dataset=_ds(),
                      callbacks=[TieGuardCallback(check_every=1, merge_at_end=False)])
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    events = read_events(tmp_path / "run" / "tie_guard_events.jsonl")
    after = events[[i for i, e in enumerate(events) if e["event"] == "capture"][-1]:]
    breaks = [e for e in after if e["event"] == "break"]
    assert breaks and breaks[0]["step"] == 2 and "since the checkpoint" in breaks[0]["message"]


@pytest.mark.integration
def test_gguf_quantized_in_memory_is_refused_with_the_dequantize_path(tmp_path):
    from tie_guard.packaged import gguf_path

    path = gguf_path("smollm2-135m-instruct")
    q = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    pm = get_peft_model(q, LoraConfig(r=4, target_modules=["lm_head"]))
    with pytest.raises(UnsupportedAdapterError, match=r"quantized.*load_gguf"):
        safe_merge_and_unload(pm)


def test_meta_device_or_offloaded_weights_are_refused():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    with torch.device("meta"):
        model = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=8))
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["lm_head"]))
    with pytest.raises(UnsupportedAdapterError, match=r"meta device.*offloaded.*Fix"):
        safe_merge_and_unload(pm)



@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_base_is_watched_and_its_merge_refused(bits, tmp_path):
    """A real bitsandbytes-quantized base (CPU backend): the tie group (embeddings stay unquantized) is captured and
    watched; the merge is refused with the fix, and no weight of the model changes."""
    from transformers import BitsAndBytesConfig

    from tie_guard import TieWatcher

    tiny_model("llama_tied").save_pretrained(tmp_path / "base")
    qc = BitsAndBytesConfig(load_in_4bit=True) if bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=qc, device_map="cpu")
    layer = type(q.model.layers[0].self_attn.q_proj).__name__
    assert layer == ("Linear4bit" if bits == 4 else "Linear8bitLt")
    pm = get_peft_model(q, LoraConfig(r=4, target_modules=["lm_head", "q_proj"], init_lora_weights=False))
    watcher = TieWatcher(pm)
    groups = watcher.capture()
    assert [(g.names, g.status) for g in groups] == [(("model.embed_tokens.weight", "lm_head.weight"), "tied")]
    res = watcher.check(1)
    assert res.ok and 0 < res.divergence["lm_head"] < float("inf")
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    with pytest.raises(UnsupportedAdapterError,
                       match=rf"quantized \({layer}\).*impossible.*Fix: load the base unquantized"):
        safe_merge_and_unload(pm, output_dir=tmp_path / "out")
    after = pm.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not (tmp_path / "out").exists()


_OFFLOAD_MAPS = {
    # the tie group itself offloaded to disk: its parameter is on the meta device
    "tie_group_on_disk": {"model.embed_tokens": "disk", "lm_head": "disk", "model.layers": "cpu", "model.norm": "cpu",
                          "model.rotary_emb": "cpu"},
    # one decoder layer offloaded, the tie group in memory
    "layer_on_disk": {"model.embed_tokens": "cpu", "lm_head": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                      "model.norm": "cpu", "model.rotary_emb": "cpu"},
}


@pytest.mark.parametrize("where", list(_OFFLOAD_MAPS))
def test_watching_a_partly_offloaded_model(where, tmp_path):
    """Watching (not merging) a model loaded with an accelerate device_map that offloads to disk: the tie is watched
    either way; values are checked wherever they are in memory, with the same divergence as the unoffloaded model."""
    from torch import nn

    from tie_guard import TieWatcher
    from tie_guard.events import EventLog

    tiny_model("llama_tied").save_pretrained(tmp_path / "base")
    lcfg = LoraConfig(r=4, target_modules=["lm_head", "q_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    ref = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), lcfg)
    off = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map=_OFFLOAD_MAPS[where],
                                               offload_folder=tmp_path / "offload")
    pm = get_peft_model(off, lcfg)
    pm.load_state_dict({k: v for k, v in ref.state_dict().items() if "lora_" in k}, strict=False)
    events = EventLog(tmp_path / "events.jsonl")
    watcher = TieWatcher(pm, events)
    assert [(g.names, g.status) for g in watcher.capture()] == [(("model.embed_tokens.weight", "lm_head.weight"),
                                                                 "tied")]
    res = watcher.check(1)
    assert res.ok
    offloaded = [e for e in read_events(tmp_path / "events.jsonl") if e["event"] == "offloaded"]
    if where == "tie_group_on_disk":
        assert res.divergence == {} and len(offloaded) == 1 and "Fix: keep the embeddings on a device" in \
            offloaded[0]["message"]
    else:
        ref_watcher = TieWatcher(ref)
        ref_watcher.capture()
        assert not offloaded
        assert res.divergence["lm_head"] == pytest.approx(ref_watcher.check(1).divergence["lm_head"], rel=1e-6)
    # A tie broken in memory is caught with the tie group offloaded or not.
    head = pm.base_model.model.lm_head.base_layer
    head.weight = nn.Parameter(torch.zeros(head.weight.shape, device=head.weight.device), requires_grad=False)
    assert [f.kind for f in watcher.check(2).findings] == ["tie_broken"]
