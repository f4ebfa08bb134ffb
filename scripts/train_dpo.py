"""TRL DPOTrainer with PEFT on a tied model, guarded by TieGuardCallback.

    python scripts/train_dpo.py --config configs/smollm2_dpo.yaml [--max_steps 4 ...]

The reference is the model with its adapter disabled (``ref_model=None`` with PEFT). TRL 1.16's DPOTrainer computes
log-probs from ``lm_head.weight`` directly and refuses a LoRA adapter on ``lm_head``, so the embedding and head
train as ``modules_to_save`` (one tied copy with ``ensure_weight_tying=True``). Preference pairs: a real chitchat
reply (chosen) against the reply to another message (rejected).
"""

from __future__ import annotations

import sys
from pathlib import Path

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trl_common import preference_pairs, run  # noqa: E402


def main(argv=None):
    return run(DPOTrainer, DPOConfig,
               lambda a: {"train_dataset": Dataset.from_list(preference_pairs(a.max_conversations))}, argv)


if __name__ == "__main__":
    main()
