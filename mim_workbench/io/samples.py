"""The record of one training example, shared by dataset discovery and the torch datasets.

It lives apart from :mod:`mim_workbench.io.datasets` so that the torch datasets
(:mod:`~mim_workbench.training.mim_dataset`, :mod:`~mim_workbench.training.crop_dataset`) can use it
while ``datasets`` offers them by name, with no module importing back the one that
imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Sample:
    """One training example: an image, its optional region mask, label and patient."""

    id: str
    image: Path
    mask: Path | None = None
    label: str | None = None
    patient: str | None = None
