"""Streaming merge (tie_guard.streaming): a sharded tiny tied checkpoint merged shard by shard must give what the
in-memory merge gives, leave nothing on interruption, and resolve ties as the in-memory merge does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import tiny_model
from tie_guard import safe_merge_and_unload
from tie_guard.errors import UnsupportedAdapterError
from tie_guard.loading import load_adapter
from tie_guard.probe import make_probe_ids, probe_logits
from tie_guard.streaming import INDEX_NAME, stream_merge
from tie_guard.tie_config import RELOAD_KEEPS_DIFFERING_TIES

SHARD = "20KB"  # the tiny Llama (≈120 KB in fp32) is written as 6 shards
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor stored in a checkpoint directory, by name."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def train_adapter(model, config, out: Path) -> Path:
    """Two SGD steps of ``config`` on ``model`` (a trained, non-zero adapter), saved to ``out``."""
    pm = get_peft_model(model, config)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    ids = make_probe_ids(model.config.vocab_size, 2, 16, seed=1)
    pm.train()
    for _ in range(2):
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.save_pretrained(out)
    return out


ADAPTERS = {
    "lora_head_attn": lambda: LoraConfig(r=4, target_modules=["lm_head", "q_proj", "v_proj"], init_lora_weights=False),
    "trainable_tokens": lambda: LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[3, 7, 200]),
    "modules_to_save_head": lambda: LoraConfig(r=4, target_modules=["v_proj"], modules_to_save=["lm_head"]),
    "attention_only": lambda: LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
}


@pytest.fixture(scope="module")
def sharded_base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stream") / "base"
    tiny_model("llama_tied").save_pretrained(path, max_shard_size=SHARD)
    return path


def merge_both(base: Path, adapter: Path, tmp: Path):
    """``(streamed dir, in-memory dir, stream report)`` for the same inputs."""
    rep = stream_merge(base, adapter, tmp / "streamed", chunk_rows=100)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    safe_merge_and_unload(load_adapter(model, str(adapter)), output_dir=tmp / "in_memory")
    return tmp / "streamed", tmp / "in_memory", rep


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_streamed_equals_in_memory_merge(sharded_base, tmp_path, kind):
    adapter = train_adapter(AutoModelForCausalLM.from_pretrained(sharded_base), ADAPTERS[kind](), tmp_path / "ad")
    before = tensors(sharded_base)
    streamed, in_memory, rep = merge_both(sharded_base, adapter, tmp_path)
    assert rep.verified and rep.input_embeddings_bit_identical  # (an input embedding the adapter trains is exempt)
    assert len(json.loads((streamed / INDEX_NAME).read_text())["weight_map"]) >= 20
    assert len(list(streamed.glob("model-*-of-*.safetensors"))) > 1
    got = tensors(streamed)
    if kind != "trainable_tokens":  # the input embedding's bytes are the base's, untouched
        assert torch.equal(got[EMBED].view(torch.int32), before[EMBED].view(torch.int32))
    # The two merges give the same model after from_pretrained: every tensor bit for bit (same float64
    # accumulation, one rounding), the same ties, the same logits.
    a = AutoModelForCausalLM.from_pretrained(streamed, dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(in_memory, dtype=torch.float32)
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    assert (a.lm_head.weight is a.model.embed_tokens.weight) == (b.lm_head.weight is b.model.embed_tokens.weight)
    assert a.config.tie_word_embeddings == b.config.tie_word_embeddings
    probe = make_probe_ids(256, 2, 16)
    assert torch.equal(probe_logits(a, probe), probe_logits(b, probe))
    # The base checkpoint omits the tied head; the streamed output writes it exactly when the merge unties it.
    assert HEAD not in before
    assert rep.end_to_end["max_abs_logit_diff"] <= rep.end_to_end["logit_tolerance"]
    if kind in ("lora_head_attn", "modules_to_save_head"):
        assert HEAD in got and a.config.tie_word_embeddings is False
    else:  # attention only, or trainable tokens (peft 0.21 gives the tied head the same row deltas): still one
        # tensor, kept tied (head omitted, flag True)
        assert HEAD not in got and a.config.tie_word_embeddings is True
        assert a.lm_head.weight is a.model.embed_tokens.weight
    assert tensors(sharded_base).keys() == before.keys()  # the input is untouched


@pytest.mark.skipif(not RELOAD_KEEPS_DIFFERING_TIES, reason="transformers 4.x re-ties the head on load whenever the "
                    "flag is True, so such a checkpoint never loads with two different tensors")
def test_config_says_tied_but_checkpoint_ships_both(tmp_path):
    """A config with tie_word_embeddings=True whose checkpoint holds a different lm_head (transformers ≥ 5.4 loads
    both and does not tie them): the streamed merge keeps each tensor's own value, merges the head's LoRA into the
    head (not into the embedding), sets the flag False so no reload re-ties them, and equals the in-memory merge."""
    torch.manual_seed(0)
    model = tiny_model("llama_tied")
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    model.save_pretrained(tmp_path / "base", max_shard_size=SHARD)
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "base" / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    base = tensors(tmp_path / "base")
    assert not torch.equal(base[EMBED], base[HEAD])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert loaded.config.tie_word_embeddings and loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    adapter = train_adapter(loaded, ADAPTERS["lora_head_attn"](), tmp_path / "ad")
    streamed, in_memory, rep = merge_both(tmp_path / "base", adapter, tmp_path)
    got, ref = tensors(streamed), tensors(in_memory)
    assert torch.equal(got[EMBED], base[EMBED])
    assert not torch.equal(got[HEAD], base[HEAD]) and torch.equal(got[HEAD], ref[HEAD])
    assert json.loads((streamed / "config.json").read_text())["tie_word_embeddings"] is False
    assert any("untied lm_head.weight" in a for a in rep.actions)
    a = AutoModelForCausalLM.from_pretrained(streamed)
    b = AutoModelForCausalLM.from_pretrained(in_memory)
    probe = make_probe_ids(256, 2, 16)
    assert torch.equal(probe_logits(a, probe), probe_logits(b, probe))


def test_exception_on_a_later_shard_leaves_no_output(sharded_base, tmp_path):
    adapter = train_adapter(AutoModelForCausalLM.from_pretrained(sharded_base), ADAPTERS["lora_head_attn"](),
                            tmp_path / "ad")
    written = []

    def fail_late(name):
        written.append(name)
        if len(written) == 12:  # several shards are already on disk
            raise OSError("injected: disk full")

    with pytest.raises(OSError, match="injected"):
        stream_merge(sharded_base, adapter, tmp_path / "out", on_tensor_written=fail_late)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ad"]  # no temporary sibling left


CHILD = """
import sys, time
from tie_guard.streaming import stream_merge
def slow(name):
    print(name, flush=True)
    time.sleep(0.3)
