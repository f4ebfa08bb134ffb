"""One event stream: Python logging, a JSONL file, and the run's trackers (:mod:`tie_guard.sinks`)."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("tie_guard")

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


@dataclass
class Event:
    """One thing tie_guard observed or did.

    Attributes:
        event: kind, e.g. ``"capture"``, ``"setup_warning"``, ``"check"``, ``"break"``, ``"merge"``.
        step: the Trainer's ``global_step`` (optimizer steps) when it happened.
        level: ``"debug"``, ``"info"``, ``"warning"`` or ``"error"``.
        message: one line for people, naming the problem and the fix where there is one.
        metrics: numbers, logged to every tracker sink under ``tie_guard/<key>``.
        data: anything else JSON-serialisable (rows, reports).
    """

    event: str
    step: int
    level: str = "info"
    message: str = ""
    metrics: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_json(self) -> dict:
        return {
            "time": self.time,
            "step": self.step,
            "event": self.event,
            "level": self.level,
            "message": self.message,
            "metrics": self.metrics,
            "data": self.data,
        }


class EventLog:
    """Fan events out to logging, an optional JSONL file and the run's tracker sinks.

    Args:
        jsonl_path: file to append one JSON object per line to (created with parents); ``None`` disables it.
        sinks: :class:`tie_guard.sinks.base.Sink` objects (W&B, TensorBoard, MLflow, Trackio), e.g. from
            :func:`tie_guard.sinks.resolve_sinks`.
        log: also send messages to Python logging (``False`` on non-main ranks, so that each event is reported
            once per run, by the main process).
        run_id: written into every JSONL record (``"run_id"``), so that runs appended to one file (a rerun into the
            same ``output_dir``) stay apart; default :func:`new_run_id`.
    """

    def __init__(self, jsonl_path: str | os.PathLike | None = None, sinks=(), log: bool = True,
                 run_id: str | None = None):
        self.log = log
        self.run_id = run_id or new_run_id()
        self.jsonl_path = Path(jsonl_path) if jsonl_path else None
        self.sinks = list(sinks)
        self.events: list[Event] = []
        if self.jsonl_path is not None:
            self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, event: str, step: int, level: str = "info", message: str = "", metrics: dict | None = None,
             data: dict | None = None, table: tuple[str, list[dict]] | None = None) -> Event:
        """Record one event everywhere. ``table=(name, rows)`` also logs a table ``tie_guard/<name>`` to each
        sink (as text where the tracker has no tables)."""
        ev = Event(event, int(step), level, message, dict(metrics or {}), dict(data or {}))
        self.events.append(ev)
        if message and self.log:
            logger.log(_LEVELS.get(level, logging.INFO), "[tie_guard step %d] %s", ev.step, message)
        if self.jsonl_path is not None:
            with open(self.jsonl_path, "a") as f:
                f.write(json.dumps({"run_id": self.run_id, **ev.to_json()}, default=str) + "\n")
                f.flush()
        for sink in self.sinks:
            sink.log_event(ev, table=table)
        return ev

    def summary(self, values: dict) -> None:
        """Final values for each sink's run summary (``tie_guard/<key>``) and a ``summary`` JSONL record."""
        if self.jsonl_path is not None:
            with open(self.jsonl_path, "a") as f:
                f.write(json.dumps({"run_id": self.run_id, "time": time.time(), "step": values.get("step"),
                                    "event": "summary", "level": "info",
                                    "message": "", "metrics": {}, "data": values}, default=str) + "\n")
        for sink in self.sinks:
            sink.summary(values)

    def finish(self) -> None:
        """Flush the sinks and close what they opened themselves (never the Trainer's or accelerator's runs)."""
        for sink in self.sinks:
            sink.finish()


def new_run_id() -> str:
    """A run id that sorts by start time and does not collide: ``"20261201-120304-a1b2c3"``."""
    import secrets

    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def split_runs(events: list[dict]) -> list[list[dict]]:
    """The runs of one events file, oldest first: by ``run_id``; records without one (files written before run
    ids existed) start a new run at each ``capture`` event."""
    runs: list[list[dict]] = []
    ids: list = []
    for e in events:
        rid = e.get("run_id")
        if rid is None:
            if e.get("event") == "capture" or not runs:
                runs.append([])
                ids.append(None)
        elif rid not in ids:
            runs.append([])
            ids.append(rid)
        runs[ids.index(rid) if rid is not None else len(runs) - 1].append(e)
    return runs


def read_events(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL event file written by :class:`EventLog` (one dict per line)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
