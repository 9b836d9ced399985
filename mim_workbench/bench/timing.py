"""Timers: the GEMM rate, interleaved timing and its statistics, masking, the data pipeline, inference.

Every timer uses ``time.perf_counter`` and, on CUDA, synchronises around the timed
region so that the seconds cover the work and not only its launch.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..errors import ConfigError
from ..io.cache import DecodeCache
from ..io.datasets import discover
from ..masking import make_mask, patch_coverage
from ..sample import sample_root
from ..training.mim_dataset import MIMDataset
from .config import mask_patch_size, random_regions
from .step import BenchStep

#: The checkout's root: the shared data folder is looked for beside it.
_REPO = Path(__file__).resolve().parents[2]


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: torch.device | str | None) -> float:
    """Seconds ``fn()`` takes, synchronised on CUDA."""
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


# ====================================================================== generic timers
def gemm_rate(n: int = 2048, *, reps: int = 7, warmup: int = 2, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> list[float]:
    """GFLOP/s (2 n^3 per product) of ``torch.mm`` on ``n x n`` matrices, one sample per repetition."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dev, dtype)
    b = torch.randn(n, n, generator=g).to(dev, dtype)
    c = torch.empty(n, n, device=dev, dtype=dtype)
    for _ in range(warmup):
        torch.mm(a, b, out=c)
    _sync(dev)
    return [2.0 * n ** 3 / _timed(lambda: torch.mm(a, b, out=c), dev) / 1e9 for _ in range(reps)]


def time_interleaved(fns: Mapping[str, Callable[[], Any]], *, reps: int, warmup: int = 2,
                     device: str | torch.device | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function (``reps`` samples each), run round-robin (A B C A B C ...).

    ``warmup`` untimed rounds come first.  Interleaving spreads the machine's load
    changes evenly over the contenders, so ratios between them stay meaningful on a
    shared machine.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(_timed(fn, device))
    return times


def summarise(samples: Sequence[float]) -> dict[str, float]:
    """``median``, ``min``, quartiles ``q1`` / ``q3`` (seconds) and count ``n`` of non-empty timing samples."""
    s = sorted(samples)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0], s[0], s[0]]
    return {"median": statistics.median(s), "min": s[0], "q1": q[0], "q3": q[2], "n": len(s)}


