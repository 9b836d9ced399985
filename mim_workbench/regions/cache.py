"""Proposed region masks for images that have none, cached across runs.

Region-guided masking on a folder without masks: :func:`propose_missing` proposes a preset's
region for every sample without a mask, once. Masks are kept under
``$MIM_WORKBENCH_CACHE/regions/<settings>/<image key>.png``, keyed like the decoded-image
cache by the image's resolved path, size and modification time and by the proposal settings,
so a second run (or a resumed one, or another process of a ``torchrun`` job) reuses them and
a changed image or setting is proposed again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mim_workbench.errors import ConfigError
from mim_workbench.io.cache import DecodeCache, cache_base
from mim_workbench.io.samples import Sample
from mim_workbench.regions import PRESETS
from mim_workbench.regions.folder import MODEL_PREFIX, FolderProgress, proposal_records, settings_record


def regions_cache_root() -> Path:
    """``<cache base>/regions`` (see :func:`mim_workbench.io.cache.cache_base`)."""
    return cache_base() / "regions"


def mask_path_for(image: Path, settings: dict[str, Any], root: Path | None = None) -> Path:
    """Where the proposed mask of ``image`` under ``settings`` (a :func:`settings_record`) lives:
    keyed, like the decoded-image cache, by the image's path, size and mtime and the settings."""
    key = DecodeCache.key([image], {k: settings[k] for k in ("source", "preset", "options")})
    return (root or regions_cache_root()) / str(settings["preset"]) / f"{key}.png"


@dataclass
class ProposalReport:
    """What :func:`propose_missing` did: counts, the flagged images and the unreadable ones."""

    preset: str
    proposed: int = 0
    reused: int = 0
    flagged: list[tuple[str, str]] = field(default_factory=list)      # (image, flag)
    unreadable: list[str] = field(default_factory=list)                # reader messages

    def note(self) -> str:
        """One line for the run's notes."""
        source = (f"the model {Path(self.preset[len(MODEL_PREFIX):]).name}" if self.preset.startswith(MODEL_PREFIX)
                  else f"the {self.preset} preset")
        text = (f"region masks proposed with {source} for {self.proposed + self.reused} image(s) "
                f"({self.proposed} new, {self.reused} from the cache); {len(self.flagged)} flagged")
        if self.flagged:
            text += ": " + ", ".join(f"{Path(i).name} ({f})" for i, f in self.flagged[:5])
            text += ", …" if len(self.flagged) > 5 else ""
        if self.unreadable:
            text += f"; {len(self.unreadable)} unreadable"
        return text


def propose_missing(samples: Sequence[Sample], preset: str, *, options: dict[str, Any] | None = None,
                    workers: int = 1, on_progress: Callable[[FolderProgress], None] | None = None,
                    root: Path | None = None) -> ProposalReport:
    """Give every sample without a mask a proposed ``preset`` region (sets ``sample.mask``);
    ``preset`` may also be a learned model (``regions.folder.model_source(PATH)``).

    Samples that have a mask keep it. An image that cannot be read keeps no mask (region
    masking falls back to random for it) and is listed in the report. Raises
    :class:`ConfigError` for an unknown preset.
    """
    if preset not in PRESETS and not preset.startswith(MODEL_PREFIX):
        raise ConfigError(f"region_preset={preset!r}: choose one of {', '.join(PRESETS)}")
    options = dict(options or {})
    todo = [s for s in samples if s.mask is None]
    settings = settings_record(preset, options)  # once: for a learned model it hashes the model file
    jobs = [(s.image, mask_path_for(s.image, settings, root), preset, options) for s in todo]
    report = ProposalReport(preset)
    for sample, record in zip(todo, proposal_records(jobs, workers=workers, on_progress=on_progress)):
        if "error" in record:
            report.unreadable.append(record["error"])
            continue
        sample.mask = Path(record["mask"])
        if record["reused"]:
            report.reused += 1
        else:
            report.proposed += 1
        if record["flag"]:
            report.flagged.append((str(sample.image), record["flag"]))
    return report
