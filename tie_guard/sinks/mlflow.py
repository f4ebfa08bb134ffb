"""MLflow sink (``pip install "tie_guard[mlflow]"``): metrics ``tie_guard/<metric>`` at the Trainer's
``global_step``, the groups table as a run table (``tie_guard/groups.json``), the final values and alerts as run
tags (MLflow has no run summary or alerts; tags, unlike params, may change).

Written through an ``MlflowClient`` on the run's id: transformers' ``MLflowCallback`` (5.24) ends the run in its
``on_train_end``, before user callbacks run, and MLflow still accepts metrics and tags on a finished run, so the
merge numbers logged at train end land in the same run.
"""

from __future__ import annotations

import re
import time

from .base import PREFIX, Sink, table_cell

_BAD = re.compile(r"[^0-9A-Za-z_\-. :/]")  # the characters MLflow 3 refuses in keys (as MLflowCallback sanitises)


class MlflowSink(Sink):
    """Log tie_guard events to one MLflow run.

    Args:
        run_id: the run (the Trainer's active run, or accelerate's ``MLflowTracker.active_run``).
        tracking_uri: its tracking URI (e.g. ``sqlite:///<dir>/mlflow.db``; mlflow 3 refuses a plain file store).
    """

    name = "mlflow"

    def __init__(self, run_id: str, tracking_uri: str | None = None):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id
        self.n_alerts = 0

    def log_metrics(self, metrics, step, table=None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(_BAD.sub("_", k), v, now, step) for k, v in metrics.items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
        if table is not None:
            name, rows = table
            columns = list(rows[0]) if rows else ["empty"]
            self.client.log_table(self.run_id, {c: [table_cell(r[c]) for r in rows] for c in columns},
                                  f"{PREFIX}{name}.json")

    def alert(self, title, text, step) -> None:
        self.n_alerts += 1
        self.client.set_tag(self.run_id, f"{PREFIX}alert/{self.n_alerts}", f"step {step}: {title}: {text}"[:5000])

    def summary(self, values: dict) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag(_BAD.sub("_", PREFIX + k), str(v)[:5000]) for k, v in values.items()]
        self.client.log_batch(self.run_id, tags=tags, synchronous=True)


def for_trainer(output_dir, config) -> MlflowSink | None:
    """The sink of a Trainer run with ``report_to`` containing ``"mlflow"``: ``MLflowCallback`` started (or
    joined) the active run in its ``on_train_begin``. ``None`` when no run is active."""
    import mlflow

    run = mlflow.active_run()
    return None if run is None else MlflowSink(run.info.run_id, mlflow.get_tracking_uri())


def for_tracker(tracker, output_dir, config) -> MlflowSink:
    """The sink of accelerate's ``MLflowTracker`` (its ``active_run``)."""
    import mlflow

    return MlflowSink(tracker.active_run.info.run_id, mlflow.get_tracking_uri())
