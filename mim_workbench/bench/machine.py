"""Facts about the machine a bench runs on: CPU, versions, load, allocator, bf16 support."""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import timm
import torch

from ..training.allocator import allocator_state
from ..training.runtime import cpu_bf16_support
from .peer import lightly_version


def cpu_idle_fraction(seconds: float = 1.0) -> float | None:
    """Fraction in [0, 1] of all CPUs' time spent idle over ``seconds`` (Linux ``/proc/stat``), else None.

    Blocks for ``seconds``.  Recorded before and after a run: on a shared machine,
    other processes' load is the largest source of noise (and of OpenMP stalls) in
    CPU timings.
    """
    def snap() -> tuple[int, int]:
        """(total, idle + iowait) jiffies since boot, from the first line of ``/proc/stat``."""
        with open("/proc/stat") as fh:
            v = [int(t) for t in fh.readline().split()[1:]]
        return sum(v[:8]), v[3] + v[4]

    try:
        t1, i1 = snap()
        time.sleep(seconds)
        t2, i2 = snap()
    except (OSError, ValueError, IndexError):
        return None
    return (i2 - i1) / max(1, t2 - t1)


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or None where the system has none."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else ``platform.processor()`` (may be empty)."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def machine_record(device: str = "cpu") -> dict[str, Any]:
    """Machine, versions and load: the header record (``"record": "machine"``) of every bench run.

    Takes about a second (it samples :func:`cpu_idle_fraction`); ``gpu`` is added for
    an available CUDA ``device``.
    """
    rec: dict[str, Any] = {
        "record": "machine", "cpu": _cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "timm": timm.__version__, "lightly": lightly_version(),
        "python": platform.python_version(), "device": device,
        "loadavg": loadavg(),
        "cpu_idle": cpu_idle_fraction(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "malloc": allocator_state(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        rec["gpu"] = torch.cuda.get_device_name()
    return rec


def bf16_supported(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 runs natively: CUDA bf16, or a CPU with AVX512-BF16 / AMX (the training loop's check)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_bf16_support()[0]
