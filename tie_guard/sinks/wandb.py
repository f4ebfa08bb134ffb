"""Weights & Biases sink (``pip install "tie_guard[wandb]"``).

Key layout (all aligned with the Trainer's ``train/global_step``, as transformers' ``WandbCallback`` defines it):

* ``tie_guard/groups``: a ``wandb.Table`` with one row per tie-group member (logged at capture);
* ``tie_guard/<metric>``: per-check numbers, e.g. ``tie_guard/divergence/lm_head``, ``tie_guard/breaks``;
* ``tie_guard/merge/<metric>``: merge verification numbers;
* run summary ``tie_guard/status`` and friends; events of level ``error`` also become W&B alerts.
"""

from __future__ import annotations

import os
import sys

from .base import PREFIX, Sink, require_extra, table_cell, warn_missing_extra

STEP_KEY = "train/global_step"


class WandbSink(Sink):
    """Log tie_guard events to a W&B run (wandb 0.31: ``run.log``, ``run.summary``, ``run.alert``).

    Args:
        run: a ``wandb`` run object (``wandb.run``, the result of ``wandb.init``, or accelerate's
            ``WandBTracker.run``).
        owned: True when tie_guard started the run and must finish it.
    """

    name = "wandb"

    def __init__(self, run, owned: bool = False):
        import wandb

        self._wandb = wandb
        self.run = run
        self.owned = owned
        if owned:
            run.define_metric(STEP_KEY)
            run.define_metric("tie_guard/*", step_metric=STEP_KEY, step_sync=True)

    def log_metrics(self, metrics, step, table=None) -> None:
        payload = dict(metrics)
        if table is not None:
            name, rows = table
            columns = list(rows[0].keys()) if rows else ["empty"]
            payload[PREFIX + name] = self._wandb.Table(
                columns=columns, data=[[table_cell(r[c]) for c in columns] for r in rows])
        payload[STEP_KEY] = step
        self.run.log(payload)

    def alert(self, title, text, step) -> None:
        self.run.alert(title=title, text=text, level=self._wandb.AlertLevel.ERROR)

    def summary(self, values: dict) -> None:
        for k, v in values.items():
            self.run.summary[PREFIX + k] = v

    def finish(self) -> None:
        if self.owned:
            self.run.finish()


def resolve_wandb(mode: str, project: str, directory: str | os.PathLike | None,
                  requested: bool = False) -> WandbSink | None:
    """Pick the W&B run to log to.

    ``"auto"``: the active run (``wandb.run``: the Trainer's when ``report_to`` includes wandb, or one the user
    started) or none. ``"always"``: the active run, else start one (offline unless ``WANDB_MODE`` says otherwise).
    ``"never"``: none. wandb is imported only when ``requested`` (the run reports to wandb), ``mode="always"``, or
    the user's code already imported it. Returns ``None`` when no run is used.

    Raises:
        ImportError: ``mode="always"`` and wandb is not installed (with the ``pip install`` line).
    """
    if mode == "never" or not (requested or mode == "always" or "wandb" in sys.modules):
        return None
    try:
        import wandb
    except ImportError:
        if mode == "always":
            require_extra("wandb", "TieGuardConfig(wandb='always')", "wandb")
        warn_missing_extra("report_to=wandb", "wandb", "wandb")
        return None
    if wandb.run is not None:
        return WandbSink(wandb.run, owned=False)
    if mode != "always":
        return None
    kwargs = {"project": project, "mode": os.environ.get("WANDB_MODE", "offline")}
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
        kwargs["dir"] = str(directory)
    return WandbSink(wandb.init(**kwargs), owned=True)
