"""Benchmarks of the pretraining step, masking, data pipeline and inference.

Two entry points:

* :func:`make_step` builds one *full training step of the production code path*
  (``build_model`` -> ``model.make_mask`` -> ``model(images, mask, fine)`` ->
  ``loss.backward()`` -> the training loop's AdamW from
  :func:`mim_workbench.training.optim.build_optimizer` -> ``zero_grad``) at a
  constant learning rate, for side-by-side timing with other implementations::

      step = make_step({**REFERENCE_CONFIG, "method": "mae", "strategy": "region"})
      loss = step(torch.rand(16, 1, 224, 224))        # detached 0-d tensor

* :func:`run_bench` yields the JSON records that ``mim-workbench bench`` prints:
  the fp32 GEMM rate, step time / images/s / FLOPs / efficiency per method and
  strategy (lightly's MAE timed beside ours, interleaved), masking time, data
  pipeline and reconstruction-inference throughput.  ``benchmarks/README.md``
  explains every field.

Efficiency is ``useful FLOPs / step time / measured fp32 GEMM rate``.  Useful
FLOPs are the reference numbers at the reference configuration (46.5
GFLOP for 1 channel, 48.6 for 3) and :func:`useful_flops` (the same convention)
for any other configuration (matmuls + attention, backward = 2x forward, patch
embedding counted over all patches as the peers compute it, decoder head on masked
tokens only); the extra work an implementation does (predicting every token,
embedding masked patches) therefore never counts as useful.  bf16 steps are divided
by the *fp32* GEMM rate too.

Everything here runs on the CPU by default; ``device="cuda"`` works the same way
(with CUDA synchronisation around timed regions).

Modules: :mod:`.config` (reference configuration, checks, example inputs),
:mod:`.step` (our timed step), :mod:`.peer` (lightly's MAE step), :mod:`.flops`
(FLOP counting and the useful-FLOP convention), :mod:`.timing` (timers),
:mod:`.machine` (machine facts), :mod:`.run` (the whole run).
"""

from __future__ import annotations

from .config import (BASE_MODEL, BETAS, MASK_CELL_PX, METHODS, MIRAM_SCALE, OPTIONAL_KEYS, REFERENCE_CONFIG,
                     REFERENCE_PEER_STEP_S, REFERENCE_USEFUL_FLOPS, REQUIRED_KEYS, STRATEGIES, check_config,
                     default_region, example_batch, img_hw, make_fine, model_config, random_regions)
from .flops import count_flops, flop_formulas, reference_useful_flops, useful_flops
from .machine import bf16_supported, cpu_idle_fraction, machine_record
from .peer import LightlyMAEStep, lightly_version, make_lightly_step
from .run import BenchOptions, run_bench, write_jsonl
from .step import BenchStep, make_step
from .timing import (default_data_root, gemm_rate, summarise, time_data_pipeline, time_inference,
                     time_interleaved, time_masking)
from .timing import _ratio_ci  # noqa: F401 - the tests check the ratio statistics through the package

__all__ = [
    "BASE_MODEL", "BETAS", "MASK_CELL_PX", "METHODS", "MIRAM_SCALE", "OPTIONAL_KEYS", "REFERENCE_CONFIG",
    "REFERENCE_PEER_STEP_S", "REFERENCE_USEFUL_FLOPS", "REQUIRED_KEYS", "STRATEGIES",
    "BenchOptions", "BenchStep", "LightlyMAEStep",
    "bf16_supported", "check_config", "count_flops", "cpu_idle_fraction", "default_data_root", "default_region",
    "example_batch", "flop_formulas", "gemm_rate", "img_hw", "lightly_version", "machine_record", "make_fine",
    "make_lightly_step", "make_step", "model_config", "random_regions", "reference_useful_flops", "run_bench",
    "summarise", "time_data_pipeline", "time_inference", "time_interleaved", "time_masking", "useful_flops",
    "write_jsonl",
]
