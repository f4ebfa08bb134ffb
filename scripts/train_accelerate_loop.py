"""A custom Accelerate training loop with tie_guard (the hook for loops that do not use the Trainer).

    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/train_accelerate_loop.py \\
        --config configs/smollm2_lora.yaml --use_cpu false

Same YAML keys as scripts/train_lora.py (DataArguments, TRL ModelConfig, TrainingArguments, TieGuardConfig); of
TrainingArguments the loop uses output_dir, max_steps, per_device_train_batch_size, learning_rate, seed,
save_steps (with save_strategy "steps": ``accelerator.save_state``, checked by tie_guard first), use_cpu and
report_to (``wandb`` starts an Accelerate W&B tracker that tie_guard logs into).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import get_peft_model
from transformers import DataCollatorForSeq2Seq, TrainingArguments, set_seed
from trl import ModelConfig, get_peft_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_data import build_dataset  # noqa: E402
from job_common import load_model_and_tokenizer, parse_job_args  # noqa: E402
from train_lora import DataArguments  # noqa: E402

from tie_guard import TieGuardConfig, guard_accelerator  # noqa: E402
from tie_guard.packaged import chitchat_conversations  # noqa: E402


def main(argv=None) -> dict:
    types = (DataArguments, ModelConfig, TrainingArguments, TieGuardConfig)
    data_args, model_args, training_args, guard_args = parse_job_args(types, argv)
    wandb = "wandb" in (training_args.report_to or [])
    accelerator = Accelerator(cpu=training_args.use_cpu, log_with="wandb" if wandb else None)
    set_seed(training_args.seed)
    model, tokenizer, _ = load_model_and_tokenizer(model_args, training_args.output_dir)
    model = get_peft_model(model, get_peft_config(model_args))
    train = build_dataset(tokenizer, chitchat_conversations(data_args.max_conversations), data_args.max_length)
    loader = torch.utils.data.DataLoader(
        train, batch_size=training_args.per_device_train_batch_size, shuffle=True,
        collate_fn=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=training_args.learning_rate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if wandb:
        accelerator.init_trackers(guard_args.wandb_project, init_kwargs={"wandb": {"name": training_args.run_name}})

    # After prepare, on every rank: capture the tie groups; save_state checkpoints are checked from now on.
    guard = guard_accelerator(accelerator, model, guard_args, output_dir=training_args.output_dir)
    save_every = training_args.save_steps if training_args.save_strategy == "steps" else 0
    step = 0
    model.train()
    while step < training_args.max_steps and not guard.should_stop:
        for batch in loader:
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            accelerator.log({"train/loss": loss.item(), "train/global_step": step}, step=step)
            guard.step(step)  # collective: every rank, every step (checks run every check_every steps)
            if save_every and step % save_every == 0:
                accelerator.save_state(str(Path(training_args.output_dir) / f"checkpoint-{step}"))
            if step >= training_args.max_steps or guard.should_stop:
                break

    summary = guard.finish(accelerator.unwrap_model(model), step, tokenizer)  # verified merge on rank 0
    accelerator.end_training()
    if accelerator.is_main_process:
        print(json.dumps({k: v for k, v in summary.items()}, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main()
