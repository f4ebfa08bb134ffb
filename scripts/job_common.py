"""Pieces shared by the training scripts: the end-of-run summary and the reload-and-generate demo."""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tie_guard import find_tied_groups
from tie_guard.peft_layout import unwrapped_module
from tie_guard.probe import make_probe_ids, max_abs_diff, probe_logits


def parse_job_args(types: tuple, argv: list[str] | None = None) -> tuple:
    """Parse a training script's dataclasses from ``--config YAML`` plus command-line flags (TRL's ``TrlParser``:
    flags override the YAML), strictly: an unknown YAML key or flag stops with one line naming the closest valid
    one, and flags are never prefix-matched (``--max_step`` is not ``--max_steps``).

    Raises:
        SystemExit: with that one-line message (exit code 2, as argparse).
    """
    import dataclasses
    import difflib
    import sys

    import yaml
    from trl import TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    valid = {f.name for t in types for f in dataclasses.fields(t)} | {"config"}

    def unknown(key: str, where: str):
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"error: {where}: unknown setting {key!r}{hint} (valid: the fields of "
              f"{', '.join(t.__name__ for t in types)})", file=sys.stderr)
        raise SystemExit(2)

    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            key = arg[2:].split("=", 1)[0].replace("-", "_")
            if key not in valid and not (key.startswith("no_") and key[3:] in valid):  # --no_<bool field>
                unknown(key, "command line")
            if key == "config" and i + 1 < len(argv):
                config = yaml.safe_load(Path(argv[i + 1]).read_text()) or {}
                for k in config:
                    if k not in valid:
                        unknown(k, argv[i + 1])
    return TrlParser(types, allow_abbrev=False).parse_args_and_config(argv)


def offline_wandb_defaults(output_dir: str) -> None:
    """W&B offline and inside the run's output dir unless the user's environment says otherwise."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_DIR", output_dir)
    os.makedirs(output_dir, exist_ok=True)


def load_model_and_tokenizer(model_args, output_dir: str):
    """W&B offline defaults, then the model (packaged name, local dir or hub id) and tokenizer of TRL's
    ``ModelConfig``. Returns ``(model, tokenizer, dtype)``; the tokenizer gets a pad token if it has none."""
    from tie_guard.packaged import resolve_model_path

    offline_wandb_defaults(output_dir)
    path = resolve_model_path(model_args.model_name_or_path)
    dtype = getattr(torch, model_args.dtype) if model_args.dtype not in (None, "auto") else "auto"
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), tokenizer, dtype


def plain_peft_merge_numbers(peft_model, probe) -> dict:
    """What PEFT's own merge_and_unload() does on a deep copy: input-embedding change against the base model's
    input embedding, and logit difference against the adapter model."""
    clone = copy.deepcopy(peft_model)
    # The base model's own input embedding (under any PEFT wrapper), the same baseline tie_guard's report uses.
    emb_before = unwrapped_module(clone.get_base_model().get_input_embeddings()).weight.detach().clone()
    adapter = probe_logits(clone, probe)
    with warnings.catch_warnings():  # PEFT warns about exactly the damage this comparison sets out to measure
        warnings.simplefilter("ignore", UserWarning)
        merged = clone.merge_and_unload()
    emb_after = merged.get_input_embeddings().weight.detach()
    return {
        "input_embedding_rows_changed": int((emb_after != emb_before).any(dim=1).sum()),
        "input_embedding_max_abs_change": float((emb_after - emb_before).abs().max()),
        "max_abs_logit_diff": max_abs_diff(probe_logits(merged, probe), adapter),
    }


def summarize(model, guard, compare_plain_merge: bool) -> dict:
    summary = {
        "groups": [row for g in find_tied_groups(model) for row in g.as_rows()],
        "final_divergence": guard.watcher.last_divergence if guard.watcher else {},
        "status": guard.status,
    }
    report = guard.merge_report
    if report is not None:
        summary["tie_guard_merge"] = {
            "max_abs_logit_diff": report.max_abs_logit_diff,
            "logit_tolerance": report.logit_tolerance,
            "reload_max_abs_logit_diff": report.reload_max_abs_logit_diff,
            "input_embeddings": [vars(e) for e in report.input_embeddings],
            # True when every input embedding the adapter does not itself train is bit-identical to the base's.
            "untrained_input_embeddings_bit_identical": report.untrained_input_embeddings_bit_identical,
            "actions": report.actions,
            "merged_dir": report.output_dir,
        }
    if compare_plain_merge:
        cfg = model.get_base_model().config
        vocab = getattr(cfg, "vocab_size", None) or cfg.get_text_config().vocab_size
        probe = make_probe_ids(vocab, guard.config.probe_batch_size, guard.config.probe_seq_len)
        summary["plain_peft_merge"] = plain_peft_merge_numbers(model, probe)
    return summary


def greedy_answer(model, tok, prompt: str, max_new_tokens: int) -> dict:
    """Answer ``prompt`` greedily with ``tok``'s chat template: the new token ids and their text."""
    inputs = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    inputs = {k: v.to(next(model.parameters()).device) for k, v in inputs.items()}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    model.train(was_training)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    return {"answer": tok.decode(new, skip_special_tokens=True).strip(),
            "raw": tok.decode(new, skip_special_tokens=False), "token_ids": new}


def finish(summary: dict, output_dir: str, prompt: str, max_new_tokens: int, dtype, adapter_model=None) -> dict:
    """Print the summary, then answer ``prompt`` with the trained adapter model and with the merged model reloaded
    from disk, side by side; their greedy tokens must be identical (what tie_guard guarantees: the merged model is
    the trained model), else this raises. Writes summary.json."""
    print("\n==== tie_guard summary ====")
    print(json.dumps(summary, indent=2, default=str))
    merged_dir = summary.get("tie_guard_merge", {}).get("merged_dir")
    if merged_dir:
        tok = AutoTokenizer.from_pretrained(merged_dir)
        reloaded = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype)
        gen = {"prompt": prompt, "merged_reloaded": greedy_answer(reloaded, tok, prompt, max_new_tokens)}
        if adapter_model is not None:
            gen["adapter_model"] = greedy_answer(adapter_model, tok, prompt, max_new_tokens)
            gen["identical_tokens"] = gen["adapter_model"]["token_ids"] == gen["merged_reloaded"]["token_ids"]
        summary["generation"] = gen
        print(f"\n> {prompt}")
        for who in ("adapter_model", "merged_reloaded"):
            if who in gen:
                print(f"{who:>16}: {gen[who]['answer'] or gen[who]['raw']!r}")
        if adapter_model is not None:
            print("greedy tokens identical:", gen["identical_tokens"])
    Path(output_dir, "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if merged_dir and adapter_model is not None and not gen["identical_tokens"]:
        raise RuntimeError("the reloaded merged model does not answer as the adapter model does: "
                           f"{gen['merged_reloaded']['token_ids']} vs {gen['adapter_model']['token_ids']}")
    return summary


def end_of_run(is_main_process: bool, model, guard, compare_plain_merge: bool, output_dir: str, prompt: str,
               max_new_tokens: int, dtype) -> dict:
    """After training, on the main process only (other ranks return ``{}``): the summary, PEFT's plain merge on a
    copy for comparison (unsharded models only), then reload the merged model and generate."""
    from tie_guard.distributed import has_sharded_parameters

    if not is_main_process:
        return {}
    sharded = has_sharded_parameters(model)  # a sharded adapter model cannot generate on one rank
    return finish(summarize(model, guard, compare_plain_merge and not sharded), output_dir, prompt, max_new_tokens,
                  dtype, adapter_model=None if sharded else model)