def _ratio_ci(a: Sequence[float], b: Sequence[float], *, rounds: int = 5) -> dict[str, float]:
    """Ratio median(b)/median(a) overall and per consecutive block of paired samples.

    The per-block spread (min..max over ``rounds`` blocks of interleaved samples)
    shows how stable the ratio is while the machine's load changes.
    """
    n = min(len(a), len(b))
    per = []
    k = max(1, n // rounds)
    for i in range(0, n - k + 1, k):
        per.append(statistics.median(b[i:i + k]) / statistics.median(a[i:i + k]))
    return {"ratio": statistics.median(b) / statistics.median(a), "blocks": per,
            "ratio_min": min(per), "ratio_max": max(per)}


# ====================================================================== masking / data / inference
def time_masking(strategy: str, *, batch_size: int = 256, img_size: int = 224, patch_size: int = 16,
                 ratio: float = 0.75, reps: int = 30) -> dict[str, float]:
    """Milliseconds to mask a batch on the CPU (median of ``reps``, after 2 untimed), the training loop's way.

    Keys: ``mask_ms`` (the strategy), ``total_ms``, and for ``region`` also
    ``coverage_ms``: ``patch_coverage`` of per-sample pixel masks ``[B, H, W]`` (what
    the loop computes from the batch); ``total_ms`` is then coverage plus mask.
    """
    grid = (img_size // patch_size, img_size // patch_size)
    g = torch.Generator().manual_seed(0)
    opts: dict[str, Any] = {}
    if strategy == "block":
        opts = {"patch_size": patch_size, "mask_patch_size": mask_patch_size(patch_size)}
    px = random_regions(batch_size, img_size) if strategy == "region" else None
    cov_t: list[float] = []
    mask_t: list[float] = []
    for i in range(reps + 2):
        t0 = time.perf_counter()
        cov = patch_coverage(px, patch_size) if px is not None else None
        t1 = time.perf_counter()
        make_mask(strategy, batch_size, grid, ratio, region=cov, generator=g, **opts)
        t2 = time.perf_counter()
        if i >= 2:
            cov_t.append(t1 - t0)
            mask_t.append(t2 - t1)
    out = {"mask_ms": 1e3 * statistics.median(mask_t)}
    if px is not None:
        out["coverage_ms"] = 1e3 * statistics.median(cov_t)
        out["total_ms"] = 1e3 * statistics.median([a + b for a, b in zip(cov_t, mask_t)])
    else:
        out["total_ms"] = out["mask_ms"]
    return out


def default_data_root() -> tuple[Path, Path | None]:
    """(images, masks or None) for the data benchmark.

    ``$MIM_SHARED_DATA`` (else ``shared/data`` beside the checkout) ``/cxr_covid_v7labs``
    chest X-rays when present, else the shipped sample data.
    """
    env = os.environ.get("MIM_SHARED_DATA")
    shared = Path(env) if env else _REPO.parent / "shared" / "data"
    cxr = shared / "cxr_covid_v7labs"
    if (cxr / "images").is_dir():
        masks = cxr / "masks_v7labs"
        return cxr / "images", masks if masks.is_dir() else None
    root = sample_root()
    return root / "images", (root / "masks") if (root / "masks").is_dir() else None


@contextlib.contextmanager
def _cache_folder(cache_dir: str | Path | None) -> Iterator[str | Path]:
    """``cache_dir`` itself, or a temporary folder that is removed afterwards."""
    if cache_dir is not None:
        yield cache_dir
        return
    with tempfile.TemporaryDirectory(prefix="mim-bench-cache-") as tmp:
        yield tmp


def _loader_record(ds: MIMDataset, mode: str, workers: int, batch_size: int) -> dict[str, Any]:
    """One pass of a DataLoader over ``ds``: images, seconds and images/s."""
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, drop_last=False)
    t = time.perf_counter()
    n = 0
    for batch in loader:
        n += batch["image"].shape[0]
    dt = time.perf_counter() - t
    return {"mode": mode, "workers": workers, "images": n, "seconds": dt,
            "images_per_s": n / dt if dt > 0 else float("inf")}


def time_data_pipeline(images: str | Path | None = None, masks: str | Path | None = None, *,
                       img_size: int = 224, in_chans: int = 1, batch_size: int = 16, workers: Sequence[int] = (0, 2),
                       max_images: int | None = None, augment: bool = True,
                       cache_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Images/s of ``MIMDataset`` + ``DataLoader`` (the training loop's pipeline).

    ``cold``: every image decoded and letterboxed (a first epoch without cache);
    ``cached``: from a filled :class:`~mim_workbench.io.cache.DecodeCache` (``--cache``),
    augmentation still applied per item.  One record per (mode, workers) with keys
    ``mode, workers, images, seconds, images_per_s``.  ``images`` None uses
    :func:`default_data_root`; no images raises ConfigError.  Without ``cache_dir``
    the cache lives in a temporary folder, removed afterwards.
    """
    if images is None:
        images, masks = default_data_root()
    index = discover(images, masks=masks)
    samples = list(index.samples)[: max_images] if max_images else list(index.samples)
    if not samples:
        raise ConfigError(f"{images}: no images for the data benchmark")
    with _cache_folder(cache_dir) as cache_root:
        cache = DecodeCache(cache_root)
        common = dict(img_size=(img_size, img_size), in_chans=in_chans, augment=augment, seed=0)
        records = []
        for mode in ("cold", "cached"):
            ds = MIMDataset(samples, cache=cache if mode == "cached" else None, **common)
            if mode == "cached":
                for i in range(len(ds)):  # fill the cache (a first epoch with --cache)
                    ds[i]
            records += [_loader_record(ds, mode, w, batch_size) for w in workers]
    return records


def time_inference(step: BenchStep, x: torch.Tensor, *, reps: int, warmup: int = 1,
                   fine: torch.Tensor | None = None) -> list[float]:
    """Seconds per batch ``x`` ``[B, C, H, W]`` of ``step.reconstruct`` (forward + render under inference_mode).

    ``reps`` samples after ``warmup`` untimed calls.
    """
    for _ in range(warmup):
        step.reconstruct(x, fine=fine)
    return [_timed(lambda: step.reconstruct(x, fine=fine), step.device) for _ in range(reps)]
