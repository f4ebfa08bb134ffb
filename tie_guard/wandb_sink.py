"""Weights & Biases sink for tie_guard events.

Key layout (all aligned with the Trainer's ``train/global_step``, as transformers' ``WandbCallback`` defines it):

* ``tie_guard/groups``: a ``wandb.Table`` with one row per tie-group member (logged at capture);
* ``tie_guard/<metric>``: per-check numbers, e.g. ``tie_guard/divergence/lm_head``, ``tie_guard/breaks``;
* ``tie_guard/merge/<metric>``: merge verification numbers;
* run summary ``tie_guard/status`` and friends; events of level ``error`` also become W&B alerts.
"""

from __future__ import annotations

import os

STEP_KEY = "train/global_step"


class WandbSink:
    """Log :class:`tie_guard.events.Event` objects to a W&B run.

    Args:
        run: a ``wandb`` run object (``wandb.run`` or the result of ``wandb.init``).
        owned: True when tie_guard started the run and must finish it.
    """

    def __init__(self, run, owned: bool = False):
        import wandb

        self._wandb = wandb
        self.run = run
        self.owned = owned
        if owned:
            run.define_metric(STEP_KEY)
            run.define_metric("tie_guard/*", step_metric=STEP_KEY, step_sync=True)

    def log_event(self, ev, table=None) -> None:
        payload = {f"tie_guard/{k}": v for k, v in ev.metrics.items()}
        if table is not None:
            name, rows = table
            columns = list(rows[0].keys()) if rows else ["empty"]
            payload[f"tie_guard/{name}"] = self._wandb.Table(
                columns=columns, data=[[str(r[c]) if not isinstance(r[c], (int, float, bool)) else r[c]
                                        for c in columns] for r in rows]
            )
        if payload:
            payload[STEP_KEY] = ev.step
            self.run.log(payload)
        if ev.level == "error":
            self.run.alert(
                title=f"tie_guard: {ev.event}",
                text=ev.message[:1000] or ev.event,
                level=self._wandb.AlertLevel.ERROR,
            )

    def summary(self, values: dict) -> None:
        for k, v in values.items():
            self.run.summary[f"tie_guard/{k}"] = v

    def finish(self) -> None:
        if self.owned:
            self.run.finish()


def resolve_wandb(mode: str, project: str, directory: str | os.PathLike | None) -> WandbSink | None:
    """Pick the W&B run to log to.

    ``"auto"``: the active run (``wandb.run``: the Trainer's when ``report_to`` includes wandb) or none.
    ``"always"``: the active run, else start one (offline unless ``WANDB_MODE`` says otherwise).
    ``"never"``: none. Returns ``None`` when no run is used or wandb is not installed.
    """
    if mode == "never":
        return None
    try:
        import wandb
    except ImportError:  # pragma: no cover - wandb is a declared dependency
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
