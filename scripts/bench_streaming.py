"""Peak memory of the streaming merge on a ≥ 4 GB sharded tied checkpoint, beside the in-memory merge.

Not part of CI; needs ~3 × the checkpoint on disk and ~14 GB RAM for the in-memory variants:

    .venv/bin/python scripts/bench_streaming.py [--workdir DIR] [--no-in-memory] [--out outputs/streaming.json]

Writes a synthetic sharded tied checkpoint with Gemma-2-2B's configuration (random bf16 weights, ~5.2 GB in ~1 GB
shards, ``lm_head`` omitted as ``save_pretrained`` omits a tied head) and a LoRA adapter (r=16 on ``lm_head``,
``q_proj``, ``v_proj``), then measures, each in a fresh process, the peak RSS (``VmHWM``) of ``tie-guard merge
--stream`` (merge + per-tensor verification alone, and with ``--check-layers 1``), of the in-memory ``tie-guard
merge`` and of ``safe_merge_and_unload``, and checks the streamed output against both in-memory outputs (every
tensor bit for bit, logits on a probe).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


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

    from tie_guard.streaming import zero_byte_shell

    pm = get_peft_model(zero_byte_shell(config), LoraConfig(r=16, lora_alpha=32,
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/streaming.json")
    ap.add_argument("--workdir", default=None, help="where the synthetic checkpoint goes (default: a temporary "
                                                    "directory, removed after)")
    ap.add_argument("--no-in-memory", action="store_true", help="skip the in-memory merges")
    args = ap.parse_args(argv)
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


if __name__ == "__main__":
    main()
