"""The GPU target: ViT-B/16 RGMIM pretraining in bf16 at >= 40 % of the GPU's bf16 matrix rate.

    python benchmarks/gpu_target.py [--channels 1] [--batch-size 128] [--compile] [--steps 30] \
        > benchmarks/results/gpu-target-$(date +%F).jsonl

JSON lines: the device and versions; the ``torch.mm`` rates at 8192² in bf16 and in fp32
(TF32, as training sets it); then one record per variant (eager, and compiled with
``--compile``) of the production training step (``bench.make_step``: MAE with region-guided
masking = RGMIM, ViT-B/16 at 224 px, decoder 512 x 8 x 16 heads, mask ratio 0.75,
norm_pix_loss, bf16 autocast, fused AdamW): seconds per step (median of 3 blocks of ``--steps``
steps, synchronised at block ends) after warm-up, images/s, useful FLOPs (``bench.useful_flops``) and efficiency = useful FLOPs / step
time / bf16 GEMM rate, with ``target_met`` (>= 0.40).  ``--device cpu --quick`` runs a tiny
model to check the script itself (tests/test_bench.py); the target is judged on a GPU only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mim_workbench.bench import gemm_rate, machine_record, make_step, random_regions, useful_flops

TARGET = 0.40
VIT_B_RGMIM = {
    "img_size": 224, "patch_size": 16, "in_chans": 1, "embed_dim": 768, "depth": 12, "num_heads": 12,
    "decoder_embed_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16, "mlp_ratio": 4.0,
    "mask_ratio": 0.75, "batch_size": 128, "norm_pix_loss": True, "lr": 1.5e-4, "weight_decay": 0.05,
    "method": "mae", "strategy": "region",
}
TINY = {**VIT_B_RGMIM, "img_size": 64, "embed_dim": 64, "depth": 2, "num_heads": 2, "decoder_embed_dim": 32,
        "decoder_depth": 1, "decoder_num_heads": 2, "batch_size": 4}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, x: torch.Tensor, region: torch.Tensor, *, steps: int, warmup: int, blocks: int = 3) -> list[float]:
    """Seconds per step: the mean of each of ``blocks`` runs of ``steps`` steps, synchronised only
    at a block's ends, as training runs (a sync per step would idle the GPU while Python queues
    the next one); after ``warmup`` untimed steps (the first compiles)."""
    for _ in range(warmup):
        step(x, region)
    _sync(x.device)
    out = []
    for _ in range(blocks):
        t = time.perf_counter()
        for _ in range(steps):
            step(x, region)
        _sync(x.device)
        out.append((time.perf_counter() - t) / steps)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=None, help="default 128 (4 with --quick)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time the step with torch.compile")
    ap.add_argument("--quick", action="store_true", help="tiny model, small GEMM: checks the script, no target")
    args = ap.parse_args(argv)

    from mim_workbench.training.runtime import prepare_device

    device = prepare_device(args.device)          # as training does: TF32 on CUDA, allocator on the CPU
    config = {**(TINY if args.quick else VIT_B_RGMIM), "in_chans": args.channels}
    if args.batch_size:
        config["batch_size"] = args.batch_size
    print(json.dumps(machine_record(str(device))), flush=True)
    n = 256 if args.quick else 8192
    rates = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        samples = gemm_rate(n, reps=3 if args.quick else 10, device=device, dtype=dtype)
        rates[name] = statistics.median(samples)
        print(json.dumps({"record": "gemm", "dtype": name, "n": n, "gflops": rates[name], "samples": samples}),
              flush=True)

    B, size = int(config["batch_size"]), int(config["img_size"])
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, args.channels, size, size, generator=g).to(device)
    region = random_regions(B, size, seed=0)              # pixel masks, as the loop's batches carry
    useful = useful_flops(config)
    for compiled in (False, True) if args.compile else (False,):
        step = make_step({**config, "compile": compiled}, device=device, amp="bf16")
        times = time_steps(step, x, region, steps=2 if args.quick else args.steps,
                           warmup=1 if args.quick else args.warmup)
        s = statistics.median(times)
        eff = useful / s / (rates["bf16"] * 1e9)
        print(json.dumps({
            "record": "step", "config": config, "compile": compiled,
            "compile_active": bool(getattr(step.train_forward, "active", False)) if compiled else False,
            "step_s": s, "block_step_s": times,
            "images_per_s": B / s, "useful_gflop": useful / 1e9, "bf16_gemm_gflops": rates["bf16"],
            "efficiency": eff, "target": TARGET, "target_met": None if args.quick else eff >= TARGET,
        }), flush=True)


if __name__ == "__main__":
    main()
