"""What a running study reports (picklable, like the training events it wraps)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StudyProgress:
    """``done`` of ``total`` work units (seconds of the plan) in the stage named ``stage``."""

    stage: str                     # e.g. "pretraining mae", "probe rgmim 10 % seed 1"
    done: float
    total: float
    eta_s: float | None = None
    message: str | None = None     # one line for a log


@dataclass(frozen=True)
class StudyFinished:
    out: str
    files: dict[str, str]          # results, table_md, plot, summary, ...
    verdict: str
    notes: tuple[str, ...] = ()
    table: tuple[dict[str, Any], ...] = field(default_factory=tuple)


__all__ = ["StudyFinished", "StudyProgress"]
