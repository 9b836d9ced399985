"""Keep glibc's malloc from handing every activation back to the kernel (CPU training).

glibc serves allocations above its mmap threshold (128 KiB at first, raised
dynamically up to 32 MiB) with fresh ``mmap`` pages and returns freed heap tops
above its trim threshold to the kernel.  A CPU training step allocates and frees
the same few-MiB activations and gradients every step, so each step page-faults
them in again.  Measured on 2 cores, ViT-Tiny MAE fp32 at the benchmark's reference
config, one fresh process per sample: untuned 6 000-26 000 minor faults and up to
44 ms of kernel time per step (it depends on the address-space layout), step
0.265-0.291 s; tuned (mmap threshold at its ceiling, 1 GiB trim threshold) about 120
faults and 1 ms, step 0.265-0.283 s, never slower
(benchmarks/results/allocator-2026-11-22.jsonl).

The cost: memory freed during training stays with the process (up to the run's
peak, as with CUDA's caching allocator) until it exits.  Training runs in its own
process (CLI, ``torchrun``, the GUI's child), so the viewer never keeps it.
``MIM_WORKBENCH_MALLOC=default`` leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

#: mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc refuses mmap thresholds above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit).
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 1024 * 1024 * 1024
ENV = "MIM_WORKBENCH_MALLOC"

_applied: str | None = None


def tune_cpu_allocator() -> str:
    """Raise glibc's mmap and trim thresholds once per process; returns what was done.

    ``"tuned"`` (now or earlier), ``"default"`` (switched off by ``MIM_WORKBENCH_MALLOC``)
    or ``"unavailable: ..."`` (not glibc, or mallopt refused).  Never raises: the
    tuning only changes speed, never results.
    """
    global _applied
    if _applied is not None:
        return _applied
    if os.environ.get(ENV, "").strip().lower() in ("default", "off", "0", "no"):
        _applied = "default"
        return _applied
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        _applied = "unavailable: not glibc"
        return _applied
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and \
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError) as exc:
        _applied = f"unavailable: {exc}"
        return _applied
    _applied = "tuned" if ok else "unavailable: mallopt refused"
    return _applied


def allocator_state() -> str:
    """What :func:`tune_cpu_allocator` did in this process (``"untouched"`` before it ran)."""
    return _applied or "untouched"


__all__ = ["allocator_state", "tune_cpu_allocator"]
