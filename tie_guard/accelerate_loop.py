"""The front door for custom training loops on ``accelerate.Accelerator``.

::

    accelerator = Accelerator()
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    guard = tie_guard.guard_accelerator(accelerator, model, output_dir="out", check_every=10)
    for step, batch in enumerate(loader, 1):
        ...; optimizer.step(); optimizer.zero_grad()
        guard.step(step)
        if guard.should_stop: break
    guard.finish(accelerator.unwrap_model(model), tokenizer=tokenizer)

Every rank runs the same calls (checks are collective). ``accelerator.save_state(dir)`` runs a check first and
stores the guard's baseline in ``dir/tie_guard_state.json``. To resume, pass ``resume_from=dir`` (and ``step=``) to
:func:`guard_accelerator`, or call ``accelerator.load_state(dir)`` after it: either compares the running model with
the checkpoint's baseline and reports a tie broken, or a frozen shared weight changed, since the save.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .config import TieGuardConfig
from .guard import STATE_NAME, TieGuard


def guard_accelerator(accelerator, model: nn.Module, config: TieGuardConfig | None = None,
                      output_dir: str | Path = ".", step: int = 0, resume_from: str | Path | None = None,
                      **overrides) -> TieGuard:
    """Start a :class:`TieGuard` on a model already passed through ``accelerator.prepare`` and hook it into the
    accelerator's checkpoints.

    Args:
        accelerator: an ``accelerate.Accelerator`` (accelerate ≥ 1.10: ``register_save_state_pre_hook``).
        model: the prepared model (DDP / FSDP2 / DeepSpeed wrappers are looked through with
            ``accelerator.unwrap_model``; FSDP2 shards in place, so its parameters are DTensors).
        config / overrides: :class:`TieGuardConfig` and field overrides.
        output_dir: where the JSONL log and the merged model go (main process only).
            tie_guard's metrics go to the accelerator's trackers (``Accelerator(log_with=...)``; call
            ``accelerator.init_trackers`` first), at the ``step`` passed to ``guard.step``.
        step: the optimizer step training starts from (non-zero when resuming).
        resume_from: a ``save_state`` checkpoint directory whose ``tie_guard_state.json`` the capture is compared
            with (a tie broken or a frozen shared weight changed since then is reported at once).
            ``accelerator.load_state(dir)`` later does the same comparison (a ``load_state`` pre-hook).
    Returns:
        the started guard; call ``guard.step(step)`` after each optimizer step and ``guard.finish(model)`` at the
        end, on every rank.
    Raises:
        TieGuardError: ranks see different tie groups.
        FileNotFoundError: ``resume_from`` has no ``tie_guard_state.json`` (named, with the fix).
    """
    guard = TieGuard(config, output_dir, main_process=accelerator.is_main_process, accelerator=accelerator,
                     **overrides)
    if resume_from is not None:
        guard.load_from(resume_from)
    guard.start(accelerator.unwrap_model(model), step)
    accelerator.register_save_state_pre_hook(lambda models, weights, directory: guard.save_to(directory))
    accelerator.register_load_state_pre_hook(lambda models, directory: _compare_on_load(guard, directory))
    return guard


def _compare_on_load(guard: TieGuard, directory: str) -> None:
    """``load_state`` hook: compare with the checkpoint when it carries tie_guard's state, else say why not."""
    if (Path(directory) / STATE_NAME).is_file():
        guard.compare_checkpoint(directory)
    else:
        guard.events.emit("resume", guard.last_step, "warning",
                          f"{directory} has no {STATE_NAME} (saved without tie_guard): nothing to compare with")
