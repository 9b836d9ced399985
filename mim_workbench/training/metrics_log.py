"""``metrics.csv`` of a run directory: one row per optimiser step, appended as we go.

Rows are flushed immediately so a crashed or still-running run can be plotted.
When a run resumes from step N in the same directory, rows after N (written by
the interrupted run after its last checkpoint) are dropped first, so the file
never holds two different histories of the same step.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

COLUMNS = ("step", "epoch", "loss", "val_loss", "lr", "images_per_s", "grad_norm", "skipped", "elapsed_s")


class MetricsLog:
    """Appends rows of :data:`COLUMNS` plus the method's ``extra`` step metrics (e.g. BEiT's
    ``token_acc``, the feature targets' ``target_std``)."""

    def __init__(self, path: str | Path, *, resume_step: int | None = None, extra: tuple[str, ...] = ()) -> None:
        self.path = Path(path)
        self.columns = COLUMNS + tuple(extra)
        keep: list[dict[str, str]] = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as fh:
                for row in csv.DictReader(fh):
                    try:
                        if int(row.get("step", "")) <= resume_step:
                            keep.append(row)
                    except ValueError:
                        continue
        self._fh = open(self.path, "w", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._fh, fieldnames=self.columns, extrasaction="ignore")
        self._writer.writeheader()
        for row in keep:
            self._writer.writerow(row)
        self._fh.flush()

    def write(self, row: dict[str, Any]) -> None:
        """Append one step's row (missing columns empty) and flush it to disk."""
        self._writer.writerow({k: _fmt(row.get(k)) for k in self.columns})
        self._fh.flush()

    def close(self) -> None:
        """Close the file (idempotent)."""
        if not self._fh.closed:
            self._fh.close()


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def read_metrics(path: str | Path) -> list[dict[str, float | None]]:
    """Rows of a metrics.csv as numbers (None for empty cells)."""
    out = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            out.append({k: (float(v) if v not in ("", None) else None) for k, v in row.items()})
    return out
