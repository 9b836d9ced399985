"""On-disk cache of decoded, letterboxed training samples.

Why: decoding a JPEG 2000 DICOM and resizing it costs far more than one training
step; every epoch would repeat it. Entries hold the *pre-augmentation* arrays
(``image``, ``region``, ``fine``), so augmentation stays random per epoch.

Correctness first: the key is a sha256 over the source files' resolved paths,
sizes and ``mtime_ns`` (image and mask), the geometry (img_size, fine_scale,
in_chans), the reader settings, :data:`CACHE_FORMAT` and the package version.
Editing a file, changing a setting or upgrading the reader therefore misses;
a stale entry can never be served.

Layout: ``<root>/<key[:2]>/<key>.npyd/`` -- one folder per entry holding one
uncompressed ``<name>.npy`` per array and ``entry.json`` (the array names, written
last), built under a temporary name and renamed into place, so concurrent
DataLoader workers or DDP ranks never see half-written entries.  Plain ``.npy``
because a hit must cost much less than a training step's share of an image: a
zarr group took 2-7 ms per read (metadata parsing and zarr's async event loop in
a thread), ``np.load`` of the same arrays ~0.1 ms.  Entries of the older zarr
layout (format 1) are never read, only evicted.  Eviction is LRU: every hit
stamps the entry's ``entry.json`` access time explicitly (kernel atime is
unreliable under ``noatime``/``relatime``), and when the total exceeds
``max_bytes`` the least recently used entries are deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

#: Bump when the reader or letterbox output, or the entry layout, changes for identical inputs.
CACHE_FORMAT = 2
DEFAULT_MAX_BYTES = 2 * 1024**3
_MARKER = "entry.json"
_SUFFIX = ".npyd"
#: Entry folders of earlier layouts (format 1: zarr groups, marker ``zarr.json``): evicted, never read.
_OLD_SUFFIXES = {".zarr": "zarr.json"}


def estimate_entry_bytes(img_size: tuple[int, int], *, channels: int, fine_scale: int | None, region: bool) -> int:
    """About how many bytes one sample's entry takes (float32 image, uint8 region, MIRAM's fine image)."""
    px = int(img_size[0]) * int(img_size[1])
    n = px * 4 * channels + (px if region else 0)
    if fine_scale:
        n += px * fine_scale * fine_scale * 4 * channels
    return n + 4096    # entry.json, .npy headers, the folder


def cache_for(setting: bool | None, n_samples: int, img_size: tuple[int, int], *, channels: int,
              fine_scale: int | None, region: bool) -> tuple[DecodeCache | None, str | None]:
    """The decoded-image cache a run asked for: ``True`` on, ``False`` off, ``None`` on when its
    ``n_samples`` fit the cap (a larger set would only cycle through it: least recently used
    out, no hits), else off with a note for the user.  Returns (cache or None, note or None)."""
    if setting is False:
        return None, None
    cache = DecodeCache()
    if setting is None:
        need = estimate_entry_bytes(img_size, channels=channels, fine_scale=fine_scale, region=region) * n_samples
        if need > cache.max_bytes:
            return None, (f"decoded-image cache off: {n_samples} images at {img_size[0]}x{img_size[1]} need about "
                          f"{need / 2**30:.1f} GB, more than its {cache.max_bytes / 2**30:.0f} GB cap "
                          "(cache=true uses it anyway)")
    return cache, None


def cache_base() -> Path:
    """The workbench's cache base: ``$MIM_WORKBENCH_CACHE``, else ``~/.cache/mim-workbench``.

    Each cache has a sub-folder of it (decoded, pyramids, regions, …).
    """
    env = os.environ.get("MIM_WORKBENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mim-workbench"


def default_cache_root() -> Path:
    """``<cache base>/decoded``: the decoded samples' sub-folder of :func:`cache_base`."""
    return cache_base() / "decoded"


def _fingerprint(path: Path) -> list:
    """(resolved path, size, mtime_ns) -- for a directory store, over all its files."""
    p = Path(path).resolve()
    st = p.stat()
    if not p.is_dir():
        return [str(p), st.st_size, st.st_mtime_ns]
    size, newest = 0, st.st_mtime_ns
    for dirpath, _dirs, files in os.walk(p):
        for name in files:
            fst = os.stat(os.path.join(dirpath, name))
            size += fst.st_size
            newest = max(newest, fst.st_mtime_ns)
    return [str(p), size, newest]


