"""TRL GRPOTrainer with PEFT on a tied model, generating with transformers on CPU (no vLLM), guarded by
TieGuardCallback.

    python scripts/train_grpo.py --config configs/smollm2_grpo.yaml [--max_steps 4 ...]

Prompts: the first user message of real chitchat conversations. Reward: replies near ``target_words`` words score
higher (a simple rule, so the run needs no reward model). As in DPO, TRL 1.16 refuses a LoRA adapter on
``lm_head``; the embedding and head train as ``modules_to_save``. With ``use_vllm=True`` on a Gemma model, keep
``ensure_weight_tying=True``: vLLM's Gemma samples from the input embedding (tie_guard warns at train start).
"""

from __future__ import annotations

import sys
from pathlib import Path

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trl_common import first_exchanges, run  # noqa: E402

TARGET_WORDS = 12


def length_reward(completions, **kwargs) -> list[float]:
    """1 for a reply of ``TARGET_WORDS`` words, falling linearly to 0 at 0 or 2×; conversational completions are
    ``[[{"role": "assistant", "content": ...}], ...]``."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [max(0.0, 1.0 - abs(len(t.split()) - TARGET_WORDS) / TARGET_WORDS) for t in texts]


def main(argv=None):
    return run(GRPOTrainer, GRPOConfig, lambda a: {
        "reward_funcs": length_reward,
        "train_dataset": Dataset.from_list([{"prompt": [u]} for u, _ in first_exchanges(a.max_conversations)]),
    }, argv)


if __name__ == "__main__":
    main()
