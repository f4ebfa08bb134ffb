#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite: unit tests on tiny models + integration tests on real
# SmolLM2-135M-Instruct. Extra arguments go to pytest (e.g. -m "not integration").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
