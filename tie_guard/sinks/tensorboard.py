"""TensorBoard sink (``pip install "tie_guard[tensorboard]"``): scalars ``tie_guard/<metric>`` at the Trainer's
``global_step``, the groups table, the final status and alerts as text (TensorBoard has no tables or alerts).

transformers 5.24's ``TensorBoardCallback`` writes under ``$TENSORBOARD_LOGGING_DIR`` or
``<output_dir>/runs/<time>_<host>`` (``TrainingArguments`` has no ``logging_dir`` any more), and its writer is not
reachable from another callback. So tie_guard writes its own event file into that same run directory: TensorBoard
(and its ``EventAccumulator``) reads every event file of a run directory as one run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .base import PREFIX, Sink, rows_as_markdown


class TensorBoardSink(Sink):
    """Write tie_guard events with a ``SummaryWriter`` (``torch.utils.tensorboard``).

    Args:
        writer: a ``SummaryWriter`` (accelerate's ``TensorBoardTracker.writer``) or ``None`` to open one in
            ``log_dir``.
        log_dir: the run directory for an own writer.
    Raises:
        ImportError: ``writer`` is None and the ``tensorboard`` package is missing.
    """

    name = "tensorboard"

    def __init__(self, writer=None, log_dir: str | os.PathLike | None = None):
        self.owned = writer is None
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(log_dir))
        self.writer = writer
        self.last_step = 0

    def log_metrics(self, metrics, step, table=None) -> None:
        self.last_step = step
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, global_step=step)
        if table is not None:
            name, rows = table
            self.writer.add_text(PREFIX + name, rows_as_markdown(rows), global_step=step)
        self.writer.flush()

    def alert(self, title, text, step) -> None:
        self.writer.add_text(PREFIX + "alert", f"**{title}**: {text}", global_step=step)
        self.writer.flush()

    def summary(self, values: dict) -> None:
        step = values.get("step", self.last_step)
        self.writer.add_text(PREFIX + "summary", "```\n" + json.dumps(values, indent=1, default=str) + "\n```",
                             global_step=step)
        self.writer.add_text(PREFIX + "status", str(values.get("status")), global_step=step)
        self.writer.flush()

    def finish(self) -> None:
        if self.owned:
            self.writer.close()
        else:
            self.writer.flush()


def trainer_log_dir(output_dir: str | os.PathLike) -> Path:
    """The run directory transformers' ``TensorBoardCallback`` (5.24) writes to: ``$TENSORBOARD_LOGGING_DIR``, else
    the newest ``<output_dir>/runs/*`` (the callback created it in its ``on_train_begin``, which runs before user
    callbacks), else a new ``<output_dir>/runs/<time>_<host>`` (transformers' ``default_logdir``)."""
    env = os.getenv("TENSORBOARD_LOGGING_DIR")
    if env:
        return Path(os.path.expanduser(env))
    runs = [p for p in (Path(output_dir) / "runs").glob("*") if p.is_dir()]
    if runs:
        return max(runs, key=lambda p: p.stat().st_mtime)
    from transformers.integrations.integration_utils import default_logdir

    return Path(output_dir) / default_logdir()


def for_trainer(output_dir, config) -> TensorBoardSink:
    """The sink of a Trainer run with ``report_to`` containing ``"tensorboard"``."""
    return TensorBoardSink(log_dir=trainer_log_dir(output_dir))


def for_tracker(tracker, output_dir, config) -> TensorBoardSink:
    """The sink of accelerate's ``TensorBoardTracker`` (its ``SummaryWriter``, which accelerate closes)."""
    return TensorBoardSink(writer=tracker.writer)
