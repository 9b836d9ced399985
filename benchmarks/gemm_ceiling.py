"""How fast can the reference step be if only its matrix products took time?

Records every matrix product and fused attention call of one real fp32 training step
(``make_step`` at ``REFERENCE_CONFIG``), replays each distinct shape on its own (same
strides, so a transposed weight stays transposed) and adds up their median times.  That
sum is a floor for the step in fp32 on this machine: elementwise work, norms, the loss and
AdamW come on top.  The benchmark's efficiency (useful FLOPs / step time / ``torch.mm`` 2048²
rate) at that floor is the most any fp32 implementation of this model could reach here.

    python benchmarks/gemm_ceiling.py [--channels 1] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mim_workbench.bench import REFERENCE_CONFIG, REFERENCE_USEFUL_FLOPS, gemm_rate, make_step

aten = torch.ops.aten
_MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
_ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu.default,
              aten._scaled_dot_product_flash_attention_for_cpu_backward.default}


def _spec(x):
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), tuple(x.stride()), str(x.dtype))
    if isinstance(x, (list, tuple)):
        return tuple(_spec(v) for v in x)
    return x


def _build(spec):
    if isinstance(spec, tuple) and spec and spec[0] == "T":
        _, shape, stride, dtype = spec
        t = torch.empty_strided(shape, stride, dtype=getattr(torch, dtype.split(".")[-1]))
        return t.normal_() if t.is_floating_point() else t.zero_()
    if isinstance(spec, tuple):
        return tuple(_build(v) for v in spec)
    return spec


class _Record(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _MATMULS or func in _ATTENTION:
            self.calls[(func, _spec(args), _spec(tuple(sorted((kwargs or {}).items()))))] += 1
        return func(*args, **(kwargs or {}))


def _time(func, args, kwargs, repeats: int) -> float:
    for _ in range(3):
        func(*args, **kwargs)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        func(*args, **kwargs)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()

    cfg = {**REFERENCE_CONFIG, "in_chans": args.channels}
    step = make_step(cfg)
    x = torch.rand(cfg["batch_size"], args.channels, cfg["img_size"], cfg["img_size"])
    for _ in range(3):
        step(x)
    steps = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step(x)
        steps.append(time.perf_counter() - t0)
    rec = _Record()
    with rec:
        step(x)

    rows, total = [], 0.0
    for (func, arg_spec, kw_spec), count in rec.calls.items():
        t = _time(func, _build(arg_spec), dict(_build(kw_spec)), args.repeats)
        total += t * count
        shapes = [s[1] for s in arg_spec if isinstance(s, tuple) and s and s[0] == "T"]
        rows.append({"op": str(func).split(".")[-2], "shapes": shapes, "calls": count, "ms_each": round(t * 1e3, 3)})
    rate = statistics.median(gemm_rate()) * 1e9
    step_s = statistics.median(steps)
    useful = REFERENCE_USEFUL_FLOPS[args.channels]
    result = {
        "channels": args.channels, "step_s": round(step_s, 4), "matmul_attention_s": round(total, 4),
        "share_of_step": round(total / step_s, 3), "gemm_2048_gflops": round(rate / 1e9, 1),
        "efficiency_now": round(useful / step_s / rate, 3),
        "efficiency_if_only_matmuls_took_time": round(useful / total / rate, 3),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    for row in sorted(rows, key=lambda r: -r["ms_each"] * r["calls"])[:12]:
        print(json.dumps(row))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
