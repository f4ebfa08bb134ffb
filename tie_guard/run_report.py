"""An offline picture of a run from its JSONL events: divergence per group, event timeline, merge verification."""

from __future__ import annotations

from pathlib import Path

from .events import read_events, split_runs

_LEVEL_Y = {"debug": 0, "info": 1, "warning": 2, "error": 3}
_LEVEL_COLOR = {"debug": "#999999", "info": "#1f77b4", "warning": "#ff7f0e", "error": "#d62728"}


def summarize_events(events: list[dict], run: str | int | None = None) -> dict:
    """Divergence series per group, timeline points and the last merge result of one run of an events file.

    A file holds every run written into the same ``output_dir`` (each record carries its ``run_id``,
    :func:`tie_guard.events.split_runs`). ``run``: ``None`` for the last, a 1-based index (negative counts from
    the end) or a run id.

    Raises:
        ValueError: no such run (the message lists the runs in the file).
    """
    runs = split_runs(events)
    ids = [r[0].get("run_id") or f"#{i + 1}" for i, r in enumerate(runs)]
    if not runs:
        index = 0
    elif run is None:
        index = len(runs) - 1
    elif isinstance(run, int) or str(run).lstrip("-").isdigit():
        k = int(run)
        index = k - 1 if k > 0 else len(runs) + k
        if not 0 <= index < len(runs):
            raise ValueError(f"run {run} not in this file: it holds {len(runs)} run(s): {', '.join(ids)}")
    elif run in ids:
        index = ids.index(run)
    else:
        raise ValueError(f"no run {run!r} in this file; runs: {', '.join(ids)}")
    events = runs[index] if runs else []
    series: dict[str, list[tuple[int, float]]] = {}
    timeline = []
    merge = None
    for e in events:
        for key, value in (e.get("metrics") or {}).items():
            if key.startswith("divergence/") and value is not None:
                series.setdefault(key.split("/", 1)[1], []).append((e["step"], value))
        if e.get("event") not in ("check", "summary"):
            timeline.append((e.get("step") or 0, e.get("level") or "info", e.get("event"), e.get("message", "")))
        if e.get("event") == "merge":
            merge = e
    return {"series": series, "timeline": timeline, "merge": merge, "run_id": ids[index] if runs else None,
            "run_index": index + 1, "runs": ids}


def render_report(run_dir: str | Path, out: str | Path | None = None, events_file: str = "tie_guard_events.jsonl",
                  run: str | int | None = None) -> tuple[Path, dict]:
    """Write a PNG report of one run of ``run_dir/events_file`` (default ``run_dir/tie_guard_report.png``; the
    last run, see :func:`summarize_events` for ``run``).

    Returns:
        ``(png_path, summary)``; ``summary["run_id"]`` / ``["runs"]`` say which run was drawn and which exist.
    Raises:
        FileNotFoundError: no events file in ``run_dir``.
        ValueError: no such run.
        ImportError: matplotlib (the ``[report]`` extra) is not installed, with the pip line.
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError('the PNG report needs matplotlib: pip install "tie_guard[report]"') from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    path = run_dir / events_file
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: point at a run's output_dir written by TieGuardCallback")
    s = summarize_events(read_events(path), run)
    out = Path(out) if out else run_dir / "tie_guard_report.png"
    steps = [st for pts in s["series"].values() for st, _ in pts] + [st for st, *_ in s["timeline"]] or [0]
    lo, hi = min(steps), max(steps)
    pad = max(1.0, 0.08 * (hi - lo))  # room for the labels at both ends, and a visible axis for a 1-step run

    fig, axes = plt.subplots(3, 1, figsize=(10, 10), gridspec_kw={"height_ratios": [3, 2, 1.4]})
    ax = axes[0]
    for name, pts in sorted(s["series"].items()):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_title("divergence of effective output embedding from input embedding  ‖W_out − W_in‖_F / ‖W_in‖_F")
    ax.set_ylabel("relative divergence")
    if s["series"]:
        ax.legend(title="tie group")
    else:
        ax.text(0.5, 0.5, "no divergence recorded", ha="center", va="center", transform=ax.transAxes)

    ax = axes[1]
    stacked: dict[tuple[int, str], int] = {}
    for step, level, kind, _ in s["timeline"]:
        y = _LEVEL_Y.get(level, 1)
        k = stacked[(step, level)] = stacked.get((step, level), -1) + 1  # several events at one step: stack labels
        ax.scatter(step, y, color=_LEVEL_COLOR.get(level, "k"), s=60)
        ax.annotate(kind, (step, y), textcoords="offset points", xytext=(5, 6 + 11 * k), fontsize=8)
    ax.set_yticks(list(_LEVEL_Y.values()), list(_LEVEL_Y))
    ax.set_ylim(-0.5, 4.3)
    ax.set_title("events")
    for ax in axes[:2]:
        ax.set_xlim(lo - 0.5 * pad, hi + 1.5 * pad)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)

    ax = axes[2]
    ax.axis("off")
    merge = s["merge"]
    if merge is None:
        text = "no merge in this run"
    else:
        mt = merge.get("metrics", {})
        rep = (merge.get("data") or {}).get("report") or {}
        verified = bool(mt.get("merge/verified"))
        text = (f"merge: {'VERIFIED' if verified else 'FAILED'}   policy={rep.get('tie_policy')}   "
                f"dtype={rep.get('dtype')}\n"
                f"max |Δlogit| merged vs adapter: {rep.get('max_abs_logit_diff', float('nan')):.3g} "
                f"(tolerance {rep.get('logit_tolerance', float('nan')):.3g});  after reload: "
                f"{rep.get('reload_max_abs_logit_diff')}\n"
                "input embeddings the adapter does not train, bit-identical to the base: "
                f"{rep.get('untrained_input_embeddings_bit_identical')}\n"
                + "\n".join(rep.get("actions", [])[:3]))
        ax.set_facecolor("#e8f5e9" if verified else "#ffebee")
    ax.text(0.01, 0.95, text, va="top", ha="left", fontsize=9, family="monospace", transform=ax.transAxes, wrap=True)
    which = f"run {s['run_id']}" + (f" ({s['run_index']} of {len(s['runs'])} in this directory)"
                                    if len(s["runs"]) > 1 else "")
    fig.suptitle(f"tie_guard report: {run_dir.resolve().name} — {which}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out, s
