"""Step time and page faults with and without the CPU allocator tuning (``training.allocator``).

Each sample is a fresh process (the tuning is per process), alternating tuned and
``MIM_WORKBENCH_MALLOC=default``, running ``make_step`` at the reference config.

    python benchmarks/bench_allocator.py [--rounds 3] [--steps 20] [--channels 1] > results/allocator-DATE.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_CHILD = """
import json, resource, statistics, sys, time
import torch
from mim_workbench.bench import REFERENCE_CONFIG, make_step
from mim_workbench.training.allocator import allocator_state
chans, steps = int(sys.argv[1]), int(sys.argv[2])
cfg = {**REFERENCE_CONFIG, "in_chans": chans}
step = make_step(cfg)
x = torch.rand(cfg["batch_size"], chans, cfg["img_size"], cfg["img_size"])
for _ in range(4):
    step(x)
r0 = resource.getrusage(resource.RUSAGE_SELF)
times = []
for _ in range(steps):
    t0 = time.perf_counter()
    step(x)
    times.append(time.perf_counter() - t0)
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"malloc": allocator_state(), "channels": chans, "step_s": statistics.median(times),
                  "minor_faults_per_step": (r1.ru_minflt - r0.ru_minflt) / steps,
                  "system_s_per_step": (r1.ru_stime - r0.ru_stime) / steps, "threads": torch.get_num_threads()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--channels", type=int, default=1)
    args = ap.parse_args()
    for r in range(args.rounds):
        for mode in ("tuned", "default"):
            env = {k: v for k, v in os.environ.items() if k != "MIM_WORKBENCH_MALLOC"}
            if mode == "default":
                env["MIM_WORKBENCH_MALLOC"] = "default"
            out = subprocess.run([sys.executable, "-c", _CHILD, str(args.channels), str(args.steps)],
                                 env=env, capture_output=True, text=True, check=True)
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps({"round": r, **rec}), flush=True)


if __name__ == "__main__":
    main()
