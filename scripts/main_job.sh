#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: a real LoRA fine-tune of SmolLM2-135M-Instruct on real chats
# with TieGuardCallback, W&B offline, verified merge at the end. Extra arguments override the YAML config.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec .venv/bin/python scripts/train_lora.py --config configs/smollm2_lora.yaml "$@"
