"""CLI subcommand ``bench``: the performance benchmark, as JSON lines.

COMMANDS holds its ``_add_bench(sub) -> runner`` as described in :mod:`mim_workbench.cli`.
The runner prints one JSON object per line as soon as it is measured and, with
``--out FILE``, writes the same lines to FILE.  Field meanings: ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError
from .args import AddCommand, Runner, add_amp, add_data, add_device, add_out, add_threads


def _csv(kind: type = str) -> Callable[[str], list]:
    def parse(text: str) -> list:
        """The non-empty comma-separated items of ``text``, each converted by ``kind``; raises
        argparse.ArgumentTypeError for no items or an item ``kind`` refuses (ValueError)."""
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        try:
            return [kind(t) for t in items]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def _add_bench(sub: argparse._SubParsersAction) -> Runner:
    p = sub.add_parser(
        "bench", help="benchmark pretraining steps (vs lightly's MAE), masking, data pipeline, inference",
        description="Times one full training step (forward, loss, backward, AdamW, zero_grad) for each method "
                    "and strategy at the reference configuration (ViT-Tiny/16, 224 px, decoder 128x4x4, ratio "
                    "0.75, batch 16, norm_pix_loss), interleaved with lightly's MAE when installed, plus the fp32 "
                    "GEMM rate, efficiency, masking, data pipeline and inference throughput. Prints JSON lines.",
    )
    p.add_argument("--quick", action="store_true", help="few repetitions (smoke test; numbers are not stable)")
    p.add_argument("--methods", type=_csv(), default=None, help="comma list of mae,simmim,miram,beit,feature (default all)")
    p.add_argument("--strategies", type=_csv(), default=None,
                   help="comma list of random,block,blockwise,region (default random,region)")
    p.add_argument("--channels", type=_csv(int), default=None, help="input channels to time, e.g. 1,3 (default 1,3)")
    p.add_argument("--sections", type=_csv(), default=None,
                   help="subset of gemm,step,masking,data,inference (default all)")
    p.add_argument("--reps", type=int, default=None, help="timed steps per configuration (default 20; quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 3; quick 1)")
    p.add_argument("--config", default=None,
                   help="JSON object (or a .json file) overriding the reference configuration, "
                        "e.g. '{\"img_size\": 64, \"depth\": 2}'")
    p.add_argument("--no-peer", dest="peer", action="store_false", help="do not time lightly's MAE")
    add_device(p, "cpu", "cpu (default) or cuda")
    add_amp(p, ("off", "bf16", "fp16"), "autocast our forward (the peer stays fp32; default off)")
    p.add_argument("--extra-amp", type=_csv(), default=None,
                   help="also time ours and lightly's mae/random in these precisions (default bf16 where the "
                        "CPU/GPU runs bf16 natively; 'none' to skip)")
    p.add_argument("--compile", action="store_true",
                   help="also time our mae/random step with torch.compile in each precision (compiles for "
                        "40-60 s per step on 2 cores during warm-up)")
    add_threads(p, "torch CPU threads (default: torch's choice)")
    add_data(p, "image folder for the data benchmark (default ../shared/data chest X-rays, else the sample data)",
             masks="region masks for --data")
    add_out(p, "also write the JSON lines to this file", required=False)
    return _run_bench


def _load_config(text: str | None) -> dict | None:
    if text is None:
        return None
    path = Path(text)
    try:
        raw = path.read_text() if text.strip()[:1] != "{" and path.is_file() else text
        cfg = json.loads(raw)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--config: not a JSON object or JSON file: {exc}") from None
    if not isinstance(cfg, dict):
        raise ConfigError("--config must be a JSON object")
    return cfg


def _run_bench(args: argparse.Namespace) -> int:
    from ..bench import BenchOptions, run_bench

    values: dict = {"peer": args.peer, "device": args.device, "amp": None if args.amp in (None, "off") else args.amp,
                    "threads": args.threads, "data": args.data, "masks": args.masks, "compile": args.compile,
                    "config": _load_config(args.config)}
    if args.extra_amp is not None:
        values["extra_amp"] = tuple(a for a in args.extra_amp if a.lower() not in ("none", "off"))
    for name in ("methods", "strategies", "channels", "sections", "reps", "warmup"):
        value = getattr(args, name)
        if value is not None:
            values[name] = tuple(value) if isinstance(value, list) else value
    options = BenchOptions.quick(**values) if args.quick else BenchOptions(**values)
    out = open(args.out, "w") if args.out else None  # noqa: SIM115 - closed below
    try:
        for record in run_bench(options):
            line = json.dumps(record)
            print(line, flush=True)
            if out is not None:
                out.write(line + "\n")
                out.flush()
    finally:
        if out is not None:
            out.close()
    return 0


COMMANDS: list[AddCommand] = [_add_bench]