def dir_size(path: Path) -> int:
    """Bytes of the files under ``path`` (files vanishing meanwhile count as 0)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


class DecodeCache:
    """Letterboxed arrays keyed by source files + settings, LRU-capped at ``max_bytes``."""

    def __init__(self, root: str | os.PathLike | None = None, max_bytes: int | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_root()
        self.max_bytes = int(DEFAULT_MAX_BYTES if max_bytes is None else max_bytes)
        self._total: int | None = None  # lazily scanned, then tracked

    def __repr__(self) -> str:
        return f"DecodeCache(root={str(self.root)!r}, max_bytes={self.max_bytes})"

    # ---------------------------------------------------------------- keys
    @staticmethod
    def key(sources: Sequence[str | os.PathLike | None], settings: Mapping) -> str:
        """sha256 of the sources' identity (path, size, mtime_ns) and the settings."""
        from mim_workbench import __version__

        payload = {
            "format": CACHE_FORMAT,
            "version": __version__,
            "sources": [None if s is None else _fingerprint(Path(s)) for s in sources],
            "settings": dict(settings),
        }
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    def _entry(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{_SUFFIX}"

    # ---------------------------------------------------------------- access
    def get(self, key: str) -> dict[str, np.ndarray] | None:
        """The stored arrays (fresh, writable copies), or None (missing, or removed/damaged under us)."""
        entry = self._entry(key)
        try:
            names = json.loads((entry / _MARKER).read_text(encoding="utf-8"))["arrays"]
            arrays = {name: np.load(entry / f"{name}.npy", allow_pickle=False) for name in names}
        except (OSError, ValueError, KeyError, TypeError):
            return None
        now = time.time()
        try:
            os.utime(entry / _MARKER, (now, now))
        except OSError:
            pass
        return arrays

    def put(self, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Store arrays atomically; silently skipped when the cache cannot hold them."""
        nbytes = sum(int(np.asarray(a).nbytes) for a in arrays.values())
        if nbytes > self.max_bytes:
            return
        final = self._entry(key)
        if (final / _MARKER).is_file():
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{uuid.uuid4().hex}{_SUFFIX}"
        try:
            tmp.mkdir()
            for name, value in arrays.items():
                if not name.isidentifier():  # names become file names
                    raise ValueError(f"cache array name {name!r} is not an identifier")
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(value), allow_pickle=False)
            (tmp / _MARKER).write_text(json.dumps({"arrays": list(arrays)}), encoding="utf-8")
            try:
                os.rename(tmp, final)
            except OSError:  # another worker stored it first
                shutil.rmtree(tmp, ignore_errors=True)
                return
        except (OSError, ValueError):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        size = dir_size(final)
        if self._total is None:
            self._total = self.size_bytes()
        else:
            self._total += size
        if self._total > self.max_bytes:
            self.evict()

    # ---------------------------------------------------------------- housekeeping
    def _entries(self) -> list[Path]:
        """Entry folders of this layout and of older ones (so those are evicted too)."""
        if not self.root.is_dir():
            return []
        return [e for sub in self.root.iterdir() if sub.is_dir() for e in sub.iterdir()
                if e.suffix in (_SUFFIX, *_OLD_SUFFIXES) and not e.name.startswith(".") and e.is_dir()]

    @staticmethod
    def _marker(entry: Path) -> Path:
        return entry / _OLD_SUFFIXES.get(entry.suffix, _MARKER)

    def __len__(self) -> int:
        return len(self._entries())

    def size_bytes(self) -> int:
        """Bytes used by all entries (a full scan)."""
        return sum(dir_size(e) for e in self._entries())

    def evict(self, target_bytes: int | None = None) -> int:
        """Delete least-recently-used entries until at most ``target_bytes`` remain; returns bytes freed."""
        target = self.max_bytes if target_bytes is None else int(target_bytes)
        entries = []
        for e in self._entries():
            try:
                used = os.stat(self._marker(e)).st_atime
            except OSError:
                used = 0.0
            entries.append((used, e, dir_size(e)))
        total = sum(size for _, _, size in entries)
        freed = 0
        for _used, e, size in sorted(entries, key=lambda t: (t[0], t[1].name)):
            if total <= target:
                break
            shutil.rmtree(e, ignore_errors=True)
            total -= size
            freed += size
        self._total = total
        return freed

    def clear(self) -> int:
        """Remove every entry (and stray temporaries); returns bytes freed."""
        freed = 0
        if self.root.is_dir():
            for sub in self.root.iterdir():
                if sub.is_dir() and len(sub.name) == 2:
                    freed += dir_size(sub)
                    shutil.rmtree(sub, ignore_errors=True)
        self._total = 0
        return freed
