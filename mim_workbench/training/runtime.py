"""Where and how a run executes: device, precision, threads, torch.distributed.

``pretrain`` is the same function on one process and under ``torchrun``: when the
launcher's environment (``WORLD_SIZE`` > 1) is present it joins the process group
(gloo on CPU, NCCL on CUDA) and everything else in the loop asks this module for
the rank, the world size and the few collectives it needs.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError
from .allocator import tune_cpu_allocator


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


def prepare_device(requested: str, *, threads: int | None = None, local_rank: int = 0) -> torch.device:
    """What every training entry point does first: thread count, device, backend settings
    (:func:`configure_backend`)."""
    if threads is not None:
        torch.set_num_threads(threads)
    device = select_device(requested, local_rank=local_rank)
    configure_backend(device)
    return device


def configure_backend(device: torch.device) -> None:
    """Process-wide settings for training on ``device``.

    CPU: the allocator tuning (:func:`.allocator.tune_cpu_allocator`; training runs in its
    own process, so it never reaches the viewer).  CUDA: TF32 for fp32 matmuls and
    convolutions (what autocast leaves in fp32: the loss, norms' statistics, and every
    matmul of an ``amp="off"`` run), 10 mantissa bits, the usual choice for training on
    Ampere and newer.  Only CUDA's switch is set: ``set_float32_matmul_precision`` would
    also change CPU (oneDNN) matmuls.
    """
    if device.type == "cpu":
        tune_cpu_allocator()
    elif device.type == "cuda":
        enable_cuda_tf32()


def enable_cuda_tf32() -> None:
    """Let CUDA fp32 matmuls and cuDNN convolutions use TF32 (process-wide; CPU matmuls untouched)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):           # torch >= 2.9
        matmul.fp32_precision = "tf32"
        conv = getattr(torch.backends.cudnn, "conv", None)
        if conv is not None and hasattr(conv, "fp32_precision"):
            conv.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def cpu_bf16_support() -> tuple[bool, str]:
    """Whether this CPU runs bf16 matmuls natively, and what was found (for notes).

    oneDNN's own check (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) accepts any
    AVX-512 CPU, where bf16 is *emulated* and slower than fp32; autocast only pays
    off with AVX512-BF16 or AMX-BF16 instructions (x86) or the Arm BF16 extension.
    """
    if not torch.backends.mkldnn.is_available():
        return False, "torch was built without oneDNN"
    try:
        if not bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False, "oneDNN reports no bf16 support"
    except (AttributeError, RuntimeError):
        return False, "oneDNN's bf16 check is unavailable"
    flags = _cpu_flags()
    if "amx_bf16" in flags:
        return True, "AMX-BF16"
    if "avx512_bf16" in flags:
        return True, "AVX512-BF16"
    if "bf16" in flags and "avx512bw" not in flags:  # Arm: the BF16 extension (/proc/cpuinfo "bf16")
        return True, "Arm BF16"
    return False, "no AVX512-BF16/AMX-BF16 instructions (bf16 would be emulated, slower than fp32)"


def _cpu_flags() -> frozenset[str]:
    """CPU feature names: torch's own probe where it has one, else Linux /proc/cpuinfo."""
    found: set[str] = set()
    probes = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    for name, fn in probes.items():
        probe = getattr(torch.cpu, fn, None)
        try:
            if probe is not None and probe():
                found.add(name)
        except RuntimeError:
            pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("flags", "features"):
                    found.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return frozenset(found)


#: ``amp="auto"`` on an AMX CPU: bf16 from this encoder width up (measured faster at 192, slower at 64).
CPU_AUTO_BF16_MIN_WIDTH = 192


