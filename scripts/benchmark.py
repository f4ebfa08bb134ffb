"""Cost of tie_guard, side by side with the alternatives, on real Gemma-3-270M and SmolLM2-135M-Instruct.

    .venv/bin/python scripts/benchmark.py [--out outputs/benchmark.json] [--repeats 3]
    .venv/bin/python scripts/benchmark.py --smoke          # CI: tiny random models, checks that it runs

Prints a markdown table and writes JSON. Every figure is the median of ``--repeats`` runs with [min, max]:

1. watch cost per check at check_every=1 as % of a real LoRA training step (r=16 on lm_head + q_proj + v_proj,
   batch 2 × 128 tokens of real chats), for tie_guard's constant-cost check, for its check with the exact
   divergence metric, and for a naive guard (clone the shared weight at start, ``torch.equal`` each step);
2. merge wall time and peak extra resident memory (process RSS sampled every 2 ms, in a fresh subprocess per
   variant, after one warm-up forward pass as at the end of training, as a multiple of the head matrix's bytes):
   PEFT ``merge_and_unload`` (and + ``save_pretrained``) vs naive clone-then-merge vs tie_guard's verified merge
   on the CLI path (``inplace=True``) and the callback path (adapter model kept), its merge phase alone, and
   merge + verification + save + reload check; bytes written by each save;
3. fingerprint throughput vs a plain copy of the same tensor;
4. tie_guard's share of a short real training job's wall time (SmolLM2, 10 steps, callback defaults);
5. the check on 1 and on 2 ranks (``accelerate launch``, custom loop, SmolLM2): ms per check and % of a step;
6. vocabulary growth (one decoder layer, hidden 640, vocab 49152 → 262144, batch 1 × 64): the check as % of a
   step and the verified merge's time and memory against PEFT's.

The streaming merge of a checkpoint larger than memory has its own benchmark: ``scripts/bench_streaming.py``.
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
def synthetic(vocab: int):
    """A tied Gemma3-text model with ONE decoder layer, hidden 640 (Gemma-3-270M's), random weights, ``vocab``
    rows: the head dominates, and a training step is short, so tie_guard's fixed costs show."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=640, intermediate_size=2048, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=256)
    return Gemma3ForCausalLM(cfg).eval()


def load(name: str, smoke: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name.startswith("synthetic-"):
        return synthetic(int(name.split("-")[1]) if not smoke else 4096), None
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


def timed_step(pm, opt, ids) -> float:
    """Seconds of one LoRA training step (forward, backward, optimizer) on the token batch ``ids``."""
    t = time.perf_counter()
    pm(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    return time.perf_counter() - t


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
        dt = timed_step(pm, opt, ids)
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
from peft.tuners.tuners_utils import BaseTunerLayer
# The floor when the adapter model must stay usable (callback path): one new tensor per adapted weight.
adapted_bytes = sum(m.get_base_layer().weight.numel() * m.get_base_layer().weight.element_size()
                    for m in pm.modules() if isinstance(m, BaseTunerLayer))
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
import tempfile
out_dir = tempfile.mkdtemp()
if variant == "peft":
    merged = pm.merge_and_unload()
elif variant == "peft_save":
    merged = pm.merge_and_unload()
    merged.save_pretrained(out_dir + "/m")
elif variant == "naive":
    head = pm.get_base_model().lm_head
    head.base_layer.weight = torch.nn.Parameter(head.base_layer.weight.detach().clone(), requires_grad=False)
    merged = pm.merge_and_unload()
else:
    from tie_guard import MergeVerificationError
    try:
        merged, rep = safe_merge_and_unload(pm, inplace=variant.startswith("tie_guard_inplace"),
                                            output_dir=out_dir + "/m" if variant.endswith("_save") else None)
    except MergeVerificationError as exc:  # recorded, not hidden: the table counts these runs
        rep = exc.report
        extra["verification_failed"] = 1
    extra.update({{k: v for k, v in rep.seconds.items()}})
    extra["max_abs_logit_diff_over_tolerance"] = rep.max_abs_logit_diff / rep.logit_tolerance
dt = time.perf_counter() - t
stop[0] = True; th.join()
import pathlib, shutil
written = sum(f.stat().st_size for f in pathlib.Path(out_dir).rglob("*") if f.is_file())
shutil.rmtree(out_dir)
print(json.dumps({{"seconds": dt, "peak_extra_bytes": peak[0] - start, "bytes_written": written,
                  "adapted_bytes": adapted_bytes, **extra}}))
'''


MERGE_VARIANTS = ("peft", "naive", "tie_guard", "tie_guard_inplace", "peft_save", "tie_guard_inplace_save")


def bench_merge(name: str, repeats: int, smoke: bool, head_bytes: int, variants=MERGE_VARIANTS) -> dict:
    """Each variant in a fresh process, ``repeats`` times: wall time and peak extra RSS over the head's bytes.
    ``*_save`` variants include writing the merged model (tie_guard's also reloads and re-verifies it)."""
    code = MERGE_CHILD.format(scripts=str(ROOT / "scripts"))
    out = {}
    for variant in variants:
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
            "bytes_written": runs[0]["bytes_written"],
            "adapted_x_head": runs[0]["adapted_bytes"] / head_bytes,
        }
        if variant.startswith("tie_guard"):
            out[variant]["merge_phase_seconds"] = stats([r["merge"] for r in runs])
            out[variant]["diff_over_tolerance"] = stats([r["max_abs_logit_diff_over_tolerance"] for r in runs])
            out[variant]["verification_failed"] = sum(r.get("verification_failed", 0) for r in runs)
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


# ------------------------------------------------------------------------------------------------- 6. vocab growth
VOCABS = (49152, 131072, 262144)


def bench_vocab(repeats: int, smoke: bool) -> dict:
    """One-decoder-layer tied models (hidden 640) as the vocabulary grows: the per-step check at batch 1 × 64
    (check_every=1) as % of a step, and the verified merge's time and peak memory against PEFT's."""
    out = {}
    for vocab in VOCABS:
        name = f"synthetic-{vocab}"
        model, _ = load(name, smoke)
        head = model.lm_head.weight
        head_bytes = head.numel() * head.element_size()
        pm = lora(model)
        v = model.config.vocab_size
        g = torch.Generator().manual_seed(0)
        data = [torch.randint(0, v, (1, 64), generator=g) for _ in range(max(repeats, 5) + 1)]
        from tie_guard import TieWatcher
        from tie_guard.events import EventLog

        watcher = TieWatcher(pm, EventLog())
        watcher.capture()
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
        step, check = [], []
        pm.train()
        for i, ids in enumerate(data):
            dt = timed_step(pm, opt, ids)
            t = time.perf_counter()
            watcher.check(i + 1, divergence=False)  # emits its event, as in a run
            dc = time.perf_counter() - t
            if i:
                step.append(dt), check.append(dc)
        del pm, model, watcher, opt
        out[str(vocab)] = {"head_bytes": head_bytes, "step_s": stats(step), "check_s": stats(check),
                           "share": stats([c / s for c, s in zip(check, step)]),
                           "merge": bench_merge(name, repeats, smoke, head_bytes,
                                                ("peft", "tie_guard_inplace", "tie_guard"))}
    return out


# ------------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny random models, one repeat: checks the script runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="outputs/benchmark.json")
    ap.add_argument("--sections", default="models,job,ranks,vocab",
                    help="comma-separated: models (watch, merge, fingerprint on the real models), job, ranks, vocab")
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    repeats = 1 if args.smoke else args.repeats
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    models = ["smollm2-135m-instruct", "gemma-3-270m"]
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads", "smoke": args.smoke, "models": {}}
    for name in models if "models" in sections else ():
        w = bench_watch(name, max(repeats, 3) if not args.smoke else 2, args.smoke)
        w["merge"] = bench_merge(name, repeats if not args.smoke else 1, args.smoke, w["head_bytes"])
        w["fingerprint"] = bench_fingerprint(name, repeats, args.smoke)
        result["models"][name] = w
    if "job" in sections:
        result["job"] = bench_job(args.smoke, out.parent)
    if "ranks" in sections:
        result["ranks"] = bench_distributed(args.smoke, out.parent)
    if "vocab" in sections:
        result["vocab"] = bench_vocab(repeats, args.smoke)
    out.write_text(json.dumps(result, indent=2))
    print(render(result))
    print(f"\nJSON: {out}")


def _ratio(a: dict, b: dict) -> str:
    """median(a) / median(b), with the spread of the per-run extremes."""
    return f"{a['median'] / b['median']:.2f} × [{a['min'] / b['max']:.2f}, {a['max'] / b['min']:.2f}]"


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def render(r: dict) -> str:
    m = r.get("models", {})
    names = list(m)
    lines = [f"Measured {r['date']} on {r['machine']}{' (SMOKE: tiny models)' if r['smoke'] else ''}; "
             "median [min, max].", ""]
    if names:
        lines += ["| figure | target | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]

    def row(label, target, f):
        lines.append(f"| {label} | {target} | " + " | ".join(f(m[n]) for n in names) + " |")

    def verified_vs_peft(x, ours="tie_guard_inplace", theirs="peft", target=1.0):
        a, b = x["merge"][ours]["seconds"], x["merge"][theirs]["seconds"]
        return f"{_ratio(a, b)} {_mark(a['median'] <= target * b['median'])}"

    def peak(x, variant, target=1.1):
        p = x["merge"][variant]["peak_extra_x_head"]
        return fmt(p) + (f" {_mark(p['median'] <= target)}" if target else "")

    if names:
        row("vocab × hidden", "", lambda x: f"{x['vocab']} × {x['hidden']}")
        row("LoRA training step (s)", "", lambda x: fmt(x["step_s"]))
        row("tie_guard check, % of step", "≤ 0.5 %",
            lambda x: fmt({k: v / x["step_s"]["median"] * 100 if k != "n" else v for k, v in x["check_s"].items()})
            + " %")
        row("tie_guard check (ms)", "flat in vocab", lambda x: fmt(x["check_s"], 1e3))
        row("check + exact divergence (ms)", "", lambda x: fmt(x["check_with_divergence_s"], 1e3))
        row("naive guard: torch.equal per step (ms)", "", lambda x: fmt(x["naive_check_s"], 1e3))
        row("PEFT merge_and_unload (s)", "", lambda x: fmt(x["merge"]["peft"]["seconds"]))
        row("tie_guard verified merge, CLI path (merge + verification) (s)", "",
            lambda x: fmt(x["merge"]["tie_guard_inplace"]["seconds"]))
        row("… ÷ PEFT merge_and_unload", "≤ 1.0 ×", verified_vs_peft)
        row("tie_guard verified merge, callback path (adapter kept) ÷ PEFT", "≤ 1.0 ×",
            lambda x: verified_vs_peft(x, "tie_guard"))
        row("tie_guard merge phase alone ÷ PEFT", "",
            lambda x: _ratio(x["merge"]["tie_guard_inplace"]["merge_phase_seconds"], x["merge"]["peft"]["seconds"]))
        row("PEFT merge + save_pretrained (s)", "", lambda x: fmt(x["merge"]["peft_save"]["seconds"]))
        row("tie_guard merge + verification + save + reload check ÷ PEFT merge + save", "≤ 1.0 ×",
            lambda x: verified_vs_peft(x, "tie_guard_inplace_save", "peft_save"))
        row("… bytes written: tie_guard (untied head) ÷ PEFT (tied, damaged)", "",
            lambda x: f"{x['merge']['tie_guard_inplace_save']['bytes_written'] / x['merge']['peft_save']['bytes_written']:.2f} ×"
            f" ({x['merge']['tie_guard_inplace_save']['bytes_written'] / 2**20:.0f} MiB vs "
            f"{x['merge']['peft_save']['bytes_written'] / 2**20:.0f} MiB)")
        row("verification: max |Δlogit| ÷ tolerance, CLI / callback path (runs failed)", "< 1",
            lambda x: " / ".join(f"{fmt(x['merge'][v]['diff_over_tolerance'])} ({x['merge'][v]['verification_failed']})"
                                 for v in ("tie_guard_inplace", "tie_guard")))
        row("naive clone-then-merge (s)", "", lambda x: fmt(x["merge"]["naive"]["seconds"]))
        row("peak extra RSS × head bytes: PEFT", "", lambda x: peak(x, "peft", None))
        row("peak extra RSS × head bytes: tie_guard verified merge, CLI path", "≤ 1.1 ×",
            lambda x: peak(x, "tie_guard_inplace"))
        row("peak extra RSS × head bytes: tie_guard verified merge, callback path", "≤ 1.1 ×",
            lambda x: peak(x, "tie_guard"))
        row("… bytes of the new tensors the callback path makes (adapter kept: one per adapted weight) × head bytes", "",
            lambda x: f"{x['merge']['tie_guard']['adapted_x_head']:.2f}")
        row("peak extra RSS × head bytes: naive", "", lambda x: peak(x, "naive", None))
        row("fingerprint GB/s (vs copy GB/s)", "≥ 0.5 × copy", lambda x: f"{fmt(x['fingerprint']['fingerprint_GBps'])} "
            f"({fmt(x['fingerprint']['copy_GBps'])}) = {x['fingerprint']['ratio']['median']:.2f} ×")
        if len(names) > 1:
            a, b = m[names[1]]["check_s"]["median"], m[names[0]]["check_s"]["median"]
            lines.append(f"| check cost {names[1]} / {names[0]} | ≤ 1.2 × | {a / b:.2f} × | |")
    if "job" in r:
        j = r["job"]
        lines.append(f"| tie_guard share of a 10-step SmolLM2 job | ≤ 5 % | {j['share'] * 100:.2f} % "
                     f"({j['tie_guard_s']:.1f} s of {j['wall_s']:.0f} s; merge+verify {j['merge_s']:.1f} s) | |")
    if "ranks" in r:
        d = r["ranks"]
        lines.append("| tie_guard check on 1 / 2 ranks (ms; SmolLM2 Accelerate loop, with divergence) | "
                     f"≤ 0.5 % of a step | {fmt(d['1']['check_s'], 1e3)} / {fmt(d['2']['check_s'], 1e3)} | |")
        lines.append("| … as % of a step on 1 / 2 ranks | ≤ 0.5 % | "
                     f"{d['1']['share']['median'] * 100:.3f} % / {d['2']['share']['median'] * 100:.3f} % | |")
    if "vocab" in r:
        v = r["vocab"]
        lines += ["", "One decoder layer, hidden 640, tied head; batch 1 × 64; LoRA r=16 on lm_head, q_proj, v_proj:",
                  "", "| vocab | step (s) | check (ms) | check, % of step (≤ 0.5 %) | verified merge ÷ PEFT merge "
                  "(CLI / callback) | peak extra RSS × head (CLI / callback; PEFT) |", "|---|---|---|---|---|---|"]
        for vocab, x in v.items():
            mg = x["merge"]
            share = x["share"]["median"] * 100
            lines.append(
                f"| {vocab} | {fmt(x['step_s'])} | {fmt(x['check_s'], 1e3)} | {share:.3f} % {_mark(share <= 0.5)} | "
                f"{_ratio(mg['tie_guard_inplace']['seconds'], mg['peft']['seconds'])} / "
                f"{_ratio(mg['tie_guard']['seconds'], mg['peft']['seconds'])} | "
                f"{mg['tie_guard_inplace']['peak_extra_x_head']['median']:.2f} / "
                f"{mg['tie_guard']['peak_extra_x_head']['median']:.2f}; {mg['peft']['peak_extra_x_head']['median']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
