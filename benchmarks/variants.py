"""A/B timing of speed-work variants of our training step (and lightly's), interleaved.

    python benchmarks/variants.py --reps 20 prod fused fused+bf16 fused+compile lightly

Variants are ``+``-joined options on top of ``mim_workbench.bench.make_step`` at the
reference configuration (``--config`` JSON overrides it, ``--method`` picks the method):

* ``prod``     - the production path as it is (the training loop's optimiser);
* ``fused``    - ``torch.optim.AdamW(..., fused=True)`` with the loop's parameter groups;
* ``foreach``  - ``torch.optim.AdamW(..., foreach=True)`` (torch's default on CPU tensors);
* ``bf16``     - bf16 autocast of the forward (CPU AMX / AVX512-BF16);
* ``compile``  - ``torch.compile`` of the whole model (graph break at the mask indices);
* ``cblocks``  - ``torch.compile`` of the encoder and decoder block stacks only;
* ``manualattn`` - timm's non-fused attention path (``fused_attn = False``) in every block;
* ``oldmodels`` - models/ as before the speed work (fused attention under CPU bf16
  autocast), for before/after numbers;
* ``lightly``  - lightly's MAE (``make_lightly_step``); ``lightly+bf16`` / ``lightly+compile`` apply
  the same autocast / per-module ``torch.compile`` to it, for like-for-like comparisons.

Prints one JSON line per variant: median / min / quartiles of the step time, the
speed-up of each variant over the first one, the fp32 GEMM rate measured before and
after, and the efficiency (reference useful FLOPs / step / GEMM).  Environment
knobs (``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY``) are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mim_workbench.bench import (  # noqa: E402
    REFERENCE_CONFIG,
    cpu_idle_fraction,
    example_batch,
    gemm_rate,
    make_fine,
    make_lightly_step,
    make_step,
    reference_useful_flops,
    time_interleaved,
)
from mim_workbench.training.optim import param_groups  # noqa: E402


def _autocast_call(fn, *args):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fn(*args)


class _OldModels:
    """Runs a step with models/ as it was before the speed work: timm's fused attention
    under CPU bf16 autocast too."""

    def __init__(self, step) -> None:
        self.step = step
        self.model = step.model

    def __call__(self, *args, **kwargs):
        from mim_workbench.models import encoder

        saved = encoder.cpu_bf16_autocast
        encoder.cpu_bf16_autocast = lambda x: False
        try:
            return self.step(*args, **kwargs)
        finally:
            encoder.cpu_bf16_autocast = saved


def build(variant: str, cfg: dict, method: str):
    parts = set(variant.split("+"))
    if "lightly" in parts:
        peer = make_lightly_step(cfg)
        if "bf16" in parts:        # the same autocast our bf16 variant uses, around lightly's forward
            loss = peer.loss
            peer.loss = lambda images: _autocast_call(loss, images)
        if "compile" in parts:
            for m in peer.modules:
                m.compile(dynamic=False)
        return peer
    step = make_step({**cfg, "method": method}, amp="bf16" if "bf16" in parts else None)
    kw = {"fused": True} if "fused" in parts else {"foreach": True} if "foreach" in parts else None
    if kw is not None:
        step.optimizer = torch.optim.AdamW(param_groups(step.model, float(cfg["weight_decay"])), lr=float(cfg["lr"]),
                                           betas=(0.9, 0.95), **kw)
    if "manualattn" in parts:      # timm's non-fused attention (matmul + softmax) in every block
        for m in step.model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
    if "oldmodels" in parts:       # models/ as before the speed work (for before/after numbers)
        step = _OldModels(step)
    if "cblocks" in parts:
        step.model.encoder.blocks.compile(dynamic=False)
        if hasattr(step.model, "decoder"):
            step.model.decoder.blocks.compile(dynamic=False)
    if "compile" in parts:
        step.model.compile(dynamic=False)
    return step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--method", default="mae")
    ap.add_argument("--config", default="{}", help="JSON overrides of the reference configuration")
    ap.add_argument("--out", help="append the JSON lines to this file")
    args = ap.parse_args(argv)
    cfg = {**REFERENCE_CONFIG, **json.loads(args.config)}
    x = example_batch(cfg)
    fine = make_fine(x)
    fns = {}
    for v in args.variants:
        step = build(v, cfg, args.method)
        t = time.perf_counter()
        first = [float(step(x, fine=fine)) for _ in range(2)]
        print(f"# {v}: first two steps {time.perf_counter() - t:.1f} s, losses {first}", flush=True)
        fns[v] = (lambda s: (lambda: s(x, fine=fine)))(step)
    idle0 = cpu_idle_fraction()
    g = gemm_rate(reps=5)
    times = time_interleaved(fns, reps=args.reps, warmup=args.warmup)
    g += gemm_rate(reps=5)
    idle1 = cpu_idle_fraction()
    gemm = statistics.median(g)
    useful, _ = reference_useful_flops({**cfg, "method": args.method})
    base = statistics.median(times[args.variants[0]])
    lines = []
    for name, t in times.items():
        med = statistics.median(t)
        q = statistics.quantiles(t, n=4)
        lines.append({
            "variant": name, "method": "mae" if name.startswith("lightly") else args.method, "in_chans": cfg["in_chans"],
            "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "step_s": round(med, 4), "min": round(min(t), 4), "q1": round(q[0], 4), "q3": round(q[2], 4),
            "speedup_vs_first": round(base / med, 3), "gemm_gflops": round(gemm, 1),
            "efficiency": round(useful / med / (gemm * 1e9), 3), "cpu_idle": [idle0, idle1],
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })
    out = open(args.out, "a") if args.out else None  # noqa: SIM115
    for line in lines:
        text = json.dumps(line)
        print(text, flush=True)
        if out:
            out.write(text + "\n")
    if out:
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
