"""Render the README compatibility tables from the numbers the tests measured.

    TIE_GUARD_RESULTS=results .venv/bin/python -m pytest tests/test_setups.py -k merge_matrix
    .venv/bin/python scripts/compat_table.py results/compat.jsonl
    TIE_GUARD_RESULTS=results .venv/bin/python -m pytest tests/test_tuners.py
    .venv/bin/python scripts/compat_table.py --tuners results/tuners.jsonl
    TIE_GUARD_RESULTS=results .venv/bin/python -m pytest tests/test_architectures.py -k test_family
    .venv/bin/python scripts/compat_table.py --families results/families.jsonl
"""

from __future__ import annotations

import argparse
import json


def _f(x: float) -> str:
    return f"{x:.1e}" if x < 0.01 else f"{x:.2f}"


def render(rows: list[dict]) -> str:
    head = ("| setup (tiny tied Llama, vocab 256) | plain PEFT merge: input-emb rows changed | plain PEFT: max abs logit diff "
            "| tie_guard `untie`: input-emb rows changed | `untie`: max abs logit diff (after reload) | `untie`: tied after? "
            "| `keep_tied`: max abs logit diff |")
    out = [head, "|" + "---|" * 7]
    for r in rows:
        p, u, k = r["plain"], r["untie"], r["keep_tied"]
        trains = " (adapter trains it)" if u["adapter_trains_input"] else ""
        keep = "refused (sides differ)" if k["outcome"] == "refused" else _f(k["logit_diff"])
        out.append(
            f"| {r['setup']} | {p['embed_rows_changed']} | {_f(p['logit_diff'])} | {u['embed_rows_changed']}{trains} "
            f"| {_f(u['logit_diff'])} ({_f(u['reload_logit_diff'])}) | {'yes' if u['tied_after'] else 'no'} | {keep} |"
        )
    return "\n".join(out)


def render_tuners(rows: list[dict]) -> str:
    """The per-tuner table from ``tuners.jsonl`` rows (``tests/test_tuners.py``): one row per PEFT tuner on a tiny
    tied Llama's ``lm_head`` (+ ``q_proj``), trained 3 steps."""
    out = ["| PEFT tuner (on tied `lm_head` + `q_proj`) | outcome | max abs logit diff vs adapter (tolerance) "
           "| after reload: `output_dir` / user's `save_pretrained` | adapter's own effect on logits |",
           "|" + "---|" * 5]
    for r in rows:
        if r["outcome"] == "exact":
            out.append(f"| {r['tuner']} | exact merge | {_f(r['logit_diff'])} ({_f(r['tolerance'])}) "
                       f"| {_f(r['reload_output_dir_diff'])} / {_f(r['reload_user_save_diff'])} "
                       f"| {_f(r['adapter_effect'])} |")
        else:
            why = "refused up front" if r["outcome"] == "refused" else "PEFT itself fails"
            msg = r["message"].split(". Fix:")[0].replace("|", "\\|")
            out.append(f"| {r['tuner']} | {why}: {msg} | – | – | – |")
    return "\n".join(out)


def render_families(rows: list[dict]) -> str:
    """The per-family table from ``families.jsonl`` rows (``tests/test_architectures.py::test_family``): LoRA on each
    family's output embedding, both tie policies, eval mode and dropout active, saved by ``output_dir`` and by the
    user's own ``save_pretrained``."""
    by: dict[tuple, dict] = {}
    for r in rows:
        by.setdefault((r["kind"], r["family"]), {})[(r["policy"], r["mode"])] = r
    out = ["| family | kind | tie group members | `untie`: max abs logit diff vs adapter (eval / dropout) "
           "| after reload (`output_dir` / user's save) | equal copies made | `keep_tied`: logit shift |",
           "|" + "---|" * 7]
    for (kind, family), cells in sorted(by.items()):
        u_e, u_d, k_e = cells.get(("untie", "eval")), cells.get(("untie", "dropout")), cells.get(("keep_tied", "eval"))
        if not (u_e and u_d and k_e):
            continue
        out.append(f"| {family} | {kind} | {u_e['members']} | {_f(u_e['logit_diff'])} / {_f(u_d['logit_diff'])} "
                   f"| {_f(u_e['reload_logit_diff_ours'])} / {_f(u_e['reload_logit_diff_user'])} | {u_e['copies']} "
                   f"| {_f(k_e['logit_diff'])} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="compat.jsonl (tests/test_setups.py), or tuners.jsonl / families.jsonl")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--tuners", action="store_true", help="render the per-tuner table from tests/test_tuners.py")
    group.add_argument("--families", action="store_true",
                       help="render the per-family table from tests/test_architectures.py")
    args = ap.parse_args(argv)
    with open(args.results) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    print(render_tuners(rows) if args.tuners else render_families(rows) if args.families else render(rows))


if __name__ == "__main__":
    main()
