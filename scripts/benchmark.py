"""Cost of tie_guard, side by side with the alternatives, on real Gemma-3-270M and SmolLM2-135M-Instruct.

    .venv/bin/python scripts/benchmark.py [--out outputs/benchmark.json] [--repeats 3]
    .venv/bin/python scripts/benchmark.py --smoke          # CI: tiny random models, checks that it runs

Prints a markdown table and writes JSON. Every figure is the median of ``--repeats`` runs with [min, max]:

1. watch cost per check at check_every=1 as % of a real LoRA training step (r=16 on lm_head + q_proj + v_proj,
   batch 2 × 128 tokens of real chats), for tie_guard's constant-cost check, for its check with the exact
   divergence metric, and for a naive guard (clone the shared weight at start, ``torch.equal`` each step);
2. merge wall time and peak extra resident memory (process RSS sampled every 2 ms, in a fresh subprocess per
   variant, after one warm-up forward pass as at the end of training, as a multiple of the head matrix's bytes):
   PEFT ``merge_and_unload`` vs naive clone-then-merge vs tie_guard (its merge phase alone, and the whole
   verified merge including its two probe forward passes);
3. fingerprint throughput vs a plain copy of the same tensor;
4. tie_guard's share of a short real training job's wall time (SmolLM2, 10 steps, callback defaults);
5. the check on 1 and on 2 ranks (``accelerate launch``, custom loop, SmolLM2): ms per check and % of a step.

``--streaming`` runs only the streaming-merge benchmark (not part of CI, needs ~3 × the checkpoint on disk):

    .venv/bin/python scripts/benchmark.py --streaming [--workdir DIR] [--no-in-memory]

It writes a synthetic sharded tied checkpoint with Gemma-2-2B's configuration (random bf16 weights, ~5.2 GB in ~1 GB
shards, ``lm_head`` omitted as ``save_pretrained`` omits a tied head) and a LoRA adapter (r=16 on ``lm_head``,
``q_proj``, ``v_proj``), then measures, each in a fresh process, the peak RSS (the kernel's ``ru_maxrss``) of
``tie-guard merge --stream`` (merge + per-tensor verification alone, and with ``--check-layers 1``) and of the
in-memory ``tie-guard merge``, and checks the streamed output against the in-memory one (every tensor bit for bit,
logits on a probe).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def fmt(s: dict, scale: float = 1.0, digits: int = 3) -> str:
    return f"{s['median'] * scale:.{digits}g} [{s['min'] * scale:.{digits}g}, {s['max'] * scale:.{digits}g}]"


# ------------------------------------------------------------------------------------------------- models
def load(name: str, smoke: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if smoke:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import tiny_model

        return tiny_model("gemma2" if "gemma" in name else "llama_tied"), None
    from tie_guard.packaged import packaged_checkpoint

    path = packaged_checkpoint(name)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["lm_head", "q_proj", "v_proj"]))


def batches(tok, vocab: int, n: int, smoke: bool):
    if smoke or tok is None:
        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab, (2, 16), generator=g) for _ in range(n)]
    from tie_guard.packaged import chitchat_conversations

    texts = ["\n".join(m["content"] for m in c) for c in chitchat_conversations(4 * n)]
    ids = tok(texts, truncation=True, max_length=128, padding="max_length", return_tensors="pt")["input_ids"]
    return [ids[2 * i: 2 * i + 2] for i in range(n)]


# ------------------------------------------------------------------------------------------------- 1. watch cost
def bench_watch(name: str, repeats: int, smoke: bool) -> dict:
    from tie_guard import TieWatcher
    from tie_guard.events import EventLog

    model, tok = load(name, smoke)
    pm = lora(model)
    vocab = model.config.get_text_config().vocab_size
    data = batches(tok, vocab, repeats + 1, smoke)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    watcher = TieWatcher(pm, EventLog())
    watcher.capture()
    shared = pm.get_base_model().get_input_embeddings().weight
    t = time.perf_counter()
    naive_ref = shared.detach().clone()  # the naive guard's one-time capture
    naive_capture = time.perf_counter() - t
    step, cheap, full, naive = [], [], [], []
    pm.train()
    for i, ids in enumerate(data):
        t = time.perf_counter()
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        dt = time.perf_counter() - t
        t = time.perf_counter()
        res = watcher.check(i + 1, emit=False, divergence=False)
        dc = time.perf_counter() - t
        t = time.perf_counter()
        watcher.check(i + 1, emit=False, divergence=True)
        dd = time.perf_counter() - t
        t = time.perf_counter()
        ok = torch.equal(shared, naive_ref)
        dn = time.perf_counter() - t
        assert res.ok and ok
        if i:  # first step warms up
            step.append(dt), cheap.append(dc), full.append(dd), naive.append(dn)
    head = pm.get_base_model().lm_head.base_layer.weight
    return {"model": name, "vocab": vocab, "hidden": head.shape[1], "head_bytes": head.numel() * head.element_size(),
            "step_s": stats(step), "check_s": stats(cheap), "check_with_divergence_s": stats(full),
            "naive_check_s": stats(naive), "naive_capture_s": naive_capture}


# ------------------------------------------------------------------------------------------------- 2. merge
MERGE_CHILD = r'''
import json, sys, threading, time, torch, copy
sys.path.insert(0, {scripts!r})
from benchmark import load, lora
from tie_guard import safe_merge_and_unload  # imported before measuring: module imports are not merge memory
variant, name, smoke = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
model, _ = load(name, smoke)
pm = lora(model)
with torch.no_grad():
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 1e-3)  # a trained-looking, non-zero adapter
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
# Warm state, as at the end of training: the adapter model has already run forward passes, so the allocator and
# BLAS workspaces are resident (a first forward alone adds ~0.5 GB RSS on SmolLM2, unrelated to merging).
from tie_guard.probe import make_probe_ids, probe_logits
probe_logits(pm, make_probe_ids(model.config.get_text_config().vocab_size))
import gc; gc.collect()
peak = [rss()]; start = peak[0]; stop = [False]
def sample():
    while not stop[0]:
        peak[0] = max(peak[0], rss()); time.sleep(0.002)
th = threading.Thread(target=sample, daemon=True); th.start()
t = time.perf_counter()
extra = {{}}
if variant == "peft":
    merged = pm.merge_and_unload()
elif variant == "naive":
    head = pm.get_base_model().lm_head
    head.base_layer.weight = torch.nn.Parameter(head.base_layer.weight.detach().clone(), requires_grad=False)
    merged = pm.merge_and_unload()
else:
    merged, rep = safe_merge_and_unload(pm, inplace=variant == "tie_guard_inplace")
    extra = {{k: v for k, v in rep.seconds.items()}}
dt = time.perf_counter() - t
stop[0] = True; th.join()
print(json.dumps({{"seconds": dt, "peak_extra_bytes": peak[0] - start, **extra}}))
'''


def bench_merge(name: str, repeats: int, smoke: bool, head_bytes: int) -> dict:
    code = MERGE_CHILD.format(scripts=str(ROOT / "scripts"))
    out = {}
    for variant in ("peft", "naive", "tie_guard", "tie_guard_inplace"):
        runs = []
        for _ in range(repeats):
            proc = subprocess.run([sys.executable, "-c", code, variant, name, "1" if smoke else "0"],
                                  capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        out[variant] = {
            "seconds": stats([r["seconds"] for r in runs]),
            "peak_extra_x_head": stats([r["peak_extra_bytes"] / head_bytes for r in runs]),
        }
        if variant.startswith("tie_guard"):
            out[variant]["merge_phase_seconds"] = stats([r["merge"] for r in runs])
    return out


# ------------------------------------------------------------------------------------------------- 3. fingerprint
def bench_fingerprint(name: str, repeats: int, smoke: bool) -> dict:
    from tie_guard.fingerprint import Fingerprint

    model, _ = load(name, smoke)
    w = model.get_input_embeddings().weight.detach()
    nbytes = w.numel() * w.element_size()
    fp, cp = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        Fingerprint(w)
        fp.append(nbytes / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        w.clone()
        cp.append(nbytes / (time.perf_counter() - t) / 1e9)
    return {"fingerprint_GBps": stats(fp), "copy_GBps": stats(cp),
            "ratio": stats([a / b for a, b in zip(fp, cp)])}


# ------------------------------------------------------------------------------------------------- 4. job share
def bench_job(smoke: bool, out_dir: Path) -> dict:
    from tie_guard.events import read_events

    run = out_dir / "bench_job"
    cmd = [sys.executable, str(ROOT / "scripts" / "train_lora.py"), "--config", str(ROOT / "configs" / "smollm2_lora.yaml"),
           "--output_dir", str(run), "--max_steps", "2" if smoke else "10", "--max_conversations", "40",
           "--compare_plain_merge", "false", "--save_adapter", "false", "--report_to", "none"]
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "WANDB_MODE": "offline"})
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    ev = read_events(run / "tie_guard_events.jsonl")
    guard = sum(e["metrics"].get("capture_seconds", 0) + e["metrics"].get("check_seconds", 0)
                + e["metrics"].get("merge/seconds", 0) for e in ev if e.get("metrics"))
    merge = sum(e["metrics"].get("merge/seconds", 0) for e in ev if e.get("metrics"))
    return {"wall_s": wall, "tie_guard_s": guard, "merge_s": merge, "share": guard / wall}


# ------------------------------------------------------------------------------------------------- 5. ranks
def bench_distributed(smoke: bool, out_dir: Path) -> dict:
    """The custom Accelerate loop on SmolLM2 at check_every=1 (divergence at every check), on 1 and on 2 ranks:
    per-check time (including the per-check all_reduce on 2 ranks) and its share of a step (the time between
    consecutive checks), both from rank 0's event log."""
    import shutil

    from tie_guard.events import read_events

    out = {}
    for n in (1, 2):
        run = out_dir / f"bench_ranks_{n}"
        shutil.rmtree(run, ignore_errors=True)
        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "two_process_test.yaml"), "--num_processes", str(n),
               str(ROOT / "scripts" / "train_accelerate_loop.py"), "--config", str(ROOT / "configs" / "smollm2_lora.yaml"),
               "--output_dir", str(run), "--max_steps", "3" if smoke else "12", "--per_device_train_batch_size", "2",
               "--max_length", "128", "--max_conversations", "40", "--check_every", "1", "--merge_at_end", "false",
               "--report_to", "none"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "WANDB_MODE": "offline"})
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        checks = [e for e in read_events(run / "tie_guard_events.jsonl") if e["event"] == "check"]
        check_s = [e["metrics"]["check_seconds"] for e in checks[1:]]
        step_s = [b["time"] - a["time"] for a, b in zip(checks, checks[1:])]
        out[str(n)] = {"check_s": stats(check_s), "step_s": stats(step_s),
                       "share": stats([c / s for c, s in zip(check_s, step_s)])}
    return out


