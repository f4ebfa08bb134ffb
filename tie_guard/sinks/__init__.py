"""Tracker sinks: tie_guard's metrics in every tracker the run reports to.

One interface (:class:`tie_guard.sinks.base.Sink`), one module per tracker, each imported only when its tracker is
used. :func:`resolve_sinks` follows the Trainer's ``args.report_to`` (``"all"`` is already expanded by
``TrainingArguments`` to the installed integrations) or an ``accelerate.Accelerator``'s ``trackers``
(``Accelerator(log_with=...)`` + ``init_trackers``).

=============  =========================  ============================================================
report_to      extra                      what tie_guard writes
=============  =========================  ============================================================
wandb          ``tie_guard[wandb]``       history, ``wandb.Table`` of groups, run summary, alerts
tensorboard    ``tie_guard[tensorboard]`` scalars; groups, status and alerts as text
mlflow         ``tie_guard[mlflow]``      metrics, run table ``tie_guard/groups.json``, final values and alerts as tags
trackio        ``tie_guard[trackio]``     records with ``train/global_step``, ``trackio.Table``, alerts
=============  =========================  ============================================================
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os

from .base import Sink, warn_missing_extra

logger = logging.getLogger("tie_guard")

#: report_to name → (module whose presence makes the tracker usable, tie_guard extra, pip package)
TRACKERS = {
    "wandb": ("wandb", "wandb", "wandb"),
    "tensorboard": ("tensorboard", "tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow", "mlflow-skinny"),
    "trackio": ("trackio", "trackio", "trackio"),
}


def requested_trackers(setting: str, report_to=None, accelerator=None) -> list[str]:
    """The tracker names a run asks for: ``TieGuardConfig.trackers`` when it names trackers, else (``"auto"``) the
    accelerator's trackers or the Trainer's ``report_to``; ``"none"``: no tracker (W&B still follows
    ``TieGuardConfig.wandb="always"``)."""
    if setting == "none":
        return []
    if setting != "auto":
        return [n.strip() for n in setting.split(",") if n.strip()]
    if accelerator is not None:
        return [t.name for t in getattr(accelerator, "trackers", [])]
    if isinstance(report_to, str):
        report_to = [report_to]
    return [n for n in (report_to or []) if n not in ("none", "all")]


def _available(name: str) -> bool:
    module, extra, package = TRACKERS[name]
    if importlib.util.find_spec(module) is not None:
        return True
    warn_missing_extra(f"report_to={name!r}", extra, package)
    return False


def _accelerate_tracker(accelerator, name: str):
    return next((t for t in getattr(accelerator, "trackers", []) if t.name == name), None) if accelerator else None


def resolve_sinks(config, output_dir: str | os.PathLike, report_to=None, accelerator=None) -> list[Sink]:
    """The sinks of one run (call on the main process, after the trackers started: in the Trainer's
    ``on_train_begin``, which transformers runs for ``report_to`` callbacks before user callbacks; in a custom loop
    after ``accelerator.init_trackers``).

    Args:
        config: a :class:`tie_guard.TieGuardConfig` (``trackers``, ``wandb``, ``wandb_project``).
        output_dir: the run directory (TensorBoard's default log dir and an own W&B run live under it).
        report_to: the Trainer's ``args.report_to`` (list of names).
        accelerator: an ``accelerate.Accelerator`` whose ``trackers`` to follow instead.
    Returns:
        one sink per requested tracker that is installed and has a run; a requested tracker whose package is
        missing gets one warning naming the ``pip install`` line and no sink. Names tie_guard has no sink for
        (e.g. ``comet_ml``) are logged once at debug level.
    Raises:
        ImportError: ``TieGuardConfig(wandb="always")`` without wandb installed.
    """
    from .wandb import WandbSink, resolve_wandb

    names = requested_trackers(config.trackers, report_to, accelerator)
    sinks: list[Sink] = []
    wandb_tracker = _accelerate_tracker(accelerator, "wandb")
    if wandb_tracker is not None and config.wandb != "never":
        sinks.append(WandbSink(wandb_tracker.run, owned=False))
    else:
        wandb_sink = resolve_wandb(config.wandb, config.wandb_project, output_dir,
                                   requested="wandb" in names and _available("wandb"))
        if wandb_sink is not None:
            sinks.append(wandb_sink)
    for name in dict.fromkeys(names):
        if name == "wandb":
            continue
        if name not in TRACKERS:
            logger.debug("tie_guard has no sink for tracker %r; its metrics go to the other trackers", name)
            continue
        if not _available(name):
            continue
        module = importlib.import_module(f"{__name__}.{name}")
        tracker = _accelerate_tracker(accelerator, name)
        sink = (module.for_tracker(tracker, output_dir, config) if tracker is not None
                else module.for_trainer(output_dir, config))
        if sink is None:
            logger.warning("tie_guard: report_to asks for %s but no %s run is active; tie_guard does not log there",
                           name, name)
        else:
            sinks.append(sink)
    return sinks


__all__ = ["TRACKERS", "Sink", "requested_trackers", "resolve_sinks"]
