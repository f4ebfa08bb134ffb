"""``tie-guard``: inspect, merge and verify checkpoints on disk, and render an offline report of a run.

A thin front door over the same core as the callback (find_tied_groups, TieWatcher, safe_merge_and_unload,
audit_checkpoint, render_report). Exit codes: 0 sound / done, 1 unsound / failed verification, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from rich.markup import escape

EXIT_OK, EXIT_UNSOUND, EXIT_USAGE = 0, 1, 2
EXIT_CODES = "exit codes: 0 sound / done, 1 unsound / refused / failed verification, 2 usage error (bad input)"


class _Results:
    """Where a command's results go: the process's real standard output, while every library's own output
    (deepspeed's accelerator detection logs to stdout at import, transformers' load reports...) is sent to standard
    error for the duration of the command, at the file-descriptor level, so ``--json`` output parses."""

    stream = sys.stdout

    def __enter__(self):
        sys.stdout.flush()
        self._saved = os.dup(1)
        os.dup2(2, 1)
        _Results.stream = os.fdopen(os.dup(self._saved), "w")
        return self

    def __exit__(self, *exc):
        _Results.stream.flush()
        _Results.stream.close()
        _Results.stream = sys.stdout
        sys.stdout.flush()
        os.dup2(self._saved, 1)
        os.close(self._saved)


def _out(text: str) -> None:
    """Print one result line (see :class:`_Results`)."""
    print(text, file=_Results.stream, flush=True)


def _console():
    from rich.console import Console

    # Wide enough for the groups table when piped (rich falls back to 80 columns without a terminal).
    return Console(file=_Results.stream, highlight=False, width=None if _Results.stream.isatty() else 160)


def _groups_table(groups, divergence: dict, title: str):
    from rich.table import Table

    table = Table(title=title)
    for col in ("group", "status", "member", "role", "touched by", "shape", "dtype", "divergence"):
        table.add_column(col)
    for g in groups:
        for i, row in enumerate(g.as_rows()):
            div = divergence.get(g.label) if i == 0 else None
            cells = (row["group"] if i == 0 else "", row["status"] if i == 0 else "", row["member"], row["role"],
                     row["touched_by"], row["shape"], row["dtype"].replace("torch.", ""),
                     f"{div:.3g}" if div is not None else "")
            table.add_row(*(escape(c) for c in cells))
    return table


def cmd_inspect(args) -> int:
    from .events import EventLog
    from .loading import load_adapter, load_model, parse_dtype
    from .merge import plain_merge_changes_input_embeddings
    from .watch import TieWatcher

    model, _ = load_model(args.model, parse_dtype(args.dtype))
    if args.adapter:
        model = load_adapter(model, args.adapter)
    events = EventLog(log=False)  # the warnings are printed below, once
    watcher = TieWatcher(model, events, combine=False)
    groups = watcher.capture()
    res = watcher.check(0, emit=False)
    plain = plain_merge_changes_input_embeddings(groups)
    warnings = [(e.level, e.message) for e in events.events if e.event == "setup_warning"]
    if args.json:
        _out(json.dumps({"groups": [r for g in groups for r in g.as_rows()], "divergence": res.divergence,
                          "config_flags": groups[0].config_flags if groups else {},
                          "plain_merge_changes_input_embeddings": plain,
                          "warnings": [{"level": lv, "message": m} for lv, m in warnings]}, indent=2))
        return EXIT_OK
    con = _console()
    if not groups:
        con.print("no tied weights: nothing for tie_guard to guard")
        return EXIT_OK
    con.print(_groups_table(groups, res.divergence, f"tie groups of {args.model}"
                            + (f" + adapter {args.adapter}" if args.adapter else "")))
    con.print(escape(f"config tie flags: {groups[0].config_flags}"))
    if args.adapter:
        con.print("plain PEFT merge_and_unload(): " + (
            "[bold red]would change the tied input embeddings[/] (the adapter's output-side delta lands in the shared "
            "matrix). Use `tie-guard merge`." if plain else "would not write into a tied input embedding."))
    for level, message in warnings:
        con.print(f"[{'red' if level == 'error' else 'yellow' if level == 'warning' else 'blue'}]{level}:[/] "
                  + escape(message))
    return EXIT_OK


def cmd_merge(args) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .atomic import check_destination
    from .loading import load_adapter, load_model, load_tokenizer, parse_dtype
    from .merge import REPORT_NAME, safe_merge_and_unload

    out = os.path.abspath(args.out)
    for src in (args.base, args.adapter):
        if os.path.abspath(src) == out or out.startswith(os.path.abspath(src) + os.sep):
            print(f"error: OUT ({args.out}) lies inside an input ({src}); tie-guard never writes into its inputs. "
                  "Fix: choose an output directory elsewhere.", file=sys.stderr)
            return EXIT_USAGE
    check_destination(out, args.force, flag="--force")  # before the (slow) loading
    if args.stream:  # shard by shard: the model is never in memory (tie_guard.streaming)
        from .packaged import resolve_model_path
        from .streaming import STREAM_REPORT_NAME, stream_merge

        rep = stream_merge(resolve_model_path(args.base), args.adapter, out, args.tie_policy, overwrite=args.force,
                           progress=not args.quiet, end_to_end_layers=args.check_layers)
        e2e = rep.end_to_end
        # The in-memory merge's summary keys, plus what only the stream checks (the full report is on disk).
        _out(json.dumps({"output_dir": out, "report": os.path.join(out, STREAM_REPORT_NAME), "verified": rep.verified,
                         "max_abs_logit_diff": e2e.get("max_abs_logit_diff"),
                         "logit_tolerance": e2e.get("logit_tolerance"),
                         "untrained_input_embeddings_bit_identical": rep.input_embeddings_bit_identical,
                         "actions": rep.actions, "warnings": rep.warnings, "shards": rep.shards,
                         "tensors_merged": len(rep.merged), "tensors_copied": rep.copied,
                         "max_randomized_check_err_over_tol": max(
                             (f["max_err_over_tol"] for f in rep.freivalds.values()), default=None),
                         "end_to_end": e2e}, indent=2))
        return EXIT_OK
    phases = ["load base", "load adapter", "merge", "verify", "save", "reload"]
    with Progress(TextColumn("{task.description:<14}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), disable=args.quiet) as prog:
        task = prog.add_task("load base", total=len(phases))

        def phase(name):
            prog.update(task, description=name, completed=phases.index(name))

        phase("load base")
        base, base_tok = load_model(args.base, parse_dtype(args.dtype))
        phase("load adapter")
        model = load_adapter(base, args.adapter)
        tokenizer = load_tokenizer(args.adapter) or base_tok
        # The models were loaded here and are discarded after: merge untied layers in place (memory floor).
        merged, report = safe_merge_and_unload(model, args.tie_policy, output_dir=out, tokenizer=tokenizer,
                                               overwrite=args.force, progress=phase, inplace=True)
        prog.update(task, description="done", completed=len(phases))
    summary = {"output_dir": out, "report": os.path.join(out, REPORT_NAME), "verified": report.verified,
               "max_abs_logit_diff": report.max_abs_logit_diff, "logit_tolerance": report.logit_tolerance,
               "reload_max_abs_logit_diff": report.reload_max_abs_logit_diff,
               "untrained_input_embeddings_bit_identical": report.untrained_input_embeddings_bit_identical, "actions": report.actions,
               "warnings": report.warnings}
    _out(json.dumps(summary, indent=2))
    return EXIT_OK


def cmd_verify(args) -> int:
    from .checkpoint_audit import audit_checkpoint, check_same_architecture
    from .loading import load_adapter, load_model, load_tokenizer, parse_dtype

    dtype = parse_dtype(args.dtype)
    merged, tok = load_model(args.merged, dtype, local_only=True)
    base, base_tok = load_model(args.base, dtype)
    check_same_architecture(merged, base)  # before an adapter is put on a base it does not fit
    adapter_model = None
    if args.adapter:
        adapter_base, _ = load_model(args.base, dtype)
        adapter_model = load_adapter(adapter_base, args.adapter)
    rep = audit_checkpoint(args.merged, merged, base, tok or base_tok or load_tokenizer(args.adapter),
                           adapter_model, args.adapter)
    if args.json:
        _out(json.dumps(rep.to_dict(), indent=2))
    else:
        con = _console()
        con.print(f"[bold]{'SOUND' if rep.sound else 'UNSOUND'}[/]: {args.merged}")
        con.print(f"input embeddings vs base: {rep.input_embedding_rows_changed} rows changed, "
                  f"max |Δ| {rep.input_embedding_max_abs_change:.3g}")
        for t in rep.changed_tokens[:5]:
            con.print(escape(f"  token {t['id']} {t['token']!r}: max |Δ| {t['max_abs_change']:.3g}"))
        con.print(escape(f"tie flags: {rep.tie_flags}; stored: {rep.stored_keys}"))
        if rep.max_abs_logit_diff is not None:
            con.print(f"merged vs base + adapter: max |Δlogit| {rep.max_abs_logit_diff:.3g} "
                      f"(tolerance {rep.logit_tolerance:.3g})")
        for r in rep.runtimes:
            con.print("runtimes: " + escape(r))
        for p in rep.problems:
            con.print("[red]problem:[/] " + escape(p))
    return EXIT_OK if rep.sound else EXIT_UNSOUND


def cmd_report(args) -> int:
    from .run_report import render_report

    try:
        path, summary = render_report(args.run_dir, args.out, run=args.run)
    except ImportError as exc:  # the [report] extra (matplotlib) is missing: say the pip install line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if len(summary["runs"]) > 1:
        print(f"drew run {summary['run_id']} ({summary['run_index']} of {len(summary['runs'])} in "
              f"{args.run_dir}: {', '.join(summary['runs'])}; pick another with --run)", file=sys.stderr)
    _out(str(path))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tie-guard", description=__doc__.splitlines()[0], epilog=EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    dtype_help = "float32 | bfloat16 | float16 | auto (default: float32)"
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--online", action="store_true",
                        help="allow hub ids to be downloaded (default: offline; only packaged names and local paths)")

    def command(name: str, help: str, loads_models: bool = True) -> argparse.ArgumentParser:
        """A subcommand with the exit codes in its --help, and --online where it loads models."""
        return sub.add_parser(name, help=help, parents=[common] if loads_models else [], epilog=EXIT_CODES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    s = command("inspect", "tie groups of a model (and what an adapter touches)")
    s.add_argument("model", help="checkpoint dir, .gguf file, packaged model name or hub id")
    s.add_argument("--adapter", help="PEFT adapter directory")
    s.add_argument("--dtype", default="float32", help=dtype_help)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_inspect)

    s = command("merge", "verified merge of ADAPTER into BASE, written atomically to OUT")
    s.add_argument("base", metavar="BASE", help="checkpoint dir, .gguf file, packaged model name or hub id")
    s.add_argument("adapter", metavar="ADAPTER", help="PEFT adapter directory")
    s.add_argument("out", metavar="OUT", help="output directory (must not exist unless --force)")
    s.add_argument("--tie-policy", default="untie", choices=["untie", "keep_tied", "error"],
                   help="tied groups the adapter changes on one side: 'untie' (default: exact; the input embeddings "
                        "stay bit-identical and the saved config will not re-tie), 'keep_tied' (one matrix holding "
                        "the adapted side's value: logits shift), 'error' (refuse)")
    s.add_argument("--dtype", default="float32", help=dtype_help)
    s.add_argument("--force", action="store_true", help="replace an existing OUT (after verification)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.add_argument("--stream", action="store_true",
                   help="merge a safetensors BASE directory shard by shard, for checkpoints larger than memory (LoRA, "
                        "modules_to_save, trainable tokens; --dtype is the checkpoint's own)")
    s.add_argument("--check-layers", type=int, metavar="K",
                   help="with --stream: the end-to-end logit check loads only the first K decoder layers (default: all)")
    s.set_defaults(func=cmd_merge)

    s = command("verify", "audit a merged checkpoint made by any tool")
    s.add_argument("merged", metavar="MERGED", help="merged checkpoint directory")
    s.add_argument("--base", required=True, help="the base it was merged from")
    s.add_argument("--adapter", help="the adapter it was merged from (enables the logit check)")
    s.add_argument("--dtype", default="float32", help=dtype_help)
    s.add_argument("--json", action="store_true", help="machine-readable output (for CI gates)")
    s.set_defaults(func=cmd_verify)

    s = command("report", "PNG report of a run from its tie_guard_events.jsonl", loads_models=False)
    s.add_argument("run_dir", metavar="RUN_DIR", help="the run's output_dir")
    s.add_argument("--out", help="PNG path (default RUN_DIR/tie_guard_report.png)")
    s.add_argument("--run", help="which run of RUN_DIR to draw when several wrote there: a run id, or 1-based index "
                                 "(-1: the last, the default)")
    s.set_defaults(func=cmd_report)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help (before any heavy import)
        return int(exc.code or 0)
    if not getattr(args, "online", False):
        # Names are never looked up on a hub unless asked: an unknown name fails at once instead of retrying a
        # connection for a minute. huggingface_hub reads this when first imported, which happens below.
        os.environ["HF_HUB_OFFLINE"] = "1"
    from .loading import check_adapter_dir, check_source

    try:  # bad model arguments are usage errors found before anything heavy is imported
        for source, local_only in ((getattr(args, "model", None), False), (getattr(args, "base", None), False),
                                   (getattr(args, "merged", None), True)):
            if source is not None:
                check_source(source, local_only)
        if getattr(args, "adapter", None) is not None:
            check_adapter_dir(args.adapter)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from transformers.utils import logging as hf_logging

    from .errors import TieGuardError

    hf_logging.disable_progress_bar()

    try:
        with _Results():
            return args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (TieGuardError, OSError) as exc:  # refused or failed merge: nothing was written
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNSOUND


if __name__ == "__main__":
    sys.exit(main())