# ------------------------------------------------------------------------------------------------- streaming
def gemma2_2b_config():
    """Gemma-2-2B's architecture (transformers ``Gemma2Config`` with the released model's values), bf16, tied."""
    from transformers import Gemma2Config

    return Gemma2Config(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                        sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                        tie_word_embeddings=True, dtype="bfloat16")


def write_synthetic_checkpoint(path: Path, config, shard_bytes: int = 1 << 30) -> int:
    """Random N(0, 0.02²) bf16 weights (norms 0) for ``config``'s model class, written shard by shard (never the
    whole model in memory) with the index ``save_pretrained`` writes; the tied head is omitted. Returns the bytes."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(config)
    names = {n: p for n, p in shell.named_parameters()}  # tied head listed once (under the embedding)
    groups, cur, size = [], [], 0
    for n, p in names.items():
        nb = p.numel() * 2
        if cur and size + nb > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += nb
    groups.append(cur)
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for n in group:
            shape = names[n].shape
            value = torch.zeros(shape) if "norm" in n else torch.randn(shape, generator=gen) * 0.02
            tensors[n] = value.to(torch.bfloat16)
            weight_map[n] = shard
            total += tensors[n].numel() * 2
        save_file(tensors, str(path / shard), metadata={"format": "pt"})
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=2))
    return total


def write_synthetic_adapter(path: Path, config) -> None:
    """LoRA r=16 on lm_head + q_proj + v_proj, B ~ N(0, 1e-3²) (a trained-looking, non-zero delta), built on the
    streaming merge's zero-byte shell so that the base is never materialised."""
    from peft import LoraConfig, get_peft_model

    from tie_guard.streaming import _zero_byte_shell

    pm = get_peft_model(_zero_byte_shell(config), LoraConfig(r=16, lora_alpha=32,
                                                             target_modules=["lm_head", "q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-3)
    pm.save_pretrained(path, save_embedding_layers=False)


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd`` in a fresh process; its peak RSS (the kernel's high-water mark ``VmHWM``, file-backed mapped pages
    included, read every 20 ms: it only grows, and is reset by ``exec``, unlike ``ru_maxrss``, which keeps the
    parent's size at fork) and its peak anonymous RSS (``RssAnon``, sampled)."""
    import tempfile
    import threading

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env={**os.environ, **(env or {})})
        anon, hwm, done = [0], [0], threading.Event()

        def sample():
            while not done.is_set():
                try:
                    with open(f"/proc/{proc.pid}/status") as f:
                        for line in f:
                            if line.startswith("RssAnon:"):
                                anon[0] = max(anon[0], int(line.split()[1]) * 1024)
                            elif line.startswith("VmHWM:"):
                                hwm[0] = max(hwm[0], int(line.split()[1]) * 1024)
                except OSError:
                    return
                time.sleep(0.02)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        t = time.perf_counter()
        _, status, _ = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        done.set()
        th.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])}... exited {proc.returncode}: {stderr[-3000:]}")
    return {"seconds": wall, "peak_rss_bytes": hwm[0], "peak_anon_bytes": anon[0], "stdout": stdout}


