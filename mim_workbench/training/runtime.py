"""Where and how a run executes: device, precision, threads, torch.distributed.

``pretrain`` is the same function on one process and under ``torchrun``: when the
launcher's environment (``WORLD_SIZE`` > 1) is present it joins the process group
(gloo on CPU, NCCL on CUDA) and everything else in the loop asks this module for
the rank, the world size and the few collectives it needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..errors import ConfigError


def select_device(requested: str, *, local_rank: int = 0) -> torch.device:
    """"auto" picks CUDA, then Apple MPS, then the CPU; explicit choices are checked."""
    req = (requested or "auto").lower()
    if req == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if req.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={requested!r}: CUDA is not available on this machine (use --device cpu or auto)")
        if req == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        dev = torch.device(req)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device={requested!r}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    if req.startswith("mps"):
        if not _mps_available():
            raise ConfigError(f"device={requested!r}: Apple MPS is not available on this machine")
        return torch.device("mps")
    if req == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"device={requested!r}: choose auto, cpu, cuda, cuda:N or mps")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_amp(mode: str, device: torch.device) -> tuple[torch.dtype | None, list[str]]:
    """Autocast dtype (None = full precision) and notes for the user.

    Mixed precision is only used on CUDA: bf16 when the GPU supports it (no loss
    scaling, no overflow), else fp16 with a GradScaler.
    """
    notes: list[str] = []
    if mode == "off":
        return None, notes
    if device.type != "cuda":
        if mode in ("bf16", "fp16"):
            notes.append(f"amp={mode} ignored: mixed precision is only used on CUDA")
        return None, notes
    bf16_ok = torch.cuda.is_bf16_supported()
    if mode == "bf16" and not bf16_ok:
        notes.append("amp=bf16 is not supported by this GPU; using fp16 with loss scaling")
        return torch.float16, notes
    if mode in ("auto", "bf16"):
        return (torch.bfloat16 if bf16_ok else torch.float16), notes
    return torch.float16, notes


@dataclass
class DistContext:
    """The process group of this run (a single process when ``world_size == 1``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False          # we created the group, so we destroy it
    notes: list[str] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_request: str) -> DistContext:
        """Join the process group torchrun describes in the environment, if any."""
        if dist.is_available() and dist.is_initialized():
            return cls(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", 0)), backend=dist.get_backend())
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls()
        if not dist.is_available():
            raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        req = (device_request or "auto").lower()
        use_cuda = torch.cuda.is_available() and (req == "auto" or req.startswith("cuda"))
        if req.startswith("mps"):
            raise ConfigError("multi-process training is not supported on Apple MPS; use --device cpu")
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group(backend=backend, init_method="env://")
        return cls(rank=rank, world_size=world, local_rank=local_rank, backend=backend, owns_group=True)

    # ------------------------------------------------------------------ collectives
    def _comm_device(self, device: torch.device) -> torch.device:
        return device if self.backend == "nccl" else torch.device("cpu")

    def sum_floats(self, values: list[float], device: torch.device) -> list[float]:
        """Sum a few numbers over all processes (one small all_reduce)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device(device))
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().tolist()

    def gather_rows(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Concatenate equally sized ``t`` of all processes along dim 0, in rank order."""
        if not self.enabled:
            return t
        src = t.to(self._comm_device(device))
        parts = [torch.empty_like(src) for _ in range(self.world_size)]
        dist.all_gather(parts, src.contiguous())
        return torch.cat(parts, 0).to(t.device)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
