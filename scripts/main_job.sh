#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: a real LoRA fine-tune of SmolLM2-135M-Instruct on real chats
# with TieGuardCallback, W&B offline, verified merge at the end. Extra arguments override the YAML config;
# --config other.yaml runs another config.
# On the old stack (transformers 4.57.6 + PEFT 0.18.1): TIE_GUARD_STACK=old bash scripts/main_job.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(bash scripts/setup.sh | tail -n 1)
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
# Another YAML: pass --config other.yaml (then it replaces the default one).
case " $* " in
  *" --config "*|*" --config="*) exec "$VENV/bin/python" scripts/train_lora.py "$@" ;;
  *) exec "$VENV/bin/python" scripts/train_lora.py --config configs/smollm2_lora.yaml "$@" ;;
esac