API_CHILD = """
import sys, torch
from transformers import AutoModelForCausalLM
from tie_guard import safe_merge_and_unload
from tie_guard.loading import load_adapter
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
safe_merge_and_unload(load_adapter(model, sys.argv[2]), output_dir=sys.argv[3])
"""

STREAM_CHILD = """
import json, sys
from tie_guard.streaming import stream_merge
rep = stream_merge(sys.argv[1], sys.argv[2], sys.argv[3], end_to_end=False)
print(json.dumps(rep.to_dict()))
"""


def bench_streaming(workdir: Path, in_memory: bool) -> dict:
    import shutil

    config = gemma2_2b_config()
    base, adapter = workdir / "gemma2-2b-synthetic", workdir / "adapter"
    if not (base / "model.safetensors.index.json").is_file():
        shutil.rmtree(base, ignore_errors=True)
        write_synthetic_checkpoint(base, config)
    if not (adapter / "adapter_model.safetensors").is_file():
        write_synthetic_adapter(adapter, config)
    ckpt = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    head = config.vocab_size * config.hidden_size * 2
    cli = [sys.executable, "-m", "tie_guard.cli", "merge", str(base), str(adapter)]
    env = {"PYTHONPATH": str(ROOT)}
    result = {"config": "Gemma2Config (Gemma-2-2B values), bf16, tied, random weights",
              "checkpoint_bytes": ckpt, "shards": len(list(base.glob("model-*.safetensors"))),
              "largest_tensor_bytes": head, "variants": {}}
    runs = [("baseline: python + imports only", workdir / "none",
             [sys.executable, "-c", "import torch, transformers, peft, tie_guard.streaming, tie_guard.cli"]),
            ("stream: merge + per-tensor verification", workdir / "out_stream_noe2e",
             [sys.executable, "-c", STREAM_CHILD, str(base), str(adapter), str(workdir / "out_stream_noe2e")]),
            ("tie-guard merge --stream --check-layers 1", workdir / "out_stream",
             cli + [str(workdir / "out_stream"), "--stream", "--check-layers", "1", "--quiet"])]
    if in_memory:
        runs.append(("tie-guard merge (in memory)", workdir / "out_memory",
                     cli + [str(workdir / "out_memory"), "--dtype", "bfloat16", "--quiet"]))
        runs.append(("safe_merge_and_unload (in memory, adapter kept)", workdir / "out_api",
                     [sys.executable, "-c", API_CHILD, str(base), str(adapter), str(workdir / "out_api")]))
    for label, out_dir, cmd in runs:
        shutil.rmtree(out_dir, ignore_errors=True)
        r = run_measured(cmd, env)
        result["variants"][label] = {k: v for k, v in r.items() if k != "stdout"}
        if label.startswith("tie-guard merge --stream"):
            result["stream_report"] = json.loads(r["stdout"])
        if label.startswith("stream:"):
            shutil.rmtree(out_dir, ignore_errors=True)  # disk: only the CLI outputs are compared
    if in_memory:
        result["compare"] = compare_outputs(base, workdir / "out_stream", workdir / "out_api")
        result["compare_cli"] = compare_outputs(base, workdir / "out_stream", workdir / "out_memory")
    return result


