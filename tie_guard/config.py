"""Configuration of the guard, shared by the Trainer callback, the Accelerate hook and the scripts."""

from __future__ import annotations

from dataclasses import dataclass, field

from .merge import TIE_POLICIES
from .sinks import TRACKERS

ON_BREAK = ("warn", "stop", "raise")
WANDB_MODES = ("auto", "always", "never")


@dataclass
class TieGuardConfig:
    """Settings of :class:`tie_guard.TieGuardCallback` / :class:`tie_guard.TieWatcher`.

    Field names are prefixed nowhere so the dataclass can be parsed by ``HfArgumentParser`` / TRL's
    ``TrlParser`` next to ``TrainingArguments`` (they become ``--check_every`` ... flags and YAML keys).
    """

    check_every: int = field(
        default=10, metadata={"help": "Run the tie checks every N optimizer steps (0 = only at train begin/end)."}
    )
    divergence_every: int = field(
        default=0,
        metadata={"help": "Compute the exact divergence metric every N steps (0 = at every check). The tie, frozen "
                  "and NaN checks stay at check_every; divergence costs O(vocab · r²) for a LoRA head."},
    )
    on_break: str = field(
        default="warn",
        metadata={"help": "What to do when a watched tie breaks: 'warn' (log), 'stop' (end training), 'raise'."},
    )
    merge_at_end: bool = field(
        default=True, metadata={"help": "At train end, merge the PEFT adapter with safe_merge_and_unload and save it."}
    )
    tie_policy: str = field(
        default="untie", metadata={"help": "Merge policy for tied groups: 'untie', 'keep_tied' or 'error'."}
    )
    merged_dir: str = field(
        default="merged", metadata={"help": "Where the merged model goes, relative to TrainingArguments.output_dir."}
    )
    overwrite_merged: bool = field(
        default=False,
        metadata={"help": "Replace a merged model that an earlier run left in merged_dir. Without it a run whose "
                  "merged_dir is not empty stops at train begin (before any step), so nothing is lost."},
    )
    verify_reload: bool = field(
        default=True, metadata={"help": "After saving the merged model, reload it and verify again."}
    )
    events_file: str = field(
        default="tie_guard_events.jsonl",
        metadata={"help": "JSONL event log, relative to TrainingArguments.output_dir ('' disables it)."},
    )
    trackers: str = field(
        default="auto",
        metadata={"help": "Trackers that get tie_guard's metrics: 'auto' (the Trainer's report_to, or the "
                  "accelerator's trackers in a custom loop), 'none', or comma-separated names among "
                  "wandb,tensorboard,mlflow,trackio."},
    )
    wandb: str = field(
        default="auto",
        metadata={
            "help": "W&B logging: 'auto' (use the active run, e.g. the Trainer's when report_to has wandb), "
            "'always' (start an offline run if none is active), 'never'."
        },
    )
    wandb_project: str = field(default="tie_guard", metadata={"help": "W&B project for a run tie_guard starts itself."})
    probe_batch_size: int = field(default=2, metadata={"help": "Rows of the merge-verification probe batch."})
    probe_seq_len: int = field(default=32, metadata={"help": "Tokens per row of the probe batch."})

    def __post_init__(self):
        if self.tie_policy not in TIE_POLICIES:
            raise ValueError(f"tie_policy must be one of {TIE_POLICIES}, got {self.tie_policy!r}")
        if self.on_break not in ON_BREAK:
            raise ValueError(f"on_break must be one of {ON_BREAK}, got {self.on_break!r}")
        if self.wandb not in WANDB_MODES:
            raise ValueError(f"wandb must be one of {WANDB_MODES}, got {self.wandb!r}")
        names = [] if self.trackers in ("auto", "none") else [n.strip() for n in self.trackers.split(",")]
        unknown = [n for n in names if n not in TRACKERS]
        if unknown:
            raise ValueError(f"trackers must be 'auto', 'none' or names among {tuple(TRACKERS)}, got {unknown}")
        if self.probe_batch_size < 1 or self.probe_seq_len < 1:
            raise ValueError(f"probe_batch_size and probe_seq_len must be >= 1, got {self.probe_batch_size} and "
                             f"{self.probe_seq_len}")
        if self.divergence_every < 0:
            raise ValueError(f"divergence_every must be >= 0, got {self.divergence_every}")
        if self.check_every < 0:
            raise ValueError(f"check_every must be >= 0 (0 disables periodic checks), got {self.check_every}")
