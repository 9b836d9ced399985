"""FLOP counting: what torch's counter sees, and the useful-FLOP convention efficiency uses.

Useful FLOPs are the reference numbers at the reference configuration (46.5 GFLOP
for 1 channel, 48.6 for 3) and :func:`useful_flops` (the same convention) for any
other configuration; the extra work an implementation does (predicting every token,
embedding masked patches) therefore never counts as useful.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..models.config import ModelConfig

from .config import (
    MIRAM_SCALE,
    REFERENCE_CONFIG,
    REFERENCE_USEFUL_FLOPS,
    REQUIRED_KEYS,
    check_config,
    img_hw,
)


def _sdpa_shapes_flops(q: Sequence[int], k: Sequence[int], v: Sequence[int]) -> int:
    b, h, sq, d = q[-4], q[-3], q[-2], q[-1]
    sk, dv = k[-2], v[-1]
    return 2 * b * h * sq * sk * d + 2 * b * h * sq * sk * dv      # QK^T and PV


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return _sdpa_shapes_flops(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    # torch's convention for fused attention backward: recompute QK^T, then dS, dV, dQ, dK.
    return int(2.5 * _sdpa_shapes_flops(query_shape, key_shape, value_shape))


def flop_formulas() -> dict[Any, Callable[..., int]]:
    """FlopCounterMode ``custom_mapping`` for the CPU fused attention kernels.

    On the CPU ``scaled_dot_product_attention`` dispatches to
    ``aten._scaled_dot_product_flash_attention_for_cpu`` (and its ``_backward``),
    which torch's counter does not know; without these every attention FLOP would
    be missing from the count.  Kernels this torch lacks are left out of the mapping.
    """
    aten = torch.ops.aten
    out: dict[Any, Callable[..., int]] = {}
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu_flop),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_cpu_backward_flop)):
        packet = getattr(aten, name, None)
        if packet is not None:
            out[packet] = fn
    return out


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs torch's FlopCounterMode sees while ``fn()`` runs (CPU attention included); ``fn`` runs once."""
    with FlopCounterMode(display=False, custom_mapping=flop_formulas()) as counter:
        fn()
    return int(counter.get_total_flops())


def useful_flops(config: Mapping[str, Any]) -> float:
    """Useful FLOPs of one training step of a whole batch: matmuls + attention, forward + backward.

    The reference convention: the patch embedding counted over all patches (as the
    reference implementations compute it), the encoder on the visible tokens plus
    the class token (MAE, MIRAM) or on every token (SimMIM), MAE's decoder on every
    position with its head on the masked tokens only; MIRAM adds its fine head on
    the masked tokens, SimMIM its 1x1-conv head.  BEiT and the feature method run the
    encoder on every token with a linear head on the masked ones (over the codebook, or
    back to the width); the work that makes their targets is counted forward only:
    BEiT's token assignment, the feature method's teacher pass over the whole image.  Reproduces the reference 46.5 / 48.6
    GFLOP at the reference configuration to within 0.2 %.  Statistics heads and
    elementwise work are not counted.  Backward is 2x forward, except for the
    patch embedding (weight gradient only: its input is the image).  ConfigError as
    :func:`~mim_workbench.bench.config.check_config`.
    """
    cfg = check_config(config)
    H, W = img_hw(cfg)
    p, C = int(cfg["patch_size"]), int(cfg["in_chans"])
    L = (H // p) * (W // p)
    M = int(round(float(cfg["mask_ratio"]) * L))
    V = L - M
    D, Dd = int(cfg["embed_dim"]), int(cfg["decoder_embed_dim"])
    r = float(cfg["mlp_ratio"])
    P = C * p * p

    def blocks(n: int, d: int, depth: int) -> float:
        """Forward FLOPs of ``depth`` transformer blocks of width ``d`` on ``n`` tokens (one image)."""
        linear = 2 * n * d * (3 * d + d + 2 * r * d)      # qkv, proj, fc1 + fc2
        attention = 4 * n * n * d                         # QK^T and PV over all heads
        return depth * (linear + attention)

    patch_embed = 2 * L * P * D
    every_token = patch_embed + blocks(L + 1, D, int(cfg["depth"]))
    targets = 0.0   # forward-only work that makes the targets
    if cfg["method"] == "simmim":
        fwd = every_token + 2 * L * D * P
    elif cfg["method"] == "beit":
        K = ModelConfig().codebook_size
        fwd, targets = every_token + 2 * M * D * K, 2 * L * P * K
    elif cfg["method"] == "feature":
        fwd, targets = every_token + 2 * M * D * D, every_token
    else:
        fwd = (patch_embed + blocks(V + 1, D, int(cfg["depth"])) + 2 * (V + 1) * D * Dd
               + blocks(L + 1, Dd, int(cfg["decoder_depth"])) + 2 * M * Dd * P)
        if cfg["method"] == "miram":
            fp = MIRAM_SCALE * p
            fwd += 2 * M * Dd * (2 * Dd) + 2 * M * (2 * Dd) * (fp * fp * C)
    # backward = 2x forward, except the patch embedding: its input (pixels) needs no gradient
    return (3.0 * fwd - patch_embed + targets) * int(cfg["batch_size"])


def reference_useful_flops(config: Mapping[str, Any]) -> tuple[float, str]:
    """(useful FLOPs of one step, source).

    Source ``"quoted"``: the quoted :data:`REFERENCE_USEFUL_FLOPS` figure, for MAE at the
    reference configuration (learning rate, weight decay and channels aside; 1 or 3
    channels); else ``"analytic"``: :func:`useful_flops`.  ConfigError for a bad config.
    """
    cfg = check_config(config)
    base = {k: cfg[k] for k in REQUIRED_KEYS if k not in ("lr", "weight_decay", "in_chans")}
    ref = {k: REFERENCE_CONFIG[k] for k in base}
    base["img_size"], ref["img_size"] = img_hw(cfg), img_hw(REFERENCE_CONFIG)
    if cfg["method"] == "mae" and base == ref and cfg["in_chans"] in REFERENCE_USEFUL_FLOPS:
        return REFERENCE_USEFUL_FLOPS[cfg["in_chans"]], "quoted"
    return useful_flops(cfg), "analytic"
