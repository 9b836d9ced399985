"""The disk cache of built pyramids: where an entry lives, when it is stale, what goes when full.

Entries: ``<cache base>/pyramids/<key[:2]>/<key>.zarr`` (base: ``MIM_WORKBENCH_CACHE``,
else ``~/.cache/mim-workbench``).  The key is a sha256 over the source's resolved
path, size and ``mtime_ns`` and the build settings (plus
:data:`~mim_workbench.io.pyramid_build.PYRAMID_FORMAT` and the package version): an
edited source or another setting misses, so a stale pyramid is never served.
Entries are written to a temporary name and renamed (see
:func:`~mim_workbench.io.pyramid_build.build_pyramid`).

The cache has a soft cap (:data:`DEFAULT_PYRAMID_CACHE_BYTES`, or
``MIM_WORKBENCH_PYRAMID_CACHE_GB``): after each build the least recently opened
entries go until the total fits, but never one opened within :data:`KEEP_RECENT_S`
(a viewer or a training run may be reading it), so the cap can be exceeded for a day.
Every open stamps the entry's ``zarr.json`` (kernel atime is unreliable).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from mim_workbench.io.cache import cache_base
from mim_workbench.io.pyramid_build import PYRAMID_FORMAT

#: Soft cap of the pyramid cache (``MIM_WORKBENCH_PYRAMID_CACHE_GB`` overrides).
DEFAULT_PYRAMID_CACHE_BYTES = 20 * 1024**3
#: Entries opened this recently are never evicted.
KEEP_RECENT_S = 24 * 3600.0


def pyramid_cache_root() -> Path:
    """``$MIM_WORKBENCH_CACHE/pyramids``, else ``~/.cache/mim-workbench/pyramids``."""
    return cache_base() / "pyramids"


def pyramid_key(path: str | os.PathLike, settings: dict[str, Any]) -> str:
    """sha256 over the source identity (path, size, mtime_ns) and the build settings."""
    from mim_workbench.io.cache import DecodeCache

    return DecodeCache.key([path], {"pyramid_format": PYRAMID_FORMAT, **settings})


def cache_entry(path: str | os.PathLike, settings: dict[str, Any], root: Path) -> Path:
    """The cache folder of ``path``'s pyramid built with ``settings`` under ``root`` (it may not exist)."""
    key = pyramid_key(path, settings)
    return root / key[:2] / f"{key}.zarr"


def stamp(entry: Path) -> None:
    """Mark ``entry`` as opened now (its ``zarr.json`` mtime), which spares it from pruning for a day."""
    try:
        os.utime(entry / "zarr.json")
    except OSError:
        pass


def pyramid_cache_cap() -> int:
    """The cache's soft cap in bytes: ``MIM_WORKBENCH_PYRAMID_CACHE_GB`` or the default."""
    env = os.environ.get("MIM_WORKBENCH_PYRAMID_CACHE_GB")
    if env:
        try:
            return int(float(env) * 1024**3)
        except ValueError:
            pass
    return DEFAULT_PYRAMID_CACHE_BYTES


def pyramid_cache_entries(root: str | os.PathLike | None = None) -> list[tuple[float, int, Path]]:
    """(last opened, bytes, folder) of every built pyramid in the cache."""
    from mim_workbench.io.cache import dir_size

    base = Path(root) if root is not None else pyramid_cache_root()
    out = []
    for entry in base.glob("*/*.zarr"):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        try:
            used = os.stat(entry / "zarr.json").st_mtime
        except OSError:
            used = 0.0
        out.append((used, dir_size(entry), entry))
    return out


def prune_pyramid_cache(root: str | os.PathLike | None = None, max_bytes: int | None = None,
                        now: float | None = None) -> list[Path]:
    """Remove the least recently opened pyramids until the cache fits ``max_bytes``, sparing
    those opened within :data:`KEEP_RECENT_S`; returns what was removed."""
    import time

    cap = pyramid_cache_cap() if max_bytes is None else int(max_bytes)
    now = time.time() if now is None else now
    entries = sorted(pyramid_cache_entries(root), key=lambda e: (e[0], e[2].name))
    total = sum(size for _, size, _ in entries)
    removed = []
    for used, size, entry in entries:
        if total <= cap:
            break
        if now - used < KEEP_RECENT_S:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        total -= size
        removed.append(entry)
    return removed
