"""An offline picture of a run from its JSONL events: divergence per group, event timeline, merge verification."""

from __future__ import annotations

from pathlib import Path

from .events import read_events

_LEVEL_Y = {"debug": 0, "info": 1, "warning": 2, "error": 3}
_LEVEL_COLOR = {"debug": "#999999", "info": "#1f77b4", "warning": "#ff7f0e", "error": "#d62728"}


def summarize_events(events: list[dict]) -> dict:
    """Divergence series per group, timeline points and the last merge result of one events file.

    When the file holds several runs (a rerun into the same output dir appends), only the last run (from its last
    ``capture`` event) is used.
    """
    starts = [i for i, e in enumerate(events) if e.get("event") == "capture"]
    events = events[starts[-1]:] if starts else events
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
    return {"series": series, "timeline": timeline, "merge": merge}


def render_report(run_dir: str | Path, out: str | Path | None = None, events_file: str = "tie_guard_events.jsonl") -> Path:
    """Write a PNG report of ``run_dir/events_file`` (default ``run_dir/tie_guard_report.png``).

    Raises:
        FileNotFoundError: no events file in ``run_dir``.
        ImportError: matplotlib is not installed (the message gives ``pip install "tie_guard[report]"``).
    """
    from .sinks.base import require_extra

    matplotlib = require_extra("matplotlib", "tie-guard report (the PNG run report)", "report")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    path = run_dir / events_file
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: point at a run's output_dir written by TieGuardCallback")
    s = summarize_events(read_events(path))
    out = Path(out) if out else run_dir / "tie_guard_report.png"

    fig, axes = plt.subplots(3, 1, figsize=(10, 10), gridspec_kw={"height_ratios": [3, 2, 1.4]})
    ax = axes[0]
    for name, pts in sorted(s["series"].items()):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_title("divergence of effective output embedding from input embedding  ‖W_out − W_in‖_F / ‖W_in‖_F")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("relative divergence")
    if s["series"]:
        ax.legend(title="tie group")
    else:
        ax.text(0.5, 0.5, "no divergence recorded", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)

    ax = axes[1]
    for step, level, kind, _ in s["timeline"]:
        ax.scatter(step, _LEVEL_Y.get(level, 1), color=_LEVEL_COLOR.get(level, "k"), s=60)
        ax.annotate(kind, (step, _LEVEL_Y.get(level, 1)), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.set_yticks(list(_LEVEL_Y.values()), list(_LEVEL_Y))
    ax.set_ylim(-0.5, 3.8)
    ax.set_xlabel("optimizer step")
    ax.set_title("events")
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
                f"input embeddings bit-identical: {rep.get('input_embeddings_bit_identical')}\n"
                + "\n".join(rep.get("actions", [])[:3]))
        ax.set_facecolor("#e8f5e9" if verified else "#ffebee")
    ax.text(0.01, 0.95, text, va="top", ha="left", fontsize=9, family="monospace", transform=ax.transAxes, wrap=True)
    fig.suptitle(f"tie_guard report: {run_dir.name}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
