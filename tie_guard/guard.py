"""``TieGuard``: the one core behind the Trainer callback and the Accelerate-loop hook.

It owns a run's lifecycle: :meth:`TieGuard.start` (capture), :meth:`TieGuard.step` (periodic checks, combined over
ranks), :meth:`TieGuard.finish` (last check, verified merge, summary). Front doors only translate their framework's
events into these three calls.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch.distributed as dist
from torch import nn

from .atomic import write_json_atomic
from .config import TieGuardConfig
from .distributed import (full_state_dict, gather_objects, has_sharded_parameters, is_distributed, is_main_process,
                          unsharded_replica, world, zero3_integration_paused)
from .errors import TieBrokenError, TieGuardError
from .events import EventLog
from .merge import REPORT_NAME, safe_merge_and_unload
from .peft_layout import PeftModel
from .sinks import resolve_sinks
from .watch import CheckResult, TieWatcher, combine_over_ranks, emit_findings

#: File written into ``Accelerator.save_state`` checkpoints: the captured baseline and the check at save time.
STATE_NAME = "tie_guard_state.json"


def read_checkpoint_state(checkpoint_dir: str | Path) -> dict:
    """The captured baseline stored in ``checkpoint_dir/`` :data:`STATE_NAME` by :meth:`TieGuard.save_to`.

    Raises:
        FileNotFoundError: no such file, with the fix.
    """
    path = Path(checkpoint_dir) / STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {checkpoint_dir} was not saved while tie_guard watched the run (or is not a "
            "checkpoint directory). Fix: resume from a checkpoint written by accelerator.save_state after "
            "guard_accelerator(...), or start without resume_from (the tie groups are then captured afresh).")
    return json.loads(path.read_text())["attributes"]["resume_baseline"]


class TieGuard:
    """Capture, watch and merge the tie groups of one training run.

    In a distributed run every rank creates a ``TieGuard`` and makes the same calls in the same order (checks are
    collective: one ``all_reduce`` per check); only the main process (global rank 0) writes the JSONL file, logs to
    the trackers (:mod:`tie_guard.sinks`) and Python logging, and saves the merged model.

    Args:
        config: a :class:`TieGuardConfig`; keyword arguments override its fields.
        output_dir: run directory; the JSONL event file and ``config.merged_dir`` are relative to it.
        main_process: whether this process writes; default: global rank 0 of torch.distributed (or the only one).
        report_to: the Trainer's ``args.report_to``: the trackers that get tie_guard's metrics
            (``TieGuardConfig.trackers="auto"``).
        accelerator: an ``accelerate.Accelerator`` whose ``trackers`` get them instead (custom loops).
    Attributes:
        watcher: the :class:`TieWatcher` (after :meth:`start`).
        status: ``"not_started"``, ``"ok"``, ``"broken"`` or ``"merge_failed"``.
        should_stop: set when a check found a break and ``on_break="stop"``.
        merge_report / merged_model: from the end-of-run merge (main process only).
    """

    def __init__(self, config: TieGuardConfig | None = None, output_dir: str | Path = ".",
                 main_process: bool | None = None, report_to=None, accelerator=None, **overrides):
        self.config = dataclasses.replace(config or TieGuardConfig(), **overrides)
        self.output_dir = Path(output_dir)
        self.main_process = is_main_process() if main_process is None else main_process
        self.watcher: TieWatcher | None = None
        self.events: EventLog | None = None
        self.merge_report = None
        self.merged_model = None
        self.status = "not_started"
        self.should_stop = False
        self.resume_baseline: dict | None = None
        self.last_step = 0
        self._rank_digests: dict[str, list] = {}
        self.report_to = report_to
        self.accelerator = accelerator

    # ---------------------------------------------------------------------------------------------------------------
    def start(self, model: nn.Module, step: int = 0) -> list:
        """Capture the tie groups of ``model`` (after ``accelerator.prepare`` / wrapping, on every rank), log them, and
        compare with ``resume_baseline`` when resuming. Returns the groups.

        Raises:
            TieGuardError: ranks see different tie groups (distributed runs).
            FileExistsError: ``merged_dir`` holds an earlier run's output and ``overwrite_merged`` is False.
        """
        merged = self.output_dir / self.config.merged_dir
        if (self.config.merge_at_end and isinstance(model, PeftModel) and not self.config.overwrite_merged
                and merged.is_dir() and any(merged.iterdir())):
            raise FileExistsError(
                f"{merged} already holds the merged model of an earlier run, which this run's merge would replace. "
                "Fix: pass overwrite_merged=True (TieGuardConfig / --overwrite_merged true) to replace it, or choose "
                "another output_dir or merged_dir.")
        main = self.main_process
        sinks = resolve_sinks(self.config, self.output_dir, self.report_to, self.accelerator) if main else []
        jsonl = self.output_dir / self.config.events_file if (main and self.config.events_file) else None
        self.events = EventLog(jsonl, sinks, log=main)
        self.watcher = TieWatcher(model, self.events)
        groups = self.watcher.capture(step)
        self._gather_digests()
        self.status, self.last_step = "ok", step
        if self.resume_baseline:
            self._compare_with(self.resume_baseline, "the checkpoint")
        return groups

    def compare_checkpoint(self, checkpoint_dir: str | Path) -> list:
        """Compare the running model with the baseline stored in a checkpoint's :data:`STATE_NAME` (collective in
        distributed runs); findings are reported like a check's. Used as ``Accelerator.register_load_state_pre_hook``.

        Raises:
            FileNotFoundError: the checkpoint has no :data:`STATE_NAME`.
        """
        self._require_watcher()
        return self._compare_with(read_checkpoint_state(checkpoint_dir), str(checkpoint_dir))

    def step(self, step: int) -> CheckResult | None:
        """Call after every optimizer step (on every rank). Checks every ``config.check_every`` steps (divergence
        every ``divergence_every``), handles findings per ``on_break``; returns the check or ``None`` when no check
        was due.

        Raises:
            TieBrokenError: a finding with ``on_break="raise"`` (on every rank: findings are combined first).
        """
        self.last_step = step
        every = self.config.check_every
        if self.watcher is None or every <= 0 or step % every != 0:
            return None
        div_every = self.config.divergence_every or every
        res = self.watcher.check(step, divergence=step % div_every == 0)
        self._handle(res)
        return res

    def check_now(self, step: int | None = None) -> CheckResult:
        """A full check (with divergence) right now, e.g. before a checkpoint is written; same handling as
        :meth:`step`."""
        step = self.last_step if step is None else step
        res = self._require_watcher().check(step)
        self._handle(res)
        return res

    def finish(self, model: nn.Module, step: int | None = None, tokenizer=None) -> dict:
        """Last check, then (``merge_at_end`` and a PEFT model) the verified merge saved under
        ``output_dir/merged_dir`` by the main process; then the summary. Call on every rank.

        Sharded models (FSDP2 DTensors, ZeRO-3): the full state dict is gathered to the main process (collective),
        loaded into an unsharded copy rebuilt from the model's config, and that copy is merged.

        Returns:
            the summary (status, breaks, groups, divergence, merge figures).
        """
        watcher = self._require_watcher()
        step = self.last_step if step is None else step
        last = watcher.last_result
        # Decided alike on every rank (a check is collective): findings are combined over ranks, divergence values are
        # not when one rank could not compute its share (e.g. a tie broken there under ZeRO-3).
        reuse = last is not None and last.step == step and bool(last.divergence or last.findings)
        res = last if reuse else watcher.check(step)
        self._handle(res, final=True)
        summary = {"status": self.status, "breaks": watcher.n_findings, "groups": len(watcher.groups)}
        summary.update({f"divergence/{k}": v for k, v in res.divergence.items()})
        if self.config.merge_at_end and isinstance(model, PeftModel):
            summary.update(self._merge(model, step, tokenizer))
        elif self.config.merge_at_end:
            self.events.emit("merge_skipped", step, "info",
                             "no PEFT adapter to merge (full fine-tuning); the trained model itself keeps its ties: "
                             "save it with trainer.save_model() / accelerator.save_model()")
        summary["status"] = self.status
        self.events.summary(summary)
        self.events.finish()
        return summary

    # --- checkpoints ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Settings and captured baseline, JSON-serialisable (what a checkpoint carries). Each group's entry also
        holds ``rank_digests``: every rank's fingerprint digest of the frozen shared weight, since a sharded weight
        (ZeRO-3 partition, FSDP2 shard) is fingerprinted on the rank's own part. Not collective (the Trainer calls it
        on the main process only)."""
        baseline = self.resume_baseline
        if self.watcher is not None:
            baseline = {label: {**entry, "rank_digests": self._rank_digests.get(label)}
                        for label, entry in self.watcher.baseline().items()}
        return {"args": dataclasses.asdict(self.config), "attributes": {"resume_baseline": baseline}}

    def save_to(self, checkpoint_dir: str | Path) -> None:
        """Check now (collective), and on the main process write :data:`STATE_NAME` (baseline + this check) into
        ``checkpoint_dir`` atomically. Used as ``Accelerator.register_save_state_pre_hook``."""
        res = self.check_now()
        if self.main_process:
            state = self.state_dict()
            state["check"] = {"step": res.step, "ok": res.ok, "divergence": res.divergence,
                              "findings": [dataclasses.asdict(f) for f in res.findings]}
            write_json_atomic(Path(checkpoint_dir) / STATE_NAME, state)
            if not res.ok:
                self.events.emit("checkpoint", res.step, "error",
                                 f"checkpoint {checkpoint_dir} was saved with {len(res.findings)} tie finding(s): "
                                 "do not resume from it without fixing them", data={"dir": str(checkpoint_dir)})

    def load_from(self, checkpoint_dir: str | Path) -> None:
        """Read :data:`STATE_NAME` from a checkpoint before :meth:`start`, so that the resumed run compares with it
        (after :meth:`start`, use :meth:`compare_checkpoint`).

        Raises:
            FileNotFoundError: the checkpoint has no :data:`STATE_NAME`.
            RuntimeError: called after :meth:`start`.
        """
        if self.watcher is not None:
            raise RuntimeError("TieGuard.load_from must come before start(); use compare_checkpoint(dir) now")
        self.resume_baseline = read_checkpoint_state(checkpoint_dir)

    # ---------------------------------------------------------------------------------------------------------------
    def _require_watcher(self) -> TieWatcher:
        if self.watcher is None:
            raise RuntimeError("TieGuard.start(model) must be called before checks or finish()")
        return self.watcher

    def _gather_digests(self) -> None:
        """Every rank's frozen-weight digests (collective in combined runs), for :meth:`state_dict`."""
        local = {label: entry["digest"] for label, entry in self.watcher.baseline().items()}
        per_rank = gather_objects(local) if self.watcher.combine else [local]
        self._rank_digests = {label: [r.get(label) for r in per_rank] for label in local}

    def _compare_with(self, baseline: dict, source: str) -> list:
        rank, n = world()

        def own(entry: dict) -> dict:  # this rank's digest; none to compare when shards differ in number
            digests = entry.get("rank_digests")
            if not digests or len(set(digests)) == 1:
                return entry
            return {**entry, "digest": digests[rank] if len(digests) == n else None}

        findings = self.watcher.compare_baseline({label: own(entry) for label, entry in baseline.items()})
        if self.watcher.combine:
            findings, _ = combine_over_ranks(findings, [])
        emit_findings(self.events, self.last_step, findings)
        if findings:
            self.status = "broken"
        else:
            self.events.emit("resume", self.last_step, "info", f"tie groups and frozen shared weights match {source}")
        return findings

    def _handle(self, res: CheckResult, final: bool = False) -> None:
        if res.ok:
            return
        self.status = "broken"
        if any(f.kind == "frozen_modified" for f in res.findings):  # combined findings: alike on every rank
            self._gather_digests()  # the watcher re-fingerprinted the modified weight
        if self.config.on_break == "raise" and not final:
            raise TieBrokenError("; ".join(f.message for f in res.findings))
        if self.config.on_break == "stop":
            self.should_stop = True

    def _merge(self, model: PeftModel, step: int, tokenizer) -> dict:
        try:
            state = full_state_dict(model) if has_sharded_parameters(model) else None  # collective: every rank
        except TieGuardError as exc:  # raised on every rank alike: all ranks skip the merge together
            return self._merge_failed(step, exc)
        out = {}
        if self.main_process:
            out = self._merge_on_main(model, state, step, tokenizer)
        if is_distributed():
            dist.barrier()  # ranks leave together, after the main process has saved and verified (or failed)
        return out

    def _merge_failed(self, step: int, exc: TieGuardError) -> dict:
        self.status = "merge_failed"
        report = getattr(exc, "report", None)
        self.events.emit("merge", step, "error", f"merge failed: {exc}", metrics={"merge/verified": 0},
                         data={"report": report.to_dict() if report is not None else None})
        return {"merge/verified": False}

    def _merge_on_main(self, model: PeftModel, state: dict | None, step: int, tokenizer) -> dict:
        """Merge ``model`` (or, with the gathered ``state`` of a sharded model, its unsharded replica, merged in
        place). A ``TieGuardError`` (building the replica included) is logged as ``merge_failed``, not raised, so the
        other ranks' barrier is still met."""
        out = self.output_dir / self.config.merged_dir
        try:
            with zero3_integration_paused():  # the copy, the merge and the reload are plain models on this rank
                source = model if state is None else unsharded_replica(model, state)
                merged, report = safe_merge_and_unload(
                    source, self.config.tie_policy, output_dir=out, tokenizer=tokenizer, overwrite=True,
                    probe_shape=(self.config.probe_batch_size, self.config.probe_seq_len),
                    verify_reload=self.config.verify_reload, inplace=state is not None,
                )
        except TieGuardError as exc:
            return self._merge_failed(step, exc)
        self.merge_report, self.merged_model = report, merged
        write_json_atomic(self.output_dir / REPORT_NAME, report.to_dict())
        metrics = {
            "merge/verified": 1,
            "merge/max_abs_logit_diff": report.max_abs_logit_diff,
            "merge/logits_match": int(report.logits_match),
            "merge/logit_tolerance": report.logit_tolerance,
            "merge/untrained_input_embeddings_bit_identical": int(report.untrained_input_embeddings_bit_identical),
            "merge/seconds": sum(report.seconds.values()),
        }
        if report.reload_max_abs_logit_diff is not None:
            metrics["merge/reload_max_abs_logit_diff"] = report.reload_max_abs_logit_diff
        self.events.emit(
            "merge", step, "info",
            f"verified merge ({report.tie_policy}) saved to {out}: max |Δlogit| {report.max_abs_logit_diff:.3g} "
            f"(tolerance {report.logit_tolerance:.3g}), input embeddings bit-identical: "
            f"{report.untrained_input_embeddings_bit_identical}; " + "; ".join(report.actions),
            metrics=metrics, data={"report": report.to_dict()},
        )
        return {**metrics, "merge/verified": True, "merged_dir": str(out)}
