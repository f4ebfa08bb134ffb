"""Worker for tests/test_distributed.py, started on 2 gloo ranks with
``accelerate launch --config_file configs/accelerate/two_process_test.yaml tests/distributed_worker.py SCENARIO OUT``.

Scenarios (each writes ``OUT/rank<r>.json`` with what that rank saw; the test asserts on them and on rank 0's files):

* ``trainer``: ``transformers.Trainer`` (DDP) + ``TieGuardCallback`` on a tiny tied Llama with LoRA on the head:
  run ``clean`` trains and merges; run ``broken`` breaks the tie on rank 1 only at step 2 (``on_break="stop"``).
* ``loop``: a custom Accelerate loop with ``guard_accelerator``: run ``clean`` saves state at step 2 and merges at
  the end; run ``resume`` resumes from that checkpoint with the tie broken before the resume; run
  ``mismatch`` builds rank 1's model untied, so the ranks see different tie groups; run ``mts`` trains a
  ``modules_to_save`` copy of the head instead of LoRA on it.
* ``fsdp2``: the same loop on a model sharded with FSDP2 ``fully_shard`` (decoder layers, then the root): run
  ``clean`` merges from the full state dict; run ``broken`` writes into rank 1's shard of the frozen shared weight;
  run ``split`` shards the input embedding in its own group (which splits the tie); run ``mts`` as for ``loop``;
  run ``setups`` tries trainable tokens and tied ``modules_to_save`` copies.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch import nn  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from tie_guard import TieGuardCallback, guard_accelerator  # noqa: E402

VOCAB, SEQ = 256, 16


def tiny_tied_llama(tied: bool = True) -> LlamaForCausalLM:
    """Deterministic (seed 0) on every rank, so ranks start from the same weights."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))


def lora(model, head: str = "lora"):
    """LoRA on q_proj and on the head (``head="lora"``), or a trained copy of the head (``"modules_to_save"``)."""
    if head == "modules_to_save":
        return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                modules_to_save=["lm_head"]))
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]))


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64):
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def write(out: Path, rank: int, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(record, default=str))


class BreakTieOnRank(TrainerCallback):
    """Gives rank ``rank``'s LM head its own matrix at optimizer step ``step`` (a tie broken on one rank only)."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step and args.process_index == self.rank:
            head = model.get_base_model().lm_head.base_layer
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)


def trainer_run(out: Path, broken: bool) -> dict:
    model = lora(tiny_tied_llama())
    args = TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", logging_steps=100, use_cpu=True, seed=0,
                             dataloader_num_workers=0, disable_tqdm=True)
    guard = TieGuardCallback(check_every=1, on_break="stop" if broken else "warn", wandb="always")
    # The break is injected before the guard's check of the same step (callbacks run in order).
    callbacks = ([BreakTieOnRank(1, 2)] if broken else []) + [guard]
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(), callbacks=callbacks)
    trainer.train()
    return {"rank": args.process_index, "world": args.world_size, "global_step": trainer.state.global_step,
            "status": guard.status, "divergence": guard.watcher.last_divergence,
            "merged": guard.merge_report is not None}


def shard(model, world: int, split_embedding: bool = False):
    """FSDP2: each decoder layer its own shard group, then the root (embeddings + tied head: one group). With
    ``split_embedding`` the input embedding gets its own group first (which splits the tie)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    if split_embedding:
        fully_shard(model.get_base_model().model.embed_tokens, mesh=mesh)
    for layer in model.get_base_model().model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def comm_counts(guard, step: int) -> dict:
    """Collectives one check issues, with and without the divergence (torch's CommDebugMode counts both DTensor
    collectives and c10d calls)."""
    from torch.distributed.tensor.debug import CommDebugMode

    out = {}
    for divergence in (False, True):
        with CommDebugMode() as mode:
            guard.watcher.check(step, emit=False, divergence=divergence)
        out[f"divergence={divergence}"] = {str(k).split(".")[-1]: v for k, v in mode.get_comm_counts().items()}
    return out


def loop_run(out: Path, fsdp2: bool, broken: bool, head: str = "lora") -> dict:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    model = lora(tiny_tied_llama(), head)
    if fsdp2:
        shard(model, accelerator.num_processes)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loader = torch.utils.data.DataLoader(RandomTokens(), batch_size=4)
    if fsdp2:
        optimizer, loader = accelerator.prepare(optimizer, loader)
    else:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    guard = guard_accelerator(accelerator, model, output_dir=out, check_every=1,
                              on_break="stop" if broken else "warn")
    step = 0
    for batch in loader:
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        if broken and step == 2 and rank == 1:  # something writes into rank 1's shard of the frozen shared weight
            w = accelerator.unwrap_model(model).get_base_model().model.embed_tokens.weight
            with torch.no_grad():
                (w.to_local() if hasattr(w, "to_local") else w)[0].add_(1.0)
        guard.step(step)
        if not broken and step == 2 and head == "lora":
            accelerator.save_state(str(out / "checkpoint-2"))
        if guard.should_stop or step == 4:
            break
    comms = comm_counts(guard, step) if not broken and head == "lora" else None
    summary = guard.finish(accelerator.unwrap_model(model))
    accelerator.wait_for_everyone()
    return {"rank": rank, "world": accelerator.num_processes, "global_step": step, "status": guard.status,
            "divergence": guard.watcher.last_divergence, "summary": summary, "comm_counts": comms,
            "sharded": type(accelerator.unwrap_model(model).get_base_model().model.embed_tokens.weight).__name__}


