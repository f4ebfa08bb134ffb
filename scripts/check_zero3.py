"""DeepSpeed ZeRO-3 check for tie_guard (needs `pip install 'tie_guard[deepspeed]'`; < 5 min on one GPU or CPU).

On a GPU::

    accelerate launch --config_file configs/accelerate/zero3.yaml --num_processes 1 --mixed_precision no \\
        scripts/check_zero3.py --output_dir outputs/zero3-check

On CPU (DeepSpeed's CPU accelerator, gloo; 1 or 2 processes)::

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 accelerate launch --config_file configs/accelerate/zero3_cpu.yaml \\
        --num_processes 2 scripts/check_zero3.py --output_dir outputs/zero3-check --max_steps 4

A Trainer (ZeRO-3, parameters partitioned: ``param.data`` empty, ``ds_id`` set) trains LoRA on the head of a tied
Llama built from its config (no download) with ``TieGuardCallback``. It checks that the tie group is found by
identity (never by ``data_ptr``, which is meaningless for partitioned parameters), that checks pass with a positive
divergence, that the end-of-training merge (from the gathered full state dict) is verified with input embeddings
bit-identical to the base model's, and that the adapter saved by ``trainer.save_model()`` under
``zero3_save_16bit_model`` merges and verifies again with ``tie-guard merge``. Prints one JSON line and exits 0 when
all hold, 1 when one does not, and 0 with ``SKIP`` when DeepSpeed is not installed. Without a GPU the Trainer runs
with ``use_cpu=True`` (without it DeepSpeed's batch check fails on 2 CPU processes).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/zero3-check")
    parser.add_argument("--max_steps", type=int, default=20)
    args = parser.parse_args()
    if importlib.util.find_spec("deepspeed") is None:
        print("SKIP: the ZeRO-3 check needs deepspeed installed (pip install 'tie_guard[deepspeed]')")
        return 0

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from tie_guard import TieGuardCallback
    from tie_guard.distributed import zero3_integration_paused

    out = Path(args.output_dir)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    base_dir = out / "base"
    base.save_pretrained(base_dir)
    embed_before = base.model.embed_tokens.weight.detach().clone()
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["lm_head", "q_proj", "v_proj"]))

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 4096, (256, 64), generator=gen)
    data = [{"input_ids": row, "labels": row} for row in ids]
    training_args = TrainingArguments(output_dir=str(out), max_steps=args.max_steps, per_device_train_batch_size=8,
                                      learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=5,
                                      use_cpu=not torch.cuda.is_available())
    guard = TieGuardCallback(check_every=5)
    trainer = Trainer(model=model, args=training_args, train_dataset=data, callbacks=[guard])
    trainer.train()
    trainer.save_model(str(out / "adapter"))  # zero3_save_16bit_model gathers the weights for this save

    result = {"groups": [g.names for g in guard.watcher.groups], "status": guard.status,
              "divergence": guard.watcher.last_divergence}
    if trainer.accelerator.is_main_process:
        with zero3_integration_paused():  # a plain model, not one partitioned by transformers' ZeRO-3 init
            merged = LlamaForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
        report = guard.merge_report
        result.update({
            "merge_verified": bool(report and report.verified),
            "max_abs_logit_diff": report.max_abs_logit_diff if report else None,
            "embeddings_bit_identical_to_base": torch.equal(merged.model.embed_tokens.weight.float(),
                                                            embed_before.float()),
        })
        cli = subprocess.run([sys.executable, "-m", "tie_guard.cli", "merge", str(base_dir), str(out / "adapter"),
                              str(out / "merged_cli"), "--force", "--quiet"], capture_output=True, text=True)
        result["cli_merge_exit"] = cli.returncode
        ok = (result["groups"] == [("model.embed_tokens.weight", "lm_head.weight")] and result["status"] == "ok"
              and result["divergence"].get("lm_head", 0) > 0 and result["merge_verified"]
              and result["embeddings_bit_identical_to_base"] and cli.returncode == 0)
        result["ok"] = ok
        print(json.dumps(result, default=str))
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
