"""``TieGuardCallback``: the Trainer front door over :class:`TieWatcher` and :func:`safe_merge_and_unload`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .atomic import write_json_atomic
from .config import TieGuardConfig
from .errors import TieBrokenError, TieGuardError
from .events import EventLog
from .merge import REPORT_NAME, safe_merge_and_unload
from .peft_layout import PeftModel
from .wandb_sink import resolve_wandb
from .watch import TieWatcher


class TieGuardCallback(TrainerCallback, ExportableState):
    """Guard tied weights through a ``transformers.Trainer`` (or TRL trainer) run.

    * ``on_train_begin``: capture tie groups (by storage, through PEFT wrappers), fingerprint frozen shared
      weights, log the groups (W&B table ``tie_guard/groups``) and warn about setups that will hurt.
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

    Events go to Python logging (logger ``"tie_guard"``), ``<output_dir>/<events_file>`` (JSONL) and W&B (the
    Trainer's run when ``report_to`` includes wandb; see ``TieGuardConfig.wandb``). Only the main process writes.

    Args:
        config: a :class:`TieGuardConfig`; keyword arguments override its fields, e.g.
            ``TieGuardCallback(merge_at_end=True, tie_policy="untie", check_every=10, on_break="stop")``.
    Raises:
        ValueError: an invalid setting (at construction).
        TieBrokenError: during training with ``on_break="raise"`` when a tie breaks.
    """

    def __init__(self, config: TieGuardConfig | None = None, **overrides):
        self.config = dataclasses.replace(config or TieGuardConfig(), **overrides)
        self.watcher: TieWatcher | None = None
        self.events: EventLog | None = None
        self.merge_report = None
        self.merged_model = None
        self.status = "not_started"
        self.resume_baseline: dict | None = None
        self._wandb = None

    # -------------------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        main = state.is_world_process_zero
        out = Path(args.output_dir)
        if main:
            self._wandb = resolve_wandb(self.config.wandb, self.config.wandb_project, out)
        jsonl = out / self.config.events_file if (main and self.config.events_file) else None
        self.events = EventLog(jsonl, self._wandb if main else None)
        self.watcher = TieWatcher(model, self.events)
        self.watcher.capture(state.global_step)
        self.status = "ok"
        if self.resume_baseline:
            findings = self.watcher.compare_baseline(self.resume_baseline)
            for f in findings:
                self.events.emit("break", state.global_step, "error", f.message, data={"kind": f.kind, "group": f.group})
            if findings:
                self.status = "broken"
            else:
                self.events.emit("resume", state.global_step, "info",
                                 f"resumed at step {state.global_step}: tie groups and frozen shared weights match "
                                 "the checkpoint")

    def state(self) -> dict:
        """transformers ``ExportableState``: settings + the captured baseline (JSON-serialisable)."""
        baseline = self.watcher.baseline() if self.watcher is not None else self.resume_baseline
        return {"args": dataclasses.asdict(self.config), "attributes": {"resume_baseline": baseline}}

    def on_step_end(self, args, state, control, **kwargs):
        every = self.config.check_every
        if self.watcher is None or every <= 0 or state.global_step % every != 0:
            return
        div_every = self.config.divergence_every or every
        res = self.watcher.check(state.global_step, divergence=state.global_step % div_every == 0)
        self._handle(res, state, control)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.watcher is None:
            return
        last = self.watcher.last_result
        reuse = last is not None and last.step == state.global_step and last.divergence
        res = last if reuse else self.watcher.check(state.global_step)
        self._handle(res, state, control, final=True)
        summary = {"status": self.status, "breaks": self.watcher.n_findings, "groups": len(self.watcher.groups)}
        summary.update({f"divergence/{k}": v for k, v in res.divergence.items()})
        if self.config.merge_at_end and isinstance(model, PeftModel) and state.is_world_process_zero:
            summary.update(self._merge(args, state, model, processing_class or kwargs.get("tokenizer")))
        elif self.config.merge_at_end and not isinstance(model, PeftModel):
            self.events.emit("merge_skipped", state.global_step, "info",
                             "no PEFT adapter to merge (full fine-tuning); the trained model itself keeps its ties: "
                             "save it with trainer.save_model()")
        summary["status"] = self.status
        self.events.summary(summary)
        if self._wandb is not None:
            self._wandb.finish()

    # -------------------------------------------------------------------------------------------------------
    def _handle(self, res, state, control, final: bool = False):
        if res.ok:
            return
        self.status = "broken"
        if self.config.on_break == "raise" and not final:
            raise TieBrokenError("; ".join(f.message for f in res.findings))
        if self.config.on_break == "stop":
            control.should_training_stop = True

    def _merge(self, args, state, model, tokenizer) -> dict:
        out = Path(args.output_dir) / self.config.merged_dir
        step = state.global_step
        try:
            merged, report = safe_merge_and_unload(
                model, self.config.tie_policy, output_dir=out, tokenizer=tokenizer, overwrite=True,
                probe_shape=(self.config.probe_batch_size, self.config.probe_seq_len),
                verify_reload=self.config.verify_reload,
            )
        except TieGuardError as exc:
            self.status = "merge_failed"
            report = getattr(exc, "report", None)
            self.events.emit("merge", step, "error", f"merge failed: {exc}",
                             metrics={"merge/verified": 0},
                             data={"report": report.to_dict() if report is not None else None})
            return {"merge/verified": False}
        self.merge_report, self.merged_model = report, merged
        write_json_atomic(Path(args.output_dir) / REPORT_NAME, report.to_dict())
        metrics = {
            "merge/verified": 1,
            "merge/max_abs_logit_diff": report.max_abs_logit_diff,
            "merge/logits_match": int(report.logits_match),
            "merge/logit_tolerance": report.logit_tolerance,
            "merge/input_embeddings_bit_identical": int(report.input_embeddings_bit_identical),
            "merge/seconds": sum(report.seconds.values()),
        }
        if report.reload_max_abs_logit_diff is not None:
            metrics["merge/reload_max_abs_logit_diff"] = report.reload_max_abs_logit_diff
        self.events.emit(
            "merge", step, "info",
            f"verified merge ({report.tie_policy}) saved to {out}: max |Δlogit| {report.max_abs_logit_diff:.3g} "
            f"(tolerance {report.logit_tolerance:.3g}), input embeddings bit-identical: "
            f"{report.input_embeddings_bit_identical}; " + "; ".join(report.actions),
            metrics=metrics, data={"report": report.to_dict()},
        )
        return {**metrics, "merge/verified": True, "merged_dir": str(out)}
