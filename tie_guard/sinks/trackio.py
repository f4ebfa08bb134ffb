"""Trackio sink (``pip install "tie_guard[trackio]"``): metrics ``tie_guard/<metric>`` with the Trainer's
``train/global_step`` in the same record (the key transformers' ``TrackioCallback`` logs the step under), the
groups as a ``trackio.Table``, errors as Trackio alerts (level ERROR), the final values as one last record.

transformers 5.24's ``TrackioCallback`` calls ``trackio.finish()`` in its ``on_train_end``, before user callbacks;
the sink then reopens the same run (``trackio.init(project, name, resume="must")``) for the merge numbers and the
final values, and finishes it again.
"""

from __future__ import annotations

from .base import PREFIX, Sink, table_cell

STEP_KEY = "train/global_step"


class TrackioSink(Sink):
    """Log tie_guard events to a Trackio run (trackio ≥ 0.20: ``Run.log``, ``Run.alert``, ``trackio.Table``).

    Args:
        run: a ``trackio`` run (``trackio.context_vars.current_run.get()`` or accelerate's ``TrackioTracker.run``).
    """

    name = "trackio"

    def __init__(self, run):
        import trackio

        self._trackio = trackio
        self.run = run
        self.reopened = False

    def _live(self):
        """The run, reopened when its owner already finished it."""
        if self._trackio.context_vars.current_run.get() is not self.run:
            self.run = self._trackio.init(project=self.run.project, name=self.run.name, resume="must")
            self.reopened = True
        return self.run

    def log_metrics(self, metrics, step, table=None) -> None:
        payload = dict(metrics)
        if table is not None:
            name, rows = table
            columns = list(rows[0]) if rows else ["empty"]
            payload[PREFIX + name] = self._trackio.Table(
                columns=columns, data=[[table_cell(r[c]) for c in columns] for r in rows])
        payload[STEP_KEY] = step
        self._live().log(payload)

    def alert(self, title, text, step) -> None:
        self._live().alert(title=title, text=text, level=self._trackio.AlertLevel.ERROR, step=step)

    def summary(self, values: dict) -> None:
        self._live().log({f"{PREFIX}summary/{k}": table_cell(v) for k, v in values.items()})

    def finish(self) -> None:
        if self.reopened:
            self._trackio.finish()


def for_trainer(output_dir, config) -> TrackioSink | None:
    """The sink of a Trainer run with ``report_to`` containing ``"trackio"``: the run ``TrackioCallback`` started
    in its ``on_train_begin``. ``None`` when no run is current."""
    import trackio

    run = trackio.context_vars.current_run.get()
    return None if run is None else TrackioSink(run)


def for_tracker(tracker, output_dir, config) -> TrackioSink:
    """The sink of accelerate's ``TrackioTracker`` (its ``run``)."""
    return TrackioSink(tracker.run)
