"""Entry point for the torchrun test (tests/test_ddp.py): ``pretrain`` from a JSON config.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/_ddp_pretrain.py CONFIG.json

Rank 0 writes the run directory (checkpoints, metrics.csv); the test compares it
with a single-process run of the same config.  Not collected by pytest (no test_ prefix).
"""

from __future__ import annotations

import json
import os
import sys

import torch  # noqa: F401  (imported before anything else, as in the test suite)

from mim_workbench.training.config import PretrainConfig
from mim_workbench.training.pretrain_loop import pretrain


def main(argv: list[str]) -> int:
    with open(argv[0], encoding="utf-8") as fh:
        config = PretrainConfig.from_dict(json.load(fh))
    result = pretrain(config)
    if int(os.environ.get("RANK", "0")) == 0:  # full-precision losses (metrics.csv rounds them)
        losses = [row["loss"] for row in result.history]
        with open(os.path.join(config.out, "losses.json"), "w", encoding="utf-8") as fh:
            json.dump(losses, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