stream_merge(sys.argv[1], sys.argv[2], sys.argv[3], on_tensor_written=slow)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_killed_mid_merge_leaves_no_output(sharded_base, tmp_path, sig):
    adapter = train_adapter(AutoModelForCausalLM.from_pretrained(sharded_base), ADAPTERS["lora_head_attn"](),
                            tmp_path / "ad")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(sharded_base), str(adapter), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    killed = False
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        shards = [p for d in tmp_path.glob(".out.tmp-*") for p in d.glob("model-*.safetensors")]
        if len(shards) >= 2:  # mid-merge: some shards written, others not
            os.kill(proc.pid, sig)
            killed = True
            break
        time.sleep(0.05)
    proc.wait()
    assert killed, "the merge finished before it could be interrupted"
    assert not out.exists()
    left = [p.name for p in tmp_path.iterdir() if p.name != "ad"]
    if sig == signal.SIGINT:  # KeyboardInterrupt: atomic_directory removes its temporary sibling
        assert left == []
    else:  # a SIGKILLed process cannot clean up; what it leaves is hidden and never named OUT
        assert all(name.startswith(".out.tmp-") for name in left)


def test_unsupported_tuner_is_refused_before_any_write(sharded_base, tmp_path):
    adapter = train_adapter(AutoModelForCausalLM.from_pretrained(sharded_base),
                            LoraConfig(r=4, target_modules=["lm_head"], use_dora=True), tmp_path / "ad")
    with pytest.raises(UnsupportedAdapterError, match=r"dora.*in-memory `tie-guard merge`"):
        stream_merge(sharded_base, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_freivalds_check_catches_a_wrong_element():
    from tie_guard.effective import EffectiveWeight
    from tie_guard.streaming import _freivalds_excess

    torch.manual_seed(0)
    w, u, v = torch.randn(64, 32), torch.randn(64, 4) * 0.01, torch.randn(4, 32)
    eff = EffectiveWeight(base=w, kind="lowrank", lowrank=[(u, v)])
    merged = eff.rows(0, 64)
    vs = (torch.randint(0, 2, (32, 8)) * 2 - 1).double()
    assert _freivalds_excess(merged, w, eff, 0, 64, vs) <= 1.0
    wrong = merged.clone()
    wrong[17, 5] += 1e-4 * wrong[17].abs().max()  # far above float32 rounding, far below any logit tolerance
    assert _freivalds_excess(wrong, w, eff, 0, 64, vs) > 10.0
    assert _freivalds_excess(w, w, eff, 0, 64, vs) > 10.0  # the delta forgotten


def test_cli_stream(sharded_base, tmp_path):
    adapter = train_adapter(AutoModelForCausalLM.from_pretrained(sharded_base), ADAPTERS["lora_head_attn"](),
                            tmp_path / "ad")
    proc = subprocess.run([sys.executable, "-m", "tie_guard.cli", "merge", str(sharded_base), str(adapter),
                           str(tmp_path / "out"), "--stream", "--check-layers", "1"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["verified"] and summary["untrained_input_embeddings_bit_identical"]
    assert summary["end_to_end"]["decoder_layers"] == 1
    assert summary["max_abs_logit_diff"] <= summary["logit_tolerance"]
    assert summary["max_abs_logit_diff"] == summary["end_to_end"]["max_abs_logit_diff"]
    assert summary["tensors_merged"] > 0 and 0 <= summary["max_randomized_check_err_over_tol"] <= 1
    report = json.loads(Path(summary["report"]).read_text())  # the whole report, on disk
    assert report["verified"] and len(report["merged"]) == summary["tensors_merged"]
    assert report["copied"] == summary["tensors_copied"]
