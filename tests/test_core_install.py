"""The lean install: ``pip install tie_guard`` (the core dependencies only) runs the callback, the merge and the
CLI, and each optional feature names its ``pip install`` line.

The core-only environment is built offline in seconds: a fresh venv (no system site-packages) into which exactly
the distributions of ``pyproject.toml``'s ``dependencies`` and their own requirements (transitively, markers
evaluated) are linked from this interpreter's installed copies, like ``pip install --no-deps`` of the same
versions. ``pip check`` then confirms that set is complete, and the child process proves that no extra (trl, wandb,
tensorboard, mlflow, trackio, matplotlib, deepspeed) is importable there.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = ("trl", "wandb", "tensorboard", "mlflow", "trackio", "matplotlib", "deepspeed")


def _core_closure() -> dict[str, md.Distribution]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    todo, seen = [Requirement(d) for d in deps], {}
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = req.name.lower().replace("_", "-")
        if key in seen:
            continue
        dist = md.distribution(req.name)
        assert dist.version in req.specifier or not req.specifier, f"{req}: installed {dist.version}"
        seen[key] = dist
        todo += [Requirement(r) for r in dist.requires or []]
    return seen


def _link_dists(dists, site: Path) -> None:
    for dist in dists:
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            src = Path(dist.locate_file(top))
            if src.exists() and not (site / top).exists():
                (site / top).symlink_to(src)


@pytest.fixture(scope="module")
def core_python(tmp_path_factory):
    venv = tmp_path_factory.mktemp("core_venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.check_output([py, "-c", "import site; print(site.getsitepackages()[0])"], text=True).strip())
    dists = _core_closure()
    assert not set(EXTRAS) & set(dists), "an extra leaked into the core dependencies"
    _link_dists(dists.values(), site)
    check = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr  # every core distribution's requirements are there
    return py


CHILD = r'''
import importlib.util, json, logging, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from peft import LoraConfig, get_peft_model
import tie_guard
from tie_guard import TieGuardCallback, safe_merge_and_unload

out = {"extras_importable": [m for m in %(extras)r if importlib.util.find_spec(m) is not None]}
torch.manual_seed(0)
base = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
emb = base.get_input_embeddings().weight.detach().clone()
pm = get_peft_model(base, LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
ids = torch.randint(0, 256, (8, 16))
records = []
logging.getLogger("tie_guard").addHandler(type("H", (logging.Handler,), {"emit": lambda s, r: records.append(r.getMessage())})())
args = TrainingArguments(output_dir=sys.argv[1], max_steps=2, per_device_train_batch_size=4, report_to=[],
                         save_strategy="no", use_cpu=True, learning_rate=1e-2)
cb = TieGuardCallback(check_every=1, merge_at_end=False, trackers="tensorboard")  # requested, not installed
Trainer(model=pm, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids], callbacks=[cb]).train()
merged, report = safe_merge_and_unload(pm, "untie")
out.update(status=cb.status, verified=report.verified, max_abs_logit_diff=report.max_abs_logit_diff,
           emb_equal=torch.equal(merged.get_input_embeddings().weight, emb),
           tied_after=merged.lm_head.weight is merged.get_input_embeddings().weight,
           missing_warnings=[m for m in records if "pip install" in m],
           loaded=sorted(m for m in %(extras)r if m in sys.modules))
print(json.dumps(out))
'''


def test_core_only_install_trains_merges_and_names_missing_extras(core_python, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = str(ROOT)  # tie_guard from this checkout, nothing else outside the venv
    proc = subprocess.run([core_python, "-c", CHILD % {"extras": EXTRAS}, str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["extras_importable"] == [] and out["loaded"] == []
    assert out["status"] == "ok" and out["verified"] and out["emb_equal"] and not out["tied_after"]
    assert out["max_abs_logit_diff"] <= 1e-4
    assert len(out["missing_warnings"]) == 1 and 'pip install "tie_guard[tensorboard]"' in out["missing_warnings"][0]

    report = subprocess.run([core_python, "-m", "tie_guard.cli", "report", str(tmp_path / "run")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 2 and 'pip install "tie_guard[report]"' in report.stderr
