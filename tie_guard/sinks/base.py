"""The one interface every tracker sink implements, and the missing-extra message shared by all optional features.

A sink receives tie_guard's :class:`tie_guard.events.Event` objects from :class:`tie_guard.events.EventLog` (main
process only). Metric keys are ``tie_guard/<metric>`` (``tie_guard/divergence/lm_head``, ``tie_guard/breaks``,
``tie_guard/check_seconds``, ``tie_guard/merge/verified`` ...) at the Trainer's ``global_step``.
"""

from __future__ import annotations

import logging
import numbers

logger = logging.getLogger("tie_guard")

PREFIX = "tie_guard/"
_warned: set[str] = set()


def install_line(extra: str) -> str:
    """The exact command that installs ``tie_guard``'s optional feature ``extra`` (``pyproject.toml`` extras)."""
    return f'pip install "tie_guard[{extra}]"'


def warn_missing_extra(feature: str, extra: str, package: str) -> None:
    """Log one warning per process and ``extra``: ``feature`` needs ``package``, with the install line. Used when a
    requested tracker's package is not installed (the run goes on without that tracker)."""
    if extra in _warned:
        return
    _warned.add(extra)
    logger.warning("tie_guard: %s needs the %r package, which is not installed; tie_guard does not log there. "
                   "Fix: %s (or pip install %s)", feature, package, install_line(extra), package)


def require_extra(module: str, feature: str, extra: str, package: str | None = None):
    """Import ``module`` for ``feature`` or raise :class:`ImportError` naming the ``pip install`` line.

    Raises:
        ImportError: ``module`` is not installed; the message gives ``pip install "tie_guard[<extra>]"``.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{feature} needs the {package or module!r} package, which is not installed. "
                          f"Fix: {install_line(extra)}") from exc


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """``{"tie_guard/<k>": float(v)}`` for the real numbers (NaN/Inf included) in ``metrics`` (bools as 0/1); other values
    are dropped (a tracker's scalar API takes numbers only)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, numbers.Real):
            out[PREFIX + k] = float(v)
    return out


def rows_as_markdown(rows: list[dict]) -> str:
    """A Markdown table of ``rows`` (list of dicts with the same keys), for trackers that show text only."""
    if not rows:
        return "(empty)"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def table_cell(value):
    """A table cell value: numbers and bools as they are, anything else as text."""
    return value if isinstance(value, (int, float, bool)) else str(value)


class Sink:
    """What a tracker sink implements. :meth:`log_event` is shared; subclasses implement the four writers.

    Subclasses: :class:`tie_guard.sinks.wandb.WandbSink`, :class:`tie_guard.sinks.tensorboard.TensorBoardSink`,
    :class:`tie_guard.sinks.mlflow.MlflowSink`, :class:`tie_guard.sinks.trackio.TrackioSink`.

    Attributes:
        name: the tracker's ``report_to`` name (``"wandb"``, ``"tensorboard"``, ``"mlflow"``, ``"trackio"``).
    """

    name = "sink"

    def log_event(self, ev, table: tuple[str, list[dict]] | None = None) -> None:
        """Write one event: its numbers at ``ev.step``, the optional ``table=(name, rows)``, and an alert when the
        event's level is ``"error"``."""
        metrics = scalar_metrics(ev.metrics)
        if metrics or table is not None:
            self.log_metrics(metrics, ev.step, table)
        if ev.level == "error":
            self.alert(f"tie_guard: {ev.event}", ev.message[:1000] or ev.event, ev.step)

    def log_metrics(self, metrics: dict[str, float], step: int, table: tuple[str, list[dict]] | None = None) -> None:
        """Write ``metrics`` (keys already ``tie_guard/...``) at the Trainer's ``step``, and ``table`` if given."""
        raise NotImplementedError

    def summary(self, values: dict) -> None:
        """Final values of the run (``status``, ``breaks``, ``groups``, ``merge/...``): the tracker's run summary
        where it has one, else its params/tags or a text record."""
        raise NotImplementedError

    def alert(self, title: str, text: str, step: int) -> None:
        """An error the user must see: the tracker's alert where it has one, else a tag/text record."""
        raise NotImplementedError

    def finish(self) -> None:
        """Flush; close what the sink opened itself (never the Trainer's or the accelerator's own run/writer)."""