def compare_outputs(base: Path, streamed: Path, in_memory: Path) -> dict:
    """Every tensor of the streamed output vs the in-memory output (bit for bit, one tensor in memory at a time),
    the input embedding vs the base's bytes, and logits of both checkpoints (loaded one after the other) on a probe."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from tie_guard.probe import make_probe_ids, max_abs_diff, probe_logits

    def where(path: Path) -> dict[str, Path]:
        m = {}
        for f in path.glob("*.safetensors"):
            with safe_open(f, framework="pt") as st:
                m.update({k: f for k in st.keys()})
        return m

    ws, wm, wb = where(streamed), where(in_memory), where(base)
    differing, worst_rel = [], 0.0
    for name in sorted(set(ws) | set(wm)):
        if name not in ws or name not in wm:
            differing.append(name)
            continue
        with safe_open(ws[name], framework="pt") as a, safe_open(wm[name], framework="pt") as b:
            x, y = a.get_tensor(name), b.get_tensor(name)
            if not torch.equal(x, y):
                differing.append(name)
                # max |Δ| in units of the dtype's rounding step at the tensor's largest magnitude
                step = torch.finfo(y.dtype).eps * float(y.float().abs().max())
                worst_rel = max(worst_rel, float((x.float() - y.float()).abs().max()) / step)
    emb = "model.embed_tokens.weight"
    with safe_open(ws[emb], framework="pt") as a, safe_open(wb[emb], framework="pt") as b:
        embed_identical = torch.equal(a.get_tensor(emb).view(torch.int16), b.get_tensor(emb).view(torch.int16))
    probe = make_probe_ids(256000, 1, 16)
    logits = []
    for path in (streamed, in_memory):
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
        logits.append(probe_logits(model, probe))
        del model
    return {"tensors_compared": len(set(ws) | set(wm)), "tensors_differing": differing,
            "max_abs_diff_in_steps_at_max": worst_rel,
            "input_embedding_bit_identical_to_base": embed_identical,
            "max_abs_logit_diff_streamed_vs_in_memory": max_abs_diff(*logits)}


def render_streaming(r: dict) -> str:
    gib = 2 ** 30
    lines = [f"Streaming merge: {r['config']}, {r['checkpoint_bytes'] / gib:.2f} GiB in {r['shards']} shards "
             f"(largest tensor, the tied embedding: {r['largest_tensor_bytes'] / gib:.2f} GiB); LoRA r=16 on "
             "lm_head + q_proj + v_proj; one fresh process each.", "",
             "| variant | wall (s) | peak RSS (GiB) | × checkpoint | × largest tensor | peak anon RSS (GiB) |",
             "|---|---|---|---|---|---|"]
    for label, v in r["variants"].items():
        lines.append(f"| {label} | {v['seconds']:.0f} | {v['peak_rss_bytes'] / gib:.2f} | "
                     f"{v['peak_rss_bytes'] / r['checkpoint_bytes']:.2f} | "
                     f"{v['peak_rss_bytes'] / r['largest_tensor_bytes']:.2f} | {v['peak_anon_bytes'] / gib:.2f} |")
    for key, what in (("compare", "safe_merge_and_unload (in memory, same arithmetic)"),
                      ("compare_cli", "tie-guard merge in memory (untied layers merged in place by PEFT, which "
                                      "rounds s·B@A to bf16 before adding; the stream rounds W + s·B@A once)")):
        c = r.get(key)
        if c:
            lines += ["", f"streamed vs {what}: {c['tensors_compared']} tensors compared, "
                          f"{len(c['tensors_differing'])} differing (max |Δ| = "
                          f"{c['max_abs_diff_in_steps_at_max']:.2g} × eps·max|W|) {c['tensors_differing'][:2]}; input embedding bit-identical to the base: "
                          f"{c['input_embedding_bit_identical_to_base']}; max |Δlogit| "
                          f"{c['max_abs_logit_diff_streamed_vs_in_memory']:.3g}"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny random models, one repeat: checks the script runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="outputs/benchmark.json")
    ap.add_argument("--streaming", action="store_true", help="only the streaming-merge benchmark (≥ 4 GB on disk)")
    ap.add_argument("--workdir", default=None, help="--streaming: where the synthetic checkpoint goes (default: a "
                                                    "temporary directory, removed after)")
    ap.add_argument("--no-in-memory", action="store_true", help="--streaming: skip the in-memory merge")
    args = ap.parse_args(argv)
    if args.streaming:
        import shutil
        import tempfile

        work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="tie_guard_stream_"))
        try:
            res = bench_streaming(work, not args.no_in_memory)
        finally:
            if not args.workdir:
                shutil.rmtree(work, ignore_errors=True)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
        print(render_streaming(res))
        return
    repeats = 1 if args.smoke else args.repeats
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    models = ["smollm2-135m-instruct", "gemma-3-270m"]
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads", "smoke": args.smoke, "models": {}}
    for name in models:
        w = bench_watch(name, max(repeats, 3) if not args.smoke else 2, args.smoke)
        w["merge"] = bench_merge(name, repeats if not args.smoke else 1, args.smoke, w["head_bytes"])
        w["fingerprint"] = bench_fingerprint(name, repeats, args.smoke)
        result["models"][name] = w
    result["job"] = bench_job(args.smoke, out.parent)
    result["ranks"] = bench_distributed(args.smoke, out.parent)
    out.write_text(json.dumps(result, indent=2))
    print(render(result))
    print(f"\nJSON: {out}")


def render(r: dict) -> str:
    m = r["models"]
    names = list(m)
    lines = [f"Measured {r['date']} on {r['machine']}{' (SMOKE: tiny models)' if r['smoke'] else ''}; "
             "median [min, max].", "",
             "| figure | target | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]

    def row(label, target, f):
        lines.append(f"| {label} | {target} | " + " | ".join(f(m[n]) for n in names) + " |")

    row("vocab × hidden", "", lambda x: f"{x['vocab']} × {x['hidden']}")
    row("LoRA training step (s)", "", lambda x: fmt(x["step_s"]))
    row("tie_guard check, % of step", "≤ 0.5 %", lambda x: fmt({k: v / x["step_s"]["median"] * 100 if k != "n" else v
                                                                for k, v in x["check_s"].items()}) + " %")
    row("tie_guard check (ms)", "flat in vocab", lambda x: fmt(x["check_s"], 1e3))
    row("check + exact divergence (ms)", "", lambda x: fmt(x["check_with_divergence_s"], 1e3))
    row("naive guard: torch.equal per step (ms)", "", lambda x: fmt(x["naive_check_s"], 1e3))
    row("merge time: PEFT merge_and_unload (s)", "", lambda x: fmt(x["merge"]["peft"]["seconds"]))
    row("merge time: tie_guard inplace merge phase (s)", "≤ 1.0 × PEFT",
        lambda x: fmt(x["merge"]["tie_guard_inplace"]["merge_phase_seconds"]))
    row("merge time: tie_guard merge phase, adapter kept (s)", "",
        lambda x: fmt(x["merge"]["tie_guard"]["merge_phase_seconds"]))
    row("merge time: tie_guard inplace incl. verification (s)", "",
        lambda x: fmt(x["merge"]["tie_guard_inplace"]["seconds"]))
    row("merge time: naive clone-then-merge (s)", "", lambda x: fmt(x["merge"]["naive"]["seconds"]))
    row("peak extra RSS × head bytes: PEFT", "", lambda x: fmt(x["merge"]["peft"]["peak_extra_x_head"]))
    row("peak extra RSS × head bytes: tie_guard inplace (CLI)", "≤ 1.1 ×",
        lambda x: fmt(x["merge"]["tie_guard_inplace"]["peak_extra_x_head"]))
    row("peak extra RSS × head bytes: tie_guard, adapter kept (callback)", "",
        lambda x: fmt(x["merge"]["tie_guard"]["peak_extra_x_head"]))
    row("peak extra RSS × head bytes: naive", "", lambda x: fmt(x["merge"]["naive"]["peak_extra_x_head"]))
    row("fingerprint GB/s (vs copy GB/s)", "≥ 0.5 × copy", lambda x: f"{fmt(x['fingerprint']['fingerprint_GBps'])} "
        f"({fmt(x['fingerprint']['copy_GBps'])}) = {x['fingerprint']['ratio']['median']:.2f} ×")
    a, b = m[names[1]]["check_s"]["median"], m[names[0]]["check_s"]["median"]
    lines.append(f"| check cost {names[1]} / {names[0]} | ≤ 1.2 × | {a / b:.2f} × | |")
    j = r["job"]
    lines.append(f"| tie_guard share of a 10-step SmolLM2 job | ≤ 5 % | {j['share'] * 100:.2f} % "
                 f"({j['tie_guard_s']:.1f} s of {j['wall_s']:.0f} s; merge+verify {j['merge_s']:.1f} s) | |")
    d = r["ranks"]
    lines.append("| tie_guard check on 1 / 2 ranks (ms; SmolLM2 Accelerate loop, with divergence) | "
                 f"≤ 0.5 % of a step | {fmt(d['1']['check_s'], 1e3)} / {fmt(d['2']['check_s'], 1e3)} | |")
    lines.append("| … as % of a step on 1 / 2 ranks | ≤ 0.5 % | "
                 f"{d['1']['share']['median'] * 100:.3f} % / {d['2']['share']['median'] * 100:.3f} % | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
