"""``TieGuardCallback``: the Trainer front door over :class:`tie_guard.guard.TieGuard`."""

from __future__ import annotations

import dataclasses

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .config import TieGuardConfig
from .guard import TieGuard


class TieGuardCallback(TrainerCallback, ExportableState):
    """Guard tied weights through a ``transformers.Trainer`` (or TRL trainer) run.

    * ``on_train_begin``: capture tie groups (by storage, through PEFT wrappers), fingerprint frozen shared
      weights, log the groups (table ``tie_guard/groups``) and warn about setups that will hurt.
    * every ``check_every`` optimizer steps: tie intact, frozen shared weights unmodified, divergence
      ‖W_out,eff − W_in,eff‖_F / ‖W_in‖_F per group, NaN/Inf; a finding is handled per ``on_break``.
    * ``on_train_end``: a last check; with ``merge_at_end`` and a PEFT model, :func:`safe_merge_and_unload` with
      ``tie_policy``, saved under ``<output_dir>/<merged_dir>`` with the tokenizer (report inside it and at
      ``<output_dir>/tie_guard_merge_report.json``). A failed merge is logged as an error and leaves the
      adapter model untouched, so ``trainer.save_model()`` still works.

    Resuming (``trainer.train(resume_from_checkpoint=...)`` with
    ``TrainingArguments(restore_callback_states_from_checkpoint=True)``): the groups captured in the first run and
    the fingerprints of frozen shared weights travel in the checkpoint (transformers' ``ExportableState``); the
    resumed run recaptures and reports a tie broken, or a frozen shared weight changed, since then.

    Events go to Python logging (logger ``"tie_guard"``), ``<output_dir>/<events_file>`` (JSONL) and every tracker
    in ``args.report_to`` that tie_guard has a sink for (wandb, tensorboard, mlflow, trackio; the same runs, at the
    Trainer's ``global_step``; see :mod:`tie_guard.sinks`, ``TieGuardConfig.trackers`` and ``.wandb``). Only the
    main process writes.

    Distributed (``accelerate launch`` / ``torchrun``; DDP, FSDP2, ZeRO-3): checks run on every rank and are combined
    with one ``all_reduce`` per check, so a break on any rank is reported once, naming the rank; the merge is built
    by the main process (from the full state dict when parameters are sharded). See :class:`TieGuard`.

    Args:
        config: a :class:`TieGuardConfig`; keyword arguments override its fields, e.g.
            ``TieGuardCallback(merge_at_end=True, tie_policy="untie", check_every=10, on_break="stop")``.
    Raises:
        ValueError: an invalid setting (at construction).
        TieBrokenError: during training with ``on_break="raise"`` when a tie breaks.
    """

    def __init__(self, config: TieGuardConfig | None = None, **overrides):
        self.config = dataclasses.replace(config or TieGuardConfig(), **overrides)
        self.guard: TieGuard | None = None
        self.resume_baseline: dict | None = None

    # The core's results, read through the callback (kept for scripts that read them after training).
    watcher = property(lambda self: self.guard.watcher if self.guard else None)
    events = property(lambda self: self.guard.events if self.guard else None)
    merge_report = property(lambda self: self.guard.merge_report if self.guard else None)
    merged_model = property(lambda self: self.guard.merged_model if self.guard else None)
    status = property(lambda self: self.guard.status if self.guard else "not_started")

    # -------------------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        self.guard = TieGuard(self.config, args.output_dir, main_process=state.is_world_process_zero,
                              report_to=args.report_to)
        self.guard.resume_baseline = self.resume_baseline
        self.guard.start(model, state.global_step)

    def state(self) -> dict:
        """transformers ``ExportableState``: settings + the captured baseline (JSON-serialisable)."""
        if self.guard is not None:
            return self.guard.state_dict()
        return {"args": dataclasses.asdict(self.config), "attributes": {"resume_baseline": self.resume_baseline}}

    def on_step_end(self, args, state, control, **kwargs):
        if self.guard is None:
            return
        self.guard.step(state.global_step)
        if self.guard.should_stop:
            control.should_training_stop = True

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.guard is None:
            return
        self.guard.finish(model, state.global_step, processing_class or kwargs.get("tokenizer"))