def resume_run(out: Path, checkpoint: Path) -> dict:
    """Resume from the clean run's save_state checkpoint with the tie broken (on every rank) before the resume."""
    accelerator = Accelerator(cpu=True)
    model = lora(tiny_tied_llama())
    head = model.get_base_model().lm_head.base_layer
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    guard = guard_accelerator(accelerator, model, output_dir=out, step=2, resume_from=checkpoint)
    accelerator.load_state(str(checkpoint))  # the load_state hook compares again: a second report
    try:
        guard_accelerator(accelerator, model, output_dir=out / "no_state", resume_from=out / "nowhere")
        missing = None
    except FileNotFoundError as exc:
        missing = str(exc)
    return {"rank": accelerator.process_index, "world": accelerator.num_processes, "status": guard.status,
            "missing_state_error": missing}


def split_run(out: Path) -> dict:
    """FSDP2 with the input embedding in its own shard group: the tie is split; the capture says why."""
    accelerator = Accelerator(cpu=True)
    model = shard(lora(tiny_tied_llama()), accelerator.num_processes, split_embedding=True)
    guard = guard_accelerator(accelerator, model, output_dir=out)
    alone = None
    if accelerator.is_main_process:  # a watcher on one rank only must not wait for the others
        from tie_guard import TieWatcher

        watcher = TieWatcher(model, combine=False)
        watcher.capture()
        alone = [f.kind for f in watcher.check(1).findings]
    accelerator.wait_for_everyone()
    return {"rank": accelerator.process_index, "world": accelerator.num_processes, "status": guard.status,
            "groups": [(g.names, g.status) for g in guard.watcher.groups], "rank0_alone_findings": alone}


def fsdp2_setups_run(out: Path) -> dict:
    """FSDP2 with other PEFT doors into the tied group: trainable tokens (divergence not computed shard-locally:
    one warning) and modules_to_save of both embeddings with ensure_weight_tying (one shared copy: divergence 0).
    One optimizer step, a check, the merge."""
    accelerator = Accelerator(cpu=True)
    setups = {"trainable_tokens": LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[1, 2, 3]),
              "modules_to_save_tied": LoraConfig(r=4, target_modules=["q_proj"], ensure_weight_tying=True,
                                                 modules_to_save=["lm_head", "embed_tokens"])}
    record = {"rank": accelerator.process_index, "world": accelerator.num_processes}
    for name, config in setups.items():
        model = shard(get_peft_model(tiny_tied_llama(), config), accelerator.num_processes)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        guard = guard_accelerator(accelerator, model, output_dir=out / name, check_every=1)
        batch = RandomTokens()[0]["input_ids"][None]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        res = guard.step(1)
        summary = guard.finish(model)
        record[name] = {"divergence": res.divergence, "findings": [f.kind for f in res.findings],
                        "status": summary["status"]}
    return record


def mismatch_run(out: Path) -> dict:
    """Rank 1 builds its model untied: the ranks see different tie groups and must fail together."""
    from tie_guard import TieGuardError

    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    model = lora(tiny_tied_llama(tied=rank != 1))
    try:
        guard_accelerator(accelerator, model, output_dir=out)
        error = None
    except TieGuardError as exc:
        error = str(exc)
    return {"rank": rank, "world": accelerator.num_processes, "error": error}


RUNS = {
    "trainer": {"clean": lambda out: trainer_run(out / "clean", broken=False),
                "broken": lambda out: trainer_run(out / "broken", broken=True)},
    "loop": {"clean": lambda out: loop_run(out / "clean", fsdp2=False, broken=False),
             "resume": lambda out: resume_run(out / "resume", out / "clean" / "checkpoint-2"),
             "mts": lambda out: loop_run(out / "mts", fsdp2=False, broken=False, head="modules_to_save"),
             "mismatch": lambda out: mismatch_run(out / "mismatch")},
    "fsdp2": {"clean": lambda out: loop_run(out / "clean", fsdp2=True, broken=False),
              "broken": lambda out: loop_run(out / "broken", fsdp2=True, broken=True),
              "split": lambda out: split_run(out / "split"),
              "mts": lambda out: loop_run(out / "mts", fsdp2=True, broken=False, head="modules_to_save"),
              "setups": lambda out: fsdp2_setups_run(out / "setups")},
}


def main(scenario: str, out: str) -> None:
    out = Path(out)
    for run, fn in RUNS[scenario].items():
        record = fn(out)
        write(out / run, record["rank"], record)
    # Leave the process group explicitly: a gloo group torn down at interpreter exit can abort a rank
    # ("terminate called without an active exception", seen once on the old stack).
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
