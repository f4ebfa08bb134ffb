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
stores the guard's baseline in ``dir/tie_guard_state.json``; ``accelerator.load_state(dir)`` before
:func:`guard_accelerator` (or ``guard.load_from(dir)``) makes the resumed run compare against it.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .config import TieGuardConfig
from .guard import TieGuard


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
        step: the optimizer step training starts from (non-zero when resuming).
        resume_from: a ``save_state`` checkpoint directory whose ``tie_guard_state.json`` the capture is compared
            with (a tie broken or a frozen shared weight changed since then is reported at once).
    Returns:
        the started guard; call ``guard.step(step)`` after each optimizer step and ``guard.finish(model)`` at the
        end, on every rank.
    Raises:
        TieGuardError: ranks see different tie groups.
    """
    guard = TieGuard(config, output_dir, main_process=accelerator.is_main_process, **overrides)
    if resume_from is not None:
        guard.load_from(resume_from)
    guard.start(accelerator.unwrap_model(model), step)
    accelerator.register_save_state_pre_hook(lambda models, weights, directory: guard.save_to(directory))
    return guard
