"""Worker for tests/test_zero.py: DeepSpeed ZeRO-3 / ZeRO-2 on CPU, started with

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 accelerate launch --config_file configs/accelerate/zero3_cpu.yaml \\
        --num_processes N [--zero_stage 2] tests/zero_worker.py RUNS OUT

``RUNS`` is a comma-separated list of the runs below, done in that order in one launch (ZeRO-3 partitions every
parameter: see :func:`partition_everything`). Each writes ``OUT/<run>/rank<r>.json`` with what that rank saw; rank 0
also writes the run's events, merge and checkpoints:

* ``trainer``: ``transformers.Trainer`` + ``TieGuardCallback`` on the tiny tied Llama of tests/distributed_worker.py
  with LoRA on the head and q_proj, 4 steps, a checkpoint at step 2, ``trainer.save_model(OUT/trainer/adapter)``;
  rank 0 saves the base model (same seed) to ``OUT/base`` for ``tie-guard merge``.
* ``trainer_resume``: a new Trainer resumed from ``OUT/trainer/checkpoint-2`` (DeepSpeed checkpoint + tie_guard's
  state in the callback state), trained to step 4.
* ``trainer_broken``: rank 1 gives its head its own matrix at step 2 (``on_break="stop"``).
* ``loop``: a custom Accelerate loop with ``guard_accelerator``: ``accelerator.save_state`` at step 2, merge at 4.
* ``loop_resume``: a new model and loop, ``guard_accelerator(resume_from=OUT/loop/checkpoint-2)`` and
  ``accelerator.load_state`` of it (each compares with the checkpoint's tie_guard state), trained to step 4.
* ``loop_resume_broken``: the same with the tie broken before ``accelerator.prepare``: ``resume_from`` reports it;
  DeepSpeed's ``load_state`` then fails (the model has another parameter set; accelerate 1.15 runs the load_state
  pre-hooks only after DeepSpeed engines have loaded), recorded.
* ``loop_broken``: rank 1 gives its head its own matrix at step 2 (``on_break="stop"``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from distributed_worker import BreakTieOnRank, RandomTokens, lora, tiny_tied_llama, write
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from tie_guard import TieGuardCallback, guard_accelerator

STEPS, CHECKPOINT_STEP = 4, 2


def partitioning(model) -> dict:
    """How DeepSpeed holds the tied matrix between steps: ZeRO-3 sets ``ds_id`` and empties ``param.data``."""
    w = model.get_base_model().model.embed_tokens.weight
    return {"ds_id": hasattr(w, "ds_id"), "data_numel": w.data.numel(),
            "head_is_embedding": model.get_base_model().lm_head.base_layer.weight is w}


class RecordPartitioning(TrainerCallback):
    """Records :func:`partitioning` after the first optimizer step (inside training, engine in place)."""

    def __init__(self):
        self.seen = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.seen is None:
            self.seen = partitioning(model)


def record_of(guard, rank: int, world: int, step: int, seen: dict) -> dict:
    return {"rank": rank, "world": world, "global_step": step, "status": guard.status,
            "divergence": guard.watcher.last_divergence, "groups": [(g.names, g.status) for g in guard.watcher.groups],
            "partitioning": seen, "merged": guard.merge_report is not None}


def trainer_run(out: Path, run: str) -> dict:
    broken, resume = run == "trainer_broken", run == "trainer_resume"
    model = lora(tiny_tied_llama())
    args = TrainingArguments(output_dir=str(out / run), max_steps=STEPS, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no" if broken else "steps",
                             save_steps=CHECKPOINT_STEP, logging_steps=100, use_cpu=True, seed=0,
                             dataloader_num_workers=0, disable_tqdm=True,
                             restore_callback_states_from_checkpoint=True)
    partition_everything(args.deepspeed_plugin)
    seen = RecordPartitioning()
    callbacks = [seen] + ([BreakTieOnRank(1, CHECKPOINT_STEP)] if broken else [])
    callbacks.append(TieGuardCallback(check_every=1, on_break="stop" if broken else "warn"))
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(), callbacks=callbacks)
    if args.process_index == 0 and run == "trainer":
        tiny_tied_llama().save_pretrained(out / "base")
    trainer.train(resume_from_checkpoint=str(out / "trainer" / f"checkpoint-{CHECKPOINT_STEP}") if resume else None)
    if run == "trainer":
        trainer.save_model(str(out / run / "adapter"))  # zero3_save_16bit_model: gathered for this save
    # resume_from_checkpoint re-creates the callback from its stored state: read the one the Trainer used.
    guard = next(c for c in trainer.callback_handler.callbacks if isinstance(c, TieGuardCallback))
    return record_of(guard, args.process_index, args.world_size, trainer.state.global_step, seen.seen)


def partition_everything(plugin) -> None:
    """ZeRO-3 keeps parameters below ``stage3_param_persistence_threshold`` (1e5 elements by default) whole on every
    rank, which is every parameter of the tiny model; threshold 0 partitions them all, as a real model's embedding
    (vocab × hidden far above 1e5) is. A no-op for ZeRO-2 (the key is read by stage 3 only)."""
    plugin.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0


def loop_run(out: Path, run: str) -> dict:
    broken, resume = run == "loop_broken", run.startswith("loop_resume")
    accelerator = Accelerator(cpu=True)  # DeepSpeed from the accelerate launch config
    partition_everything(accelerator.state.deepspeed_plugin)  # read by prepare
    rank = accelerator.process_index
    model = lora(tiny_tied_llama())
    if run == "loop_resume_broken":  # the tie is broken (every rank) before resuming from a checkpoint where it held
        head = model.get_base_model().lm_head.base_layer
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loader = torch.utils.data.DataLoader(RandomTokens(), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    checkpoint = out / "loop" / f"checkpoint-{CHECKPOINT_STEP}"
    guard = guard_accelerator(accelerator, model, output_dir=out / run, check_every=1,
                              on_break="stop" if broken else "warn", step=CHECKPOINT_STEP if resume else 0,
                              resume_from=checkpoint if resume else None)
    step, seen = 0, partitioning(accelerator.unwrap_model(model))
    if resume:
        try:
            accelerator.load_state(str(checkpoint))  # its pre-hook (after DeepSpeed's load) compares once more
        except KeyError as exc:  # DeepSpeed cannot load a checkpoint into a model with other parameters
            return {**record_of(guard, rank, accelerator.num_processes, CHECKPOINT_STEP, seen),
                    "load_state_error": f"KeyError: {exc}"}
        step = CHECKPOINT_STEP
        loader = accelerator.skip_first_batches(loader, CHECKPOINT_STEP)
    for batch in loader:
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        if broken and step == CHECKPOINT_STEP and rank == 1:
            head = accelerator.unwrap_model(model).get_base_model().lm_head.base_layer
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        guard.step(step)
        if run == "loop" and step == CHECKPOINT_STEP:
            accelerator.save_state(str(checkpoint))
        if guard.should_stop or step == STEPS:
            break
    guard.finish(accelerator.unwrap_model(model))
    accelerator.wait_for_everyone()
    return record_of(guard, rank, accelerator.num_processes, step, seen)


def main(runs: str, out: str) -> None:
    out = Path(out)
    for run in runs.split(","):
        record = (trainer_run if run.startswith("trainer") else loop_run)(out, run)
        write(out / run, record["rank"], record)


if __name__ == "__main__":
    main(*sys.argv[1:])
