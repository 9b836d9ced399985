"""Region masks for a whole folder: propose, flag the implausible ones, show them on a sheet.

    for record in propose_folder("xrays/", "xrays_masks/", preset="lungs"):
        print(record)   # {"image", "mask", "area_fraction", "flag"} or {"image", "error"}

Masks are written as ``OUT/<stem>.png`` (0/255), the names the dataset readers pair with
their images, so ``--masks OUT`` then just works. ``OUT/regions.json`` records the settings:
a folder written with other settings is refused unless ``overwrite``, and masks already
written with the same settings are kept, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

from functools import lru_cache

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mim_workbench import __version__
from mim_workbench.errors import ConfigError, MimError
from mim_workbench.io.datasets import discover, file_stem
from mim_workbench.io.mask_writer import save_mask
from mim_workbench.io.masks import read_mask
from mim_workbench.io.readers import read_image
from mim_workbench.regions import PRESETS, propose_region
from mim_workbench.regions.morphology import label

if TYPE_CHECKING:
    import dask.array as da

    from mim_workbench.regions.learned import RegionModel

MANIFEST = "regions.json"

#: plausible share of the image a preset's region covers (min, max); outside it is flagged
AREA_RANGE: dict[str, tuple[float, float]] = {
    "lungs": (0.08, 0.65), "breast": (0.05, 0.95), "teeth": (0.02, 0.60), "tissue": (0.01, 0.98),
}
#: a component smaller than this share of the region does not count as a part of it
MIN_PART = 0.05


@dataclass(frozen=True)
class FolderProgress:
    """Where a folder run is: ``done`` of ``total`` images, seconds left (None at first)."""

    done: int
    total: int
    eta_s: float | None
    image: str


def quality_flag(mask: np.ndarray, preset: str) -> str | None:
    """Why ``mask`` looks implausible for ``preset`` ("empty", "too small", "too large",
    "fragmented", "one lung missing"), or None when it looks like a region of its kind."""
    area = float(np.count_nonzero(mask)) / max(1, mask.size)
    if area == 0.0:
        return "empty"
    low, high = AREA_RANGE.get(preset, (0.0, 1.0))
    if area < low:
        return "too small"
    if area > high:
        return "too large"
    parts = _part_sizes(mask)
    if preset == "lungs":
        if len(parts) < 2 or not _both_sides(mask):
            return "one lung missing"
        if len(parts) > 3:
            return "fragmented"
    elif len(parts) > 4:
        return "fragmented"
    return None


def _part_sizes(mask: np.ndarray) -> list[int]:
    labels, n = label(mask > 0)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    total = max(1, int(sizes.sum()))
    return [int(s) for s in sizes if s >= MIN_PART * total]


def _both_sides(mask: np.ndarray) -> bool:
    """Region on both halves of the image, each with a sizeable share (two lungs)."""
    cols = np.count_nonzero(mask, axis=0).astype(float)
    half = cols.size // 2
    left, right = cols[:half].sum(), cols[half:].sum()
    return min(left, right) >= 0.2 * max(1.0, left + right)


MODEL_PREFIX = "model:"


def model_source(path: str | Path) -> str:
    """The region source of a learned model file (see :func:`propose_with`)."""
    return MODEL_PREFIX + str(Path(path).resolve())


def settings_record(source: str, options: dict[str, Any]) -> dict[str, Any]:
    """What ``regions.json`` holds: the proposal settings that decide the masks (a learned
    model is identified by its file's content, not its name)."""
    if source.startswith(MODEL_PREFIX):
        import hashlib

        digest = hashlib.sha256(Path(source[len(MODEL_PREFIX):]).read_bytes()).hexdigest()[:20]
        return {"source": "model", "preset": _load_model(source).config.name, "model": source[len(MODEL_PREFIX):],
                "options": {"sha256": digest}, "mim_workbench": __version__}
    recorded = dict(sorted(options.items()))
    if source == "lungs" and options.get("method", "model") == "model":
        recorded["model_sha256"] = lungs_model_digest()   # a retrained model proposes other masks
    return {"source": "preset", "preset": source, "options": recorded, "mim_workbench": __version__}


@lru_cache(maxsize=1)
def lungs_model_digest() -> str:
    """First 20 hex digits of the shipped lung model file's SHA-256, read once per process."""
    import hashlib

    from mim_workbench.regions.lungs_model import MODEL_FILE

    return hashlib.sha256(MODEL_FILE.read_bytes()).hexdigest()[:20]


_MODELS: dict[str, RegionModel] = {}


def _load_model(source: str) -> RegionModel:
    """The learned model of a ``model:PATH`` source, loaded once per process."""
    if source not in _MODELS:
        from mim_workbench.regions.learned import RegionModel

        _MODELS[source] = RegionModel.load(source[len(MODEL_PREFIX):])
    return _MODELS[source]


def propose_with(source: str, image: np.ndarray | da.Array, options: dict[str, Any]) -> tuple[np.ndarray, str]:
    """``(mask, kind)``: the region of ``image`` (uint8 {0, 1}, its H×W) from a preset name or a
    ``model:PATH`` source; ``kind`` names the region for the quality check (the preset, or the model's
    name).  ConfigError for an unknown preset or option, MimError for an unusable model file."""
    if source.startswith(MODEL_PREFIX):
        model = _load_model(source)
        return model.propose(image), model.config.name
    return propose_region(image, source, **options), source


def _claim_folder(out: Path, settings: dict[str, Any], overwrite: bool) -> None:
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            before = json.loads(manifest.read_text())
        except (OSError, ValueError) as exc:
            raise MimError(f"{manifest}: unreadable ({exc}); pass --overwrite to start the folder again") from None
        same = {k: before.get(k) for k in ("source", "preset", "options")} == \
               {k: settings[k] for k in ("source", "preset", "options")}
        if not same and not overwrite:
            raise MimError(f"{out}: masks written with other settings ({before.get('preset')} "
                           f"{before.get('options')}); pass --overwrite to replace them, or choose another folder")
        if not same:
            for old in out.glob("*.png"):
                old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    for partial in out.glob(".*.png"):   # a mask being written when an earlier run was killed
        partial.unlink(missing_ok=True)
    manifest.write_text(json.dumps(settings, indent=2) + "\n")


def _one(image_path: Path, mask_path: Path, source: str, options: dict[str, Any]) -> dict[str, Any]:
    """Propose (or reuse) one image's mask and describe it."""
    kind = _load_model(source).config.name if source.startswith(MODEL_PREFIX) else source
    if mask_path.is_file():
        mask = read_mask(mask_path)
        reused = True
    else:
        mask, kind = propose_with(source, read_image(image_path).data, options)
        save_mask(mask_path, mask)
        reused = False
    return {"image": str(image_path), "mask": str(mask_path),
            "area_fraction": round(float(np.count_nonzero(mask)) / max(1, mask.size), 4),
            "flag": quality_flag(mask, kind), "reused": reused}


def propose_folder(data: str | Path, out: str | Path, *, preset: str = "lungs",
                   options: dict[str, Any] | None = None, overwrite: bool = False,
                   on_progress: Callable[[FolderProgress], None] | None = None,
                   on_note: Callable[[str], None] | None = None, workers: int = 1) -> Iterator[dict[str, Any]]:
    """Propose a ``preset`` region (or a learned model's, ``preset=model_source(PATH)``) for
    every image ``data`` holds (any folder layout the dataset readers accept) into ``out``;
    yield one record per image, in order.

    A record is ``{"image", "mask", "area_fraction", "flag", "reused"}`` or, for an image that
    cannot be read, ``{"image", "error"}`` (the image is skipped, the run goes on). What the
    folder scan noticed (files it skipped as not images, layout guesses) goes to ``on_note``.
    ``workers`` > 1 proposes in that many processes (the records still come in order). Raises
    :class:`ConfigError` for an unknown preset and :class:`MimError` for a folder written with
    other settings (unless ``overwrite``) or two images with the same name.
    """
    if preset not in PRESETS and not preset.startswith(MODEL_PREFIX):
        raise ConfigError(f"preset={preset!r}: choose one of {', '.join(PRESETS)}, or a learned model")
    options = dict(options or {})
    out = Path(out)
    index = discover(data)
    for note in index.notes:
        if on_note is not None:
            on_note(note)
    samples = index.samples
    _check_unique_stems([s.image for s in samples])
    _claim_folder(out, settings_record(preset, options), overwrite)
    jobs = [(s.image, out / f"{file_stem(s.image)}.png", preset, options) for s in samples]
    yield from proposal_records(jobs, workers=workers, on_progress=on_progress)


Job = tuple[Path, Path, str, dict[str, Any]]   # (image, mask to write or reuse, preset, options)


def proposal_records(jobs: Sequence[Job], *, workers: int = 1,
                     on_progress: Callable[[FolderProgress], None] | None = None) -> Iterator[dict[str, Any]]:
    """Each job's record, in order (see :func:`propose_folder`), with progress and time left;
    ``workers`` > 1 proposes in that many processes."""
    started, proposed = time.monotonic(), 0
    for i, record in enumerate(_records(list(jobs), workers)):
        proposed += not record.get("reused", True)
        if on_progress is not None:
            rate = (time.monotonic() - started) / proposed if proposed else None
            eta = rate * (len(jobs) - i - 1) if rate is not None else None
            on_progress(FolderProgress(i + 1, len(jobs), eta, record["image"]))
        yield record


def _one_safe(job: Job) -> dict[str, Any]:
    try:
        return _one(*job)
    except MimError as exc:
        return {"image": str(job[0]), "error": str(exc)}


def _records(jobs: list[Job], workers: int) -> Iterator[dict[str, Any]]:
    """Each job's record, in order; in ``workers`` spawned processes when more than one (spawn:
    the GUI's process must not be forked)."""
    if workers <= 1 or len(jobs) < 2:
        yield from map(_one_safe, jobs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_one_thread)
    try:
        yield from pool.map(_one_safe, jobs, chunksize=4)
    finally:
        # an interrupted run leaves no queued work behind: masks written so far are kept
        pool.shutdown(wait=True, cancel_futures=True)


def _one_thread() -> None:
    """A worker process computes with one thread: the workers share the cores already, and a
    learned model's torch threads on top of them made proposals several times slower."""
    import os

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = "1"


def _check_unique_stems(images: Sequence[Path]) -> None:
    seen: dict[str, Path] = {}
    for p in images:
        stem = file_stem(p)
        if stem in seen:
            raise MimError(f"{p} and {seen[stem]} have the same name '{stem}': their masks would collide")
        seen[stem] = p


def contact_sheet(records: Sequence[dict[str, Any]], path: str | Path, *, thumb: int = 160,
                  columns: int = 8) -> Path:
    """A PNG of thumbnails with mask outlines, flagged ones first (red outline and caption).

    For a visual check of a folder run; unreadable images are left out.
    """
    from PIL import Image, ImageDraw

    rows = sorted((r for r in records if "mask" in r), key=lambda r: (r.get("flag") is None, r["image"]))
    n_rows = max(1, -(-len(rows) // columns))
    sheet = Image.new("RGB", (columns * thumb, n_rows * (thumb + 14)), (20, 20, 24))
    draw = ImageDraw.Draw(sheet)
    for k, rec in enumerate(rows):
        x, y = (k % columns) * thumb, (k // columns) * (thumb + 14)
        sheet.paste(_thumbnail(rec, thumb), (x, y))
        caption = f"{Path(rec['image']).name[:18]}" + (f" {rec['flag']}" if rec.get("flag") else "")
        draw.text((x + 2, y + thumb), caption, fill=(255, 90, 90) if rec.get("flag") else (200, 200, 200))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _thumbnail(record: dict[str, Any], size: int) -> Any:
    """The image in grey with its mask's outline (green, red when flagged), ``size`` square.

    The outline is drawn at thumbnail scale: one drawn at full size would fade away when the
    picture is shrunk.
    """
    from PIL import Image
    from scipy import ndimage

    image = np.asarray(read_image(record["image"]).data, dtype=np.float32)
    mask = read_mask(record["mask"], shape=image.shape[:2]) > 0
    scale = size / max(image.shape[:2])
    hw = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    grey = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).resize(hw, Image.BILINEAR)
    small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(hw, Image.NEAREST)) > 0
    edge = small & ~ndimage.binary_erosion(small, iterations=1)
    rgb = np.repeat(np.asarray(grey)[..., None], 3, axis=2)
    rgb[edge] = (255, 60, 60) if record.get("flag") else (60, 230, 90)
    tile = Image.new("RGB", (size, size), (20, 20, 24))
    tile.paste(Image.fromarray(rgb), ((size - hw[0]) // 2, (size - hw[1]) // 2))
    return tile