def resolve_amp(mode: str, device: torch.device, *, width: int | None = None) -> tuple[torch.dtype | None, list[str]]:
    """Autocast dtype (None = full precision) and notes for the user.

    CUDA: bf16 when the GPU supports it (no loss scaling, no overflow), else fp16
    with a GradScaler ("auto" and "bf16").  CPU: bf16 on request (``amp="bf16"``),
    and only where the CPU has native bf16 matmuls (:func:`cpu_bf16_support`);
    elsewhere the request falls back to fp32 with a note.  "auto" on the CPU is bf16
    only with AMX and an encoder at least :data:`CPU_AUTO_BF16_MIN_WIDTH` wide
    (``width``; unknown: fp32).  The models then use timm's matmul attention
    (``models.encoder.attention_path``).  Apple MPS: full precision.
    """
    notes: list[str] = []
    if mode == "off":
        return None, notes
    if device.type == "cpu":
        ok, what = cpu_bf16_support()
        if mode == "bf16":
            if ok:
                return torch.bfloat16, notes
            notes.append(f"amp=bf16 ignored: this CPU cannot run bf16 natively ({what}); training in fp32")
            return None, notes
        if mode == "fp16":
            notes.append("amp=fp16 ignored on the CPU (no fast fp16 kernels); use amp=bf16 or off")
            return None, notes
        # amp="auto": bf16 only pays off for models wide enough to keep AMX busy.  Measured
        # on 2 AMX cores, the real loop: ViT-Tiny/16 (192 wide) at 224 px 1.3-1.6x faster
        # with the same losses to 0.1 %, but the demo's 64-wide ViT 1.5x *slower* (cast
        # overhead); AVX512-BF16 without AMX is unmeasured, so it stays fp32
        # (benchmarks/results/bf16-pretrain-check-*, bench-2026-11-22-amx-bf16.md).
        if ok and what == "AMX-BF16" and width is not None and width >= CPU_AUTO_BF16_MIN_WIDTH:
            notes.append(f"amp=auto: bf16 autocast on this CPU's AMX for a {width}-wide encoder "
                         "(amp=off keeps fp32)")
            return torch.bfloat16, notes
        return None, notes
    if device.type != "cuda":
        if mode in ("bf16", "fp16"):
            notes.append(f"amp={mode} ignored: mixed precision is only used on CUDA and on CPUs with native bf16")
        return None, notes
    bf16_ok = torch.cuda.is_bf16_supported()
    if mode == "bf16" and not bf16_ok:
        notes.append("amp=bf16 is not supported by this GPU; using fp16 with loss scaling")
        return torch.float16, notes
    if mode in ("auto", "bf16"):
        return (torch.bfloat16 if bf16_ok else torch.float16), notes
    return torch.float16, notes


class CompiledForward:
    """``module(...)`` through ``torch.compile``, falling back to eager if compiling fails.

    ``torch.compile`` is lazy: a missing C compiler, an unsupported op or a backend
    bug only shows on the first call (or on a recompile later).  Such a failure is
    reported once (``warnings.warn`` and ``on_fallback(message)``) and every later
    call runs the eager module; the forward has no side effects before it returns,
    so the failed call is simply repeated eagerly.  ``dynamic=False``: the training
    loop's shapes are fixed (batch size, and the masked count is a constant
    ``round(ratio * L)``), so one static graph is compiled and guards never trade it
    for a slower dynamic-shape one; a different shape (a smaller batch) compiles
    its own graph.  Only the training forward goes through it: validation and
    previews (eval mode, other batch sizes) stay eager rather than recompile.

    Measured (benchmarks/results): ViT-Tiny MAE on 2 CPU cores fp32 0.265 -> 0.249 s,
    CPU bf16 0.171 -> 0.134 s per step, after 40-60 s of compilation on the first step.
    """

    def __init__(self, module: torch.nn.Module, *, on_fallback: Callable[[str], None] | None = None,
                 compile_fn: Callable[..., Callable[..., Any]] | None = None) -> None:
        self.module = module
        self._on_fallback = on_fallback
        self.error: str | None = None
        try:
            self._compiled: Callable[..., Any] | None = (compile_fn or torch.compile)(module, dynamic=False)
        except Exception as exc:  # noqa: BLE001 - any failure means: run eagerly
            self._compiled = None
            self._fail(exc)

    @property
    def active(self) -> bool:
        """True while calls go through the compiled module."""
        return self._compiled is not None

    def _fail(self, exc: BaseException) -> None:
        self.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        message = f"torch.compile failed ({self.error[:300]}); training continues without compile (eager)"
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        if self._on_fallback is not None:
            self._on_fallback(message)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._compiled is not None:
            try:
                return self._compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - compile/backend errors of any type
                if isinstance(exc, torch.OutOfMemoryError):
                    raise          # not a compile problem; the loop reports it
                self._compiled = None
                self._fail(exc)
        return self.module(*args, **kwargs)


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
        """True when more than one process trains (collectives do something)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files and emits events."""
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

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over all processes, where it lives (no host sync with NCCL)."""
        if not self.enabled:
            return t
        src = t.to(self._comm_device(t.device))
        dist.all_reduce(src, op=dist.ReduceOp.SUM)
        return src.to(t.device)

    def gather_rows(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Concatenate equally sized ``t`` of all processes along dim 0, in rank order."""
        if not self.enabled:
            return t
        src = t.to(self._comm_device(device))
        parts = [torch.empty_like(src) for _ in range(self.world_size)]
        dist.all_gather(parts, src.contiguous())
        return torch.cat(parts, 0).to(t.device)

    def gather_objects(self, obj: Any) -> list[Any]:
        """``obj`` of every process, in rank order (pickled; for rare, small records)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait until every process reaches this point; nothing with one process."""
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if this context created it (``from_env``); else nothing."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
