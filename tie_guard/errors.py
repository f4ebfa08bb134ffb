"""Exceptions raised by tie_guard. Every message names the problem and the fix."""

from __future__ import annotations


class TieGuardError(RuntimeError):
    """Base class of every error tie_guard raises on purpose."""


class TiedMergeError(TieGuardError):
    """A merge would touch a tied weight group and the chosen `tie_policy` does not allow it."""


class MergeVerificationError(TieGuardError):
    """The merged model does not compute what the adapter model computes (or does not survive save → reload).

    Attributes:
        report: the `MergeReport` with every number measured before the failure.
    """

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class UnsupportedAdapterError(TieGuardError):
    """The adapter (PEFT method or layer layout) cannot be merged exactly by tie_guard."""


class TieBrokenError(TieGuardError):
    """Raised during training (``on_break="raise"``) when a watched tie group breaks."""
