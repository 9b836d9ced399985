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
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .training.allocator import allocator_state
from .training.runtime import configure_backend, prepare_device

# ====================================================================== configuration
#: The reference configuration: ViT-Tiny/16 at 224 px, decoder 128 x 4 x 4 heads.
REFERENCE_CONFIG: dict[str, Any] = {
    "img_size": 224, "patch_size": 16, "in_chans": 1,
    "embed_dim": 192, "depth": 12, "num_heads": 3,
    "decoder_embed_dim": 128, "decoder_depth": 4, "decoder_num_heads": 4,
    "mlp_ratio": 4.0, "mask_ratio": 0.75, "batch_size": 16, "norm_pix_loss": True,
    "lr": 1.5e-4, "weight_decay": 0.05,
}
#: Useful work of one reference MAE step, by input channels (the quoted reference figures).
REFERENCE_USEFUL_FLOPS: dict[int, float] = {1: 46.5e9, 3: 48.6e9}
#: Quoted step times of the reference implementations for this kind of
#: machine (2 cores, fp32): not measured here, facebookresearch/mae is not installed.
REFERENCE_PEER_STEP_S: dict[str, tuple[float, float]] = {"facebookresearch/mae": (0.30, 0.35)}

REQUIRED_KEYS = (
    "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
    "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "mlp_ratio",
    "mask_ratio", "batch_size", "norm_pix_loss", "lr", "weight_decay",
)
OPTIONAL_KEYS: dict[str, Any] = {"method": "mae", "strategy": "random", "compile": False}
METHODS = ("mae", "simmim", "miram")
STRATEGIES = ("random", "block", "region")
#: AdamW betas of the training loop's default (PretrainConfig.betas), MAE's values.
BETAS = (0.9, 0.95)
#: timm architecture the overrides apply to (class token, qkv bias, pre-norm blocks).
BASE_MODEL = "vit_tiny_patch16_224"
#: SimMIM's mask cell in pixels (rounded to a multiple of the patch size).
MASK_CELL_PX = 32
#: MIRAM's fine/coarse scale (ModelConfig.miram_scale default).
MIRAM_SCALE = 2

StepFn = Callable[..., torch.Tensor]


def check_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config with optional keys filled in; unknown or missing keys raise ConfigError."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"bench config must be a mapping, got {type(config).__name__}")
    unknown = sorted(set(config) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise ConfigError(f"unknown bench config key(s): {', '.join(unknown)}")
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ConfigError(f"bench config is missing: {', '.join(missing)}")
    cfg = {**OPTIONAL_KEYS, **dict(config)}
    if cfg["method"] not in METHODS:
        raise ConfigError(f"unknown method {cfg['method']!r} (valid: {', '.join(METHODS)})")
    if cfg["strategy"] not in STRATEGIES:
        raise ConfigError(f"unknown strategy {cfg['strategy']!r} (valid: {', '.join(STRATEGIES)})")
    if not isinstance(cfg["compile"], bool):
        raise ConfigError(f"compile must be true or false, got {cfg['compile']!r}")
    if cfg["in_chans"] not in (1, 3):
        raise ConfigError(f"in_chans must be 1 or 3, got {cfg['in_chans']!r}")
    batch = cfg["batch_size"]
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch!r}")
    ratio = float(cfg["mask_ratio"])
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"mask_ratio must be in (0, 1), got {cfg['mask_ratio']!r}")
    for key in ("lr", "weight_decay"):
        value = float(cfg[key])
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{key} must be a finite number >= 0, got {cfg[key]!r}")
    return cfg


def img_hw(config: Mapping[str, Any]) -> tuple[int, int]:
    size = config["img_size"]
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def model_config(config: Mapping[str, Any]):
    """The :class:`~mim_workbench.models.ModelConfig` a bench config describes."""
    from .models import ModelConfig

    cfg = check_config(config)
    p = int(cfg["patch_size"])
    return ModelConfig(
        model=BASE_MODEL, img_size=img_hw(cfg), in_chans=int(cfg["in_chans"]), method=cfg["method"],
        patch_size=p, embed_dim=int(cfg["embed_dim"]), depth=int(cfg["depth"]), num_heads=int(cfg["num_heads"]),
        mlp_ratio=float(cfg["mlp_ratio"]), decoder_embed_dim=int(cfg["decoder_embed_dim"]),
        decoder_depth=int(cfg["decoder_depth"]), decoder_num_heads=int(cfg["decoder_num_heads"]),
        norm_pix_loss=bool(cfg["norm_pix_loss"]), mask_patch_size=p * max(1, round(MASK_CELL_PX / p)),
        miram_scale=MIRAM_SCALE,
    )


# ====================================================================== inputs
def default_region(img_size: int | tuple[int, int]) -> torch.Tensor:
    """Stand-in organ mask for ``strategy="region"`` when no region is given.

    A centred ellipse with semi-axes 0.40 H x 0.35 W (about 44 % of the image,
    roughly where the lungs of a PA chest film lie), float32 ``[H, W]`` in {0, 1}.
    """
    H, W = (img_size, img_size) if isinstance(img_size, int) else img_size
    yy = (torch.arange(H, dtype=torch.float32) + 0.5 - H / 2) / (0.40 * H)
    xx = (torch.arange(W, dtype=torch.float32) + 0.5 - W / 2) / (0.35 * W)
    return ((yy[:, None] ** 2 + xx[None, :] ** 2) <= 1.0).to(torch.float32)


def random_regions(batch_size: int, img_size: int | tuple[int, int], *, seed: int = 0) -> torch.Tensor:
    """Per-sample elliptical region masks ``[B, H, W]`` (jittered centre and axes)."""
    H, W = (img_size, img_size) if isinstance(img_size, int) else img_size
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(batch_size, 4, generator=g)
    cy = H * (0.45 + 0.1 * u[:, 0]); cx = W * (0.45 + 0.1 * u[:, 1])       # noqa: E702
    ay = H * (0.25 + 0.2 * u[:, 2]); ax = W * (0.2 + 0.2 * u[:, 3])        # noqa: E702
    yy = torch.arange(H, dtype=torch.float32)[None, :, None] + 0.5
    xx = torch.arange(W, dtype=torch.float32)[None, None, :] + 0.5
    d = ((yy - cy[:, None, None]) / ay[:, None, None]) ** 2 + ((xx - cx[:, None, None]) / ax[:, None, None]) ** 2
    return (d <= 1.0).to(torch.float32)


def make_fine(x: torch.Tensor, scale: int = MIRAM_SCALE) -> torch.Tensor:
    """BENCHMARK-ONLY stand-in for MIRAM's fine target: ``x`` upsampled ``scale`` x (bilinear).

    Training takes the fine image from the *source* pixels (``MIMDataset(fine_scale=2)``);
    an upsampled input only has the right shape and cost, which is all a timing needs.
    """
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)


def example_batch(config: Mapping[str, Any], *, seed: int = 0) -> torch.Tensor:
    """Float32 CPU images ``[B, C, H, W]`` in [0, 1] for a bench config."""
    cfg = check_config(config)
    H, W = img_hw(cfg)
    g = torch.Generator().manual_seed(seed)
    return torch.rand(cfg["batch_size"], cfg["in_chans"], H, W, generator=g)


# ====================================================================== the step
@dataclass
class _Settings:
    device: torch.device
    amp: torch.dtype | None


class BenchStep:
    """One training step of the production code path; see :func:`make_step`.

    Attributes: ``config`` (the checked bench config), ``model`` (the MIM model),
    ``optimizer`` (AdamW from ``training.optim.build_optimizer``), ``device``.
    """

    def __init__(self, config: Mapping[str, Any], *, device: str | torch.device = "cpu",
                 amp: str | None = None, seed: int = 0) -> None:
        from .models import build_model
        from .training.optim import build_optimizer

        self.config = check_config(config)
        self.model_config = model_config(self.config)
        dev = torch.device(device)
        if amp not in (None, "off", "bf16", "fp16"):
            raise ConfigError(f"amp must be off, bf16 or fp16, got {amp!r}")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp or "off")
        if dtype is torch.float16 and dev.type != "cuda":
            raise ConfigError("amp=fp16 needs CUDA (use bf16 on the CPU)")
        configure_backend(dev)            # as the training loop does (training.runtime.prepare_device)
        self._s = _Settings(dev, dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(self.model_config)
        self.model = model.to(dev).train()
        self.optimizer = build_optimizer(self.model, lr=float(self.config["lr"]),
                                         weight_decay=float(self.config["weight_decay"]), betas=BETAS)
        self.scaler = torch.amp.GradScaler("cuda") if dtype is torch.float16 else None
        self.generator = torch.Generator().manual_seed(seed + 1)   # masks: CPU generator, as in training
        self._region_px: torch.Tensor | None = None
        # The training loop's opt-in torch.compile (PretrainConfig.compile), training forward only.
        self.train_forward: Any = self.model
        if self.config["compile"]:
            from .training.runtime import CompiledForward

            self.train_forward = CompiledForward(self.model)

    @property
    def device(self) -> torch.device:
        return self._s.device

    @property
    def amp(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self._s.amp, "off")

    def coverage(self, batch_size: int, region: torch.Tensor | None = None) -> torch.Tensor:
        """Per-patch region coverage ``[B, gh, gw]`` as the training loop computes it.

        ``region`` may be a pixel mask ``[B, H, W]`` (converted with ``patch_coverage``,
        as the loop does for every batch), coverage ``[B, gh, gw]`` / ``[B, L]``, or None
        (the :func:`default_region` ellipse for every sample).
        """
        from .masking import patch_coverage

        p = self.model.patch_size
        gh, gw = self.model.grid
        if region is None:
            if self._region_px is None or self._region_px.shape[0] != batch_size:
                self._region_px = default_region(self.model_config.img_size).expand(batch_size, -1, -1).contiguous()
            region = self._region_px
        if region.dim() == 2:                      # one mask for the whole batch
            region = region.expand(batch_size, -1, -1)
        if tuple(region.shape[-2:]) == tuple(self.model_config.img_size) and region.dim() == 3:
            return patch_coverage(region.float(), p)
        if tuple(region.shape) in ((batch_size, gh, gw), (batch_size, gh * gw)):
            return region.float()
        raise ConfigError(f"region must be a pixel mask [B, H, W] or coverage [B, {gh}, {gw}], "
                          f"got {tuple(region.shape)}")

    def mask(self, batch_size: int, region: torch.Tensor | None = None) -> torch.Tensor:
        """The step's mask: ``model.make_mask`` on the CPU generator (training loop's way)."""
        strategy = self.config["strategy"]
        cov = self.coverage(batch_size, region) if strategy == "region" else None
        return self.model.make_mask(strategy, batch_size, float(self.config["mask_ratio"]), region=cov,
                                    generator=self.generator)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, fine: torch.Tensor | None = None, *,
                model: Callable[..., Any] | None = None):
        images = x.to(self.device, non_blocking=True)
        if self.config["method"] == "miram":
            fine = make_fine(x, self.model_config.miram_scale) if fine is None else fine
            fine = fine.to(self.device, non_blocking=True)
        else:
            fine = None
        ctx = (torch.autocast(self.device.type, dtype=self._s.amp) if self._s.amp is not None
               else contextlib.nullcontext())
        with ctx:
            return (model or self.model)(images, mask, fine=fine)

    def __call__(self, x: torch.Tensor, region: torch.Tensor | None = None, *,
                 fine: torch.Tensor | None = None) -> torch.Tensor:
        """Forward, loss, backward, AdamW step, zero_grad; the loss, detached, 0-d."""
        mask = self.mask(x.shape[0], region)
        out = self.forward(x, mask, fine, model=self.train_forward)
        loss = out.loss.float()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    @torch.inference_mode()
    def reconstruct(self, x: torch.Tensor, region: torch.Tensor | None = None, *,
                    fine: torch.Tensor | None = None):
        """Inference: forward + ``model.render`` in eval mode (what ``reconstruct`` and the GUI do)."""
        self.model.eval()
        try:
            out = self.forward(x, self.mask(x.shape[0], region), fine)
            return self.model.render(out, x.to(self.device))
        finally:
            self.model.train()


def make_step(config: Mapping[str, Any], *, device: str | torch.device = "cpu", amp: str | None = None,
              seed: int = 0) -> BenchStep:
    """A callable ``step_fn(x, region=None, *, fine=None) -> loss`` (detached 0-d tensor).

    ``config`` has exactly the keys ``img_size, patch_size, in_chans, embed_dim, depth,
    num_heads, decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio,
    mask_ratio, batch_size, norm_pix_loss, lr, weight_decay`` plus optional ``method``
    (``mae`` | ``simmim`` | ``miram``, default ``mae``), ``strategy`` (``random`` |
    ``block`` | ``region``, default ``random``) and ``compile`` (default false: the
    training loop's opt-in ``torch.compile`` of the forward, eager fallback on failure;
    the first call then compiles, 40-60 s on 2 CPU cores).  Each call does one full
    training step of the production code path at the constant learning rate ``lr``.

    ``x`` is a float32 CPU tensor ``[B, C, H, W]`` (moved to ``device`` like the
    loop moves batches).  ``region`` is only used by ``strategy="region"``: a pixel
    mask ``[B, H, W]`` or patch coverage ``[B, gh, gw]``; None uses a fixed central
    ellipse (:func:`default_region`).  ``fine`` is MIRAM's fine image ``[B, C, 2H, 2W]``;
    None synthesises one by upsampling ``x`` (benchmark only, see :func:`make_fine`).

    Keyword options beyond the config keys: ``device``, ``amp`` (``bf16`` autocast
    of the forward as the training loop does on CUDA; off by default) and ``seed``.
    """
    return BenchStep(config, device=device, amp=amp, seed=seed)


# ====================================================================== lightly's MAE
def lightly_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("lightly")
    except Exception:
        return None


class LightlyMAEStep:
    """lightly's MAE (its ``benchmarks/imagenet/vitb16/mae.py`` of lightly 1.6) as a step.

    Same timm ViT and sizes as ours; lightly's ``MaskedVisionTransformerTIMM``
    encoder, ``MaskedVisionTransformerDecoderTIMM`` decoder with a linear embed and
    prediction head (masked tokens only), ``utils.random_token_mask``, per-patch
    normalised targets (``utils.normalize_mean_var``) when ``norm_pix_loss``, MSE, and
    its AdamW set-up (``get_weight_decay_parameters``, betas 0.9/0.95) at constant lr.
    """

    def __init__(self, config: Mapping[str, Any], *, device: str | torch.device = "cpu", amp: str | None = None,
                 seed: int = 0) -> None:
        import timm

        try:
            from lightly.models import utils as lutils
            from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConfigError(f"lightly is not installed ({exc}); pip install 'mim-workbench[bench]'") from None
        cfg = check_config(config)
        if cfg["method"] != "mae" or cfg["strategy"] != "random":
            raise ConfigError("lightly's peer step is MAE with random masking only")
        H, W = img_hw(cfg)
        if H != W:
            raise ConfigError(f"lightly's MAE needs a square image (its sin-cos positions assume a square grid), "
                              f"got {H}x{W}")
        self.config = cfg
        self.device = torch.device(device)
        if amp not in (None, "off", "bf16"):
            raise ConfigError(f"lightly's peer step supports amp off or bf16, got {amp!r}")
        self.amp = amp or "off"
        self._u = lutils
        p, C = int(cfg["patch_size"]), int(cfg["in_chans"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vit = timm.create_model(BASE_MODEL, pretrained=False, img_size=img_hw(cfg), in_chans=C, num_classes=0,
                                    patch_size=p, embed_dim=int(cfg["embed_dim"]), depth=int(cfg["depth"]),
                                    num_heads=int(cfg["num_heads"]), mlp_ratio=float(cfg["mlp_ratio"]))
            self.backbone = MaskedVisionTransformerTIMM(vit=vit)
            dd = int(cfg["decoder_embed_dim"])
            self.decoder_embed = torch.nn.Linear(vit.embed_dim, dd)
            self.decoder = MaskedVisionTransformerDecoderTIMM(
                num_patches=vit.patch_embed.num_patches, embed_dim=dd, depth=int(cfg["decoder_depth"]),
                num_heads=int(cfg["decoder_num_heads"]), num_prefix_tokens=vit.num_prefix_tokens,
                mlp_ratio=float(cfg["mlp_ratio"]), proj_drop_rate=0.0, attn_drop_rate=0.0)
            self.prediction_head = torch.nn.Linear(dd, p * p * C)
        self.modules = torch.nn.ModuleList([self.backbone, self.decoder_embed, self.decoder,
                                            self.prediction_head]).to(self.device).train()
        self.patch_size = p
        self.sequence_length = self.backbone.sequence_length
        params, no_wd = lutils.get_weight_decay_parameters([self.backbone, self.decoder_embed, self.decoder,
                                                            self.prediction_head])
        self.optimizer = torch.optim.AdamW(
            [{"name": "mae", "params": params},
             {"name": "mae_no_weight_decay", "params": no_wd, "weight_decay": 0.0}],
            lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]), betas=BETAS)

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        u = self._u
        B = images.shape[0]
        idx_keep, idx_mask = u.random_token_mask(size=(B, self.sequence_length),
                                                 mask_ratio=float(self.config["mask_ratio"]), device=images.device)
        features = self.backbone.encode(images=images, idx_keep=idx_keep)
        x_decode = self.decoder_embed(features)
        x_masked = x_decode.new_zeros(B, self.sequence_length, x_decode.shape[-1])
        x_masked = u.set_at_index(x_masked, idx_keep, x_decode.type_as(x_masked))
        x_decoded = self.decoder(x_masked, idx_mask=idx_mask)
        pred = self.prediction_head(u.get_at_index(x_decoded, idx_mask))
        target = u.get_at_index(u.patchify(images, self.patch_size), idx_mask - 1)
        if self.config["norm_pix_loss"]:
            target = u.normalize_mean_var(target, dim=-1)
        return F.mse_loss(pred, target)

    def __call__(self, x: torch.Tensor, region: torch.Tensor | None = None, *,
                 fine: torch.Tensor | None = None) -> torch.Tensor:
        images = x.to(self.device, non_blocking=True)
        if self.amp == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                loss = self.loss(images)
        else:
            loss = self.loss(images)
        loss = loss.float()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.detach()


def make_lightly_step(config: Mapping[str, Any], *, device: str | torch.device = "cpu",
                      amp: str | None = None, seed: int = 0) -> LightlyMAEStep:
    """lightly's MAE step at ``config`` (``method="mae"``, ``strategy="random"``).

    ``amp="bf16"`` wraps its forward and loss in the same autocast our step uses.
    """
    return LightlyMAEStep(config, device=device, amp=amp, seed=seed)


# ====================================================================== FLOPs
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
    be missing from the count.
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
    """FLOPs torch's FlopCounterMode sees while ``fn()`` runs (CPU attention included)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=flop_formulas()) as counter:
        fn()
    return int(counter.get_total_flops())


def useful_flops(config: Mapping[str, Any]) -> float:
    """Useful FLOPs of one training step: matmuls + attention, forward + backward.

    The reference convention: the patch embedding counted over all patches (as the
    reference implementations compute it), the encoder on the visible tokens plus
    the class token (MAE, MIRAM) or on every token (SimMIM), MAE's decoder on every
    position with its head on the masked tokens only; MIRAM adds its fine head on
    the masked tokens, SimMIM its 1x1-conv head.  Reproduces the reference 46.5 / 48.6
    GFLOP at the reference configuration to within 0.2 %.  Statistics heads and
    elementwise work are not counted.  Backward is 2x forward, except for the
    patch embedding (weight gradient only: its input is the image).
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
        linear = 2 * n * d * (3 * d + d + 2 * r * d)      # qkv, proj, fc1 + fc2
        attention = 4 * n * n * d                         # QK^T and PV over all heads
        return depth * (linear + attention)

    patch_embed = 2 * L * P * D
    if cfg["method"] == "simmim":
        fwd = patch_embed + blocks(L + 1, D, int(cfg["depth"])) + 2 * L * D * P
    else:
        fwd = (patch_embed + blocks(V + 1, D, int(cfg["depth"])) + 2 * (V + 1) * D * Dd
               + blocks(L + 1, Dd, int(cfg["decoder_depth"])) + 2 * M * Dd * P)
        if cfg["method"] == "miram":
            fp = MIRAM_SCALE * p
            fwd += 2 * M * Dd * (2 * Dd) + 2 * M * (2 * Dd) * (fp * fp * C)
    # backward = 2x forward, except the patch embedding: its input (pixels) needs no gradient
    return (3.0 * fwd - patch_embed) * int(cfg["batch_size"])


def reference_useful_flops(config: Mapping[str, Any]) -> tuple[float, str]:
    """(useful FLOPs, source): the quoted constant at the reference config, else :func:`useful_flops`."""
    cfg = check_config(config)
    base = {k: cfg[k] for k in REQUIRED_KEYS if k not in ("lr", "weight_decay", "in_chans")}
    ref = {k: REFERENCE_CONFIG[k] for k in base}
    base["img_size"], ref["img_size"] = img_hw(cfg), img_hw(REFERENCE_CONFIG)
    if cfg["method"] == "mae" and base == ref and cfg["in_chans"] in REFERENCE_USEFUL_FLOPS:
        return REFERENCE_USEFUL_FLOPS[cfg["in_chans"]], "issue"
    return useful_flops(cfg), "analytic"


# ====================================================================== timing helpers
def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def gemm_rate(n: int = 2048, *, reps: int = 7, warmup: int = 2, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> list[float]:
    """GFLOP/s of ``torch.mm`` on ``n x n`` matrices, one sample per repetition."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dev, dtype)
    b = torch.randn(n, n, generator=g).to(dev, dtype)
    c = torch.empty(n, n, device=dev, dtype=dtype)
    for _ in range(warmup):
        torch.mm(a, b, out=c)
    _sync(dev)
    rates = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        _sync(dev)
        rates.append(2.0 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return rates


def time_interleaved(fns: Mapping[str, Callable[[], Any]], *, reps: int, warmup: int = 2,
                     device: str | torch.device | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function, run round-robin (A B C A B C ...) after ``warmup`` rounds.

    Interleaving spreads the machine's load changes evenly over the contenders, so
    ratios between them stay meaningful on a shared machine.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t)
    return times


def summarise(samples: Sequence[float]) -> dict[str, float]:
    """Median, min and quartiles of timing samples (seconds)."""
    s = sorted(samples)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0], s[0], s[0]]
    return {"median": statistics.median(s), "min": s[0], "q1": q[0], "q3": q[2], "n": len(s)}


def _ratio_ci(a: Sequence[float], b: Sequence[float], *, rounds: int = 5) -> dict[str, float]:
    """Ratio median(b)/median(a) overall and per consecutive block of paired samples.

    The per-block spread (min..max over ``rounds`` blocks of interleaved samples)
    shows how stable the ratio is while the machine's load changes.
    """
    n = min(len(a), len(b))
    per = []
    k = max(1, n // rounds)
    for i in range(0, n - k + 1, k):
        per.append(statistics.median(b[i:i + k]) / statistics.median(a[i:i + k]))
    return {"ratio": statistics.median(b) / statistics.median(a), "blocks": per,
            "ratio_min": min(per), "ratio_max": max(per)}


# ====================================================================== masking / data / inference
def time_masking(strategy: str, *, batch_size: int = 256, img_size: int = 224, patch_size: int = 16,
                 ratio: float = 0.75, reps: int = 30) -> dict[str, float]:
    """Milliseconds to mask a batch on the CPU (median), the way the training loop does it.

    ``region``: ``coverage_ms`` is ``patch_coverage`` of per-sample pixel masks
    ``[B, H, W]`` (what the loop computes from the batch), ``mask_ms`` the strategy
    itself from that coverage, ``total_ms`` both.
    """
    from .masking import make_mask, patch_coverage

    grid = (img_size // patch_size, img_size // patch_size)
    g = torch.Generator().manual_seed(0)
    opts: dict[str, Any] = {}
    if strategy == "block":
        opts = {"patch_size": patch_size, "mask_patch_size": patch_size * max(1, round(MASK_CELL_PX / patch_size))}
    px = random_regions(batch_size, img_size) if strategy == "region" else None
    cov_t: list[float] = []
    mask_t: list[float] = []
    for i in range(reps + 2):
        t0 = time.perf_counter()
        cov = patch_coverage(px, patch_size) if px is not None else None
        t1 = time.perf_counter()
        make_mask(strategy, batch_size, grid, ratio, region=cov, generator=g, **opts)
        t2 = time.perf_counter()
        if i >= 2:
            cov_t.append(t1 - t0)
            mask_t.append(t2 - t1)
    out = {"mask_ms": 1e3 * statistics.median(mask_t)}
    if px is not None:
        out["coverage_ms"] = 1e3 * statistics.median(cov_t)
        out["total_ms"] = 1e3 * statistics.median([a + b for a, b in zip(cov_t, mask_t)])
    else:
        out["total_ms"] = out["mask_ms"]
    return out


def default_data_root() -> tuple[Path, Path | None]:
    """(images, masks) for the data benchmark: ``../shared/data`` chest X-rays, else the sample data."""
    env = os.environ.get("MIM_SHARED_DATA")
    repo = Path(__file__).resolve().parents[1]
    shared = Path(env) if env else repo.parent / "shared" / "data"
    cxr = shared / "cxr_covid_v7labs"
    if (cxr / "images").is_dir():
        masks = cxr / "masks_v7labs"
        return cxr / "images", masks if masks.is_dir() else None
    from .sample import sample_root

    root = sample_root()
    return root / "images", (root / "masks") if (root / "masks").is_dir() else None


def time_data_pipeline(images: str | Path | None = None, masks: str | Path | None = None, *,
                       img_size: int = 224, in_chans: int = 1, batch_size: int = 16, workers: Sequence[int] = (0, 2),
                       max_images: int | None = None, augment: bool = True,
                       cache_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Images/s of ``MIMDataset`` + ``DataLoader`` (the training loop's pipeline).

    ``cold``: every image decoded and letterboxed (a first epoch without cache);
    ``cached``: from a filled :class:`~mim_workbench.io.cache.DecodeCache` (``--cache``),
    augmentation still applied per item.  One record per (mode, workers).
    """
    from torch.utils.data import DataLoader

    from .io.cache import DecodeCache
    from .io.datasets import MIMDataset, discover

    if images is None:
        images, masks = default_data_root()
    index = discover(images, masks=masks)
    samples = list(index.samples)[: max_images] if max_images else list(index.samples)
    if not samples:
        raise ConfigError(f"{images}: no images for the data benchmark")
    own_tmp = None
    if cache_dir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="mim-bench-cache-")
        cache_dir = own_tmp.name
    records = []
    try:
        cache = DecodeCache(cache_dir)
        common = dict(img_size=(img_size, img_size), in_chans=in_chans, augment=augment, seed=0)
        for mode in ("cold", "cached"):
            ds = MIMDataset(samples, cache=cache if mode == "cached" else None, **common)
            if mode == "cached":
                for i in range(len(ds)):  # fill the cache (a first epoch with --cache)
                    ds[i]
            for w in workers:
                loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=w, drop_last=False)
                t = time.perf_counter()
                n = 0
                for batch in loader:
                    n += batch["image"].shape[0]
                dt = time.perf_counter() - t
                records.append({"mode": mode, "workers": w, "images": n, "seconds": dt,
                                "images_per_s": n / dt if dt > 0 else float("inf")})
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()
    return records


def time_inference(step: BenchStep, x: torch.Tensor, *, reps: int, warmup: int = 1,
                   fine: torch.Tensor | None = None) -> list[float]:
    """Seconds per batch of ``step.reconstruct`` (forward + render under inference_mode)."""
    for _ in range(warmup):
        step.reconstruct(x, fine=fine)
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        step.reconstruct(x, fine=fine)
        _sync(step.device)
        out.append(time.perf_counter() - t)
    return out


# ====================================================================== the whole run
@dataclass
class BenchOptions:
    """What ``run_bench`` measures; the CLI fills it from its flags."""

    methods: Sequence[str] = METHODS
    strategies: Sequence[str] = ("random", "region")
    channels: Sequence[int] = (1, 3)
    config: Mapping[str, Any] | None = None          # overrides of REFERENCE_CONFIG
    reps: int = 20
    warmup: int = 3
    gemm_n: int = 2048
    gemm_reps: int = 7
    peer: bool = True
    device: str = "cpu"
    amp: str | None = None
    extra_amp: Sequence[str] = ("bf16",)          # also time mae/random (ours and lightly) in these
    compile: bool = False                         # also time our mae/random with torch.compile, in each precision
    threads: int | None = None
    data: str | None = None
    masks: str | None = None
    data_workers: Sequence[int] = (0, 2)
    data_max_images: int | None = None
    mask_batch: int = 256
    mask_reps: int = 30
    inference_reps: int = 5
    sections: Sequence[str] = ("gemm", "step", "masking", "data", "inference")

    @classmethod
    def quick(cls, **overrides: Any) -> BenchOptions:
        """Few repetitions everywhere (for tests and smoke runs)."""
        values: dict[str, Any] = dict(reps=3, warmup=1, gemm_n=512, gemm_reps=3, data_workers=(0,),
                                      data_max_images=8, mask_reps=3, inference_reps=1)
        values.update(overrides)
        return cls(**values)


def cpu_idle_fraction(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs' time spent idle over ``seconds`` (Linux ``/proc/stat``), else None.

    Recorded before and after a run: on a shared machine, other processes' load is
    the largest source of noise (and of OpenMP stalls) in CPU timings.
    """
    def snap() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            v = [int(t) for t in fh.readline().split()[1:]]
        return sum(v[:8]), v[3] + v[4]

    try:
        t1, i1 = snap()
        time.sleep(seconds)
        t2, i2 = snap()
    except (OSError, ValueError, IndexError):
        return None
    return (i2 - i1) / max(1, t2 - t1)


def machine_record(device: str = "cpu") -> dict[str, Any]:
    """Machine, versions and load: the header of every bench run."""
    import timm

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    rec: dict[str, Any] = {
        "record": "machine", "cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "timm": timm.__version__, "lightly": lightly_version(),
        "python": platform.python_version(), "device": device,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_idle": cpu_idle_fraction(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "malloc": allocator_state(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        rec["gpu"] = torch.cuda.get_device_name()
    return rec


@dataclass
class _Contender:
    impl: str
    method: str
    strategy: str
    amp: str
    fn: Any
    compiled: bool = False

    @staticmethod
    def make_key(impl: str, method: str, strategy: str, amp: str, compiled: bool = False) -> str:
        return f"{impl}:{method}/{strategy}@{amp}" + ("+compile" if compiled else "")

    @property
    def key(self) -> str:
        return self.make_key(self.impl, self.method, self.strategy, self.amp, self.compiled)


def bf16_supported(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 runs natively: CUDA bf16, or a CPU with AVX512-BF16 / AMX (the training loop's check)."""
    from .training.runtime import cpu_bf16_support

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_bf16_support()[0]


def _loss_ok(v: torch.Tensor) -> bool:
    return bool(torch.isfinite(v).item())


def run_bench(options: BenchOptions | None = None) -> Iterator[dict[str, Any]]:
    """Yield the bench's JSON-able records in order (see ``benchmarks/README.md``)."""
    opt = options or BenchOptions()
    # As training does (threads, allocator), before anything is timed; the peer runs in
    # this process too, so it gets the same allocator.
    dev = prepare_device(opt.device, threads=int(opt.threads) if opt.threads else None)
    base = {**REFERENCE_CONFIG, **(opt.config or {})}
    for m in opt.methods:
        if m not in METHODS:
            raise ConfigError(f"unknown method {m!r} (valid: {', '.join(METHODS)})")
    for s in opt.strategies:
        if s not in STRATEGIES:
            raise ConfigError(f"unknown strategy {s!r} (valid: {', '.join(STRATEGIES)})")
    yield machine_record(opt.device)

    gemm_samples: list[float] = []

    def measure_gemm(when: str) -> dict[str, Any]:
        rates = gemm_rate(opt.gemm_n, reps=opt.gemm_reps, device=dev)
        gemm_samples.extend(rates)
        return {"record": "gemm", "when": when, "n": opt.gemm_n, "dtype": "float32",
                "gflops": statistics.median(rates), "gflops_max": max(rates), "samples": rates}

    if "gemm" in opt.sections or "step" in opt.sections:
        yield measure_gemm("start")

    step_rows: dict[tuple[str, str, str, int, str], dict[str, Any]] = {}
    compiled_rows: dict[tuple[int, str], dict[str, Any]] = {}
    main_amp = opt.amp or "off"
    extra_amps = [a for a in opt.extra_amp if a != main_amp and bf16_supported(dev)] if "step" in opt.sections else []
    if "step" in opt.sections:
        for chans in opt.channels:
            cfg_c = {**base, "in_chans": chans}
            contenders: list[_Contender] = []
            for method in opt.methods:
                for strategy in opt.strategies:
                    cfg_m = {**cfg_c, "method": method, "strategy": strategy}
                    contenders.append(_Contender("mim_workbench", method, strategy, main_amp,
                                                 make_step(cfg_m, device=dev, amp=opt.amp)))
            has_mae = "mae" in opt.methods and "random" in opt.strategies
            for amp in extra_amps if has_mae else []:
                contenders.append(_Contender("mim_workbench", "mae", "random", amp,
                                             make_step({**cfg_c, "method": "mae"}, device=dev, amp=amp)))
            # torch.compile (opt-in in training): compiled during the warm-up rounds, 40-60 s each on 2 cores
            for amp in [main_amp, *extra_amps] if (has_mae and opt.compile) else []:
                contenders.append(_Contender("mim_workbench", "mae", "random", amp, make_step(
                    {**cfg_c, "method": "mae", "compile": True}, device=dev, amp=None if amp == "off" else amp),
                    compiled=True))
            peer_error = None
            if opt.peer and "mae" in opt.methods:
                for amp in [main_amp, *extra_amps]:
                    try:
                        contenders.append(_Contender("lightly", "mae", "random", amp, make_lightly_step(
                            {**cfg_c, "method": "mae", "strategy": "random"}, device=dev, amp=amp)))
                    except ConfigError as exc:
                        peer_error = str(exc)
                        break
            x = example_batch(cfg_c)
            fine = make_fine(x)
            losses: dict[str, torch.Tensor] = {}

            def caller(c: _Contender) -> Callable[[], Any]:
                def call() -> None:
                    losses[c.key] = c.fn(x, fine=fine)
                return call

            times = time_interleaved({c.key: caller(c) for c in contenders}, reps=opt.reps,
                                     warmup=opt.warmup, device=dev)
            gemm_rec = measure_gemm(f"after steps, {chans} channel(s)")
            gemm = statistics.median(gemm_samples)
            flops_of: dict[str, int] = {}
            for c in contenders:
                st = summarise(times[c.key])
                cfg_m = {**cfg_c, "method": c.method, "strategy": c.strategy}
                twin = _Contender.make_key(c.impl, c.method, c.strategy, c.amp)
                # A compiled step computes what its eager twin does; counting inside compiled
                # graphs would only risk a recompile under the counter's dispatch mode.
                flops = flops_of[twin] if c.compiled and twin in flops_of else count_flops(lambda c=c: c.fn(x, fine=fine))
                flops_of.setdefault(c.key, flops)
                useful, source = reference_useful_flops(cfg_m)
                row = {
                    "record": "step", "impl": c.impl, "method": c.method, "strategy": c.strategy, "in_chans": chans,
                    "batch_size": int(cfg_c["batch_size"]), "amp": c.amp, "compile": c.compiled,
                    "step_s": st["median"], "step_s_min": st["min"], "step_s_q1": st["q1"], "step_s_q3": st["q3"],
                    "reps": st["n"], "images_per_s": cfg_c["batch_size"] / st["median"],
                    "model_flops": flops, "useful_flops": useful, "useful_flops_source": source,
                    "achieved_gflops": useful / st["median"] / 1e9, "gemm_gflops": gemm,
                    "efficiency": useful / st["median"] / (gemm * 1e9),
                    "loss": float(losses[c.key]), "loss_finite": _loss_ok(losses[c.key]),
                }
                if c.compiled:
                    row["compile_active"] = bool(getattr(c.fn.train_forward, "active", False))
                    compiled_rows[(chans, c.amp)] = row
                else:
                    step_rows[(c.impl, c.method, c.strategy, chans, c.amp)] = row
                yield row
            if peer_error is not None:
                yield {"record": "peer", "impl": "lightly", "in_chans": chans, "error": peer_error}
            pairs = [(a, a) for a in [main_amp, *extra_amps]] + [(a, main_amp) for a in extra_amps]
            pairs = [(o, p, comp) for comp in ((False, True) if opt.compile else (False,)) for o, p in pairs]
            for ours_amp, peer_amp, ours_compiled in pairs:
                ours_t = times.get(_Contender.make_key("mim_workbench", "mae", "random", ours_amp, ours_compiled))
                peer_t = times.get(_Contender.make_key("lightly", "mae", "random", peer_amp))
                if ours_t is None or peer_t is None:
                    continue
                r = _ratio_ci(ours_t, peer_t)
                yield {"record": "compare", "in_chans": chans, "ours": "mae/random", "ours_amp": ours_amp,
                       "ours_compile": ours_compiled,
                       "peer": "lightly", "peer_version": lightly_version(), "peer_amp": peer_amp, "measured": True,
                       "speedup": r["ratio"], "speedup_blocks": r["blocks"],
                       "speedup_min": r["ratio_min"], "speedup_max": r["ratio_max"],
                       "ours_step_s": statistics.median(ours_t), "peer_step_s": statistics.median(peer_t)}
            at_reference = reference_useful_flops({**cfg_c, "method": "mae"})[1] == "issue"
            for amp in [main_amp, *extra_amps]:
                ours_t = times.get(_Contender.make_key("mim_workbench", "mae", "random", amp))
                if ours_t is None or not at_reference:
                    continue
                ours_s = statistics.median(ours_t)
                for peer, (lo, hi) in REFERENCE_PEER_STEP_S.items():
                    yield {"record": "compare", "in_chans": chans, "ours": "mae/random", "ours_amp": amp,
                           "peer": peer, "peer_amp": "off", "measured": False, "peer_step_s": [lo, hi],
                           "ours_step_s": ours_s, "speedup": [lo / ours_s, hi / ours_s],
                           "note": "peer time quoted by the issue for an idle 2-core machine, not measured here"}
            yield gemm_rec
            del contenders
            gc.collect()

    if "masking" in opt.sections:
        for strategy in opt.strategies:
            ms = time_masking(strategy, batch_size=opt.mask_batch, img_size=img_hw(base)[0],
                              patch_size=int(base["patch_size"]), ratio=float(base["mask_ratio"]), reps=opt.mask_reps)
            rec = {"record": "masking", "strategy": strategy, "batch_size": opt.mask_batch, **ms}
            # share of a training step: masking the step's own batch
            small = time_masking(strategy, batch_size=int(base["batch_size"]), img_size=img_hw(base)[0],
                                 patch_size=int(base["patch_size"]), ratio=float(base["mask_ratio"]),
                                 reps=opt.mask_reps)
            row = step_rows.get(("mim_workbench", "mae", strategy, opt.channels[0] if opt.channels else 1, main_amp))
            rec["step_batch_ms"] = small["total_ms"]
            if row is not None:
                rec["share_of_step"] = small["total_ms"] / 1e3 / row["step_s"]
            yield rec

    model_ips = None
    c0 = opt.channels[0] if opt.channels else 1
    first = step_rows.get(("mim_workbench", "mae", "random", c0, main_amp))
    if first is not None:
        model_ips = first["images_per_s"]
    # The pipeline must keep up with the fastest way we train, not only the default one.
    ours_mae = [r for k, r in step_rows.items() if k[:4] == ("mim_workbench", "mae", "random", c0)]
    ours_mae += [r for (ch, _), r in compiled_rows.items() if ch == c0]
    fastest = max(ours_mae, key=lambda r: r["images_per_s"], default=None)

    if "data" in opt.sections:
        try:
            recs = time_data_pipeline(opt.data, opt.masks, img_size=img_hw(base)[0],
                                      in_chans=int(opt.channels[0] if opt.channels else base["in_chans"]),
                                      batch_size=int(base["batch_size"]), workers=opt.data_workers,
                                      max_images=opt.data_max_images)
            src = opt.data or str(default_data_root()[0])
            for r in recs:
                r = {"record": "data", "source": src, **r, "model_images_per_s": model_ips}
                if model_ips:
                    r["ratio_to_model"] = r["images_per_s"] / model_ips
                if fastest is not None:
                    r["fastest_model"] = {"amp": fastest["amp"], "compile": fastest.get("compile", False)}
                    r["fastest_model_images_per_s"] = fastest["images_per_s"]
                    r["ratio_to_fastest_model"] = r["images_per_s"] / fastest["images_per_s"]
                yield r
        except Exception as exc:  # the bench goes on; the record says why
            yield {"record": "data", "error": f"{type(exc).__name__}: {exc}"}

    if "inference" in opt.sections:
        chans = opt.channels[0] if opt.channels else int(base["in_chans"])
        for method in opt.methods:
            cfg_m = {**base, "in_chans": chans, "method": method, "strategy": "random"}
            step = make_step(cfg_m, device=dev, amp=opt.amp)
            x = example_batch(cfg_m)
            fine = make_fine(x) if method == "miram" else None
            t = time_inference(step, x, reps=opt.inference_reps, fine=fine)
            s = summarise(t)
            yield {"record": "inference", "method": method, "in_chans": chans, "batch_size": x.shape[0],
                   "batch_s": s["median"], "images_per_s": x.shape[0] / s["median"]}

    yield {"record": "end", "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
           "cpu_idle": cpu_idle_fraction(),
           "gemm_gflops": statistics.median(gemm_samples) if gemm_samples else None}


def write_jsonl(records: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    with open(path, "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")


__all__ = [
    "BETAS", "BenchOptions", "BenchStep", "LightlyMAEStep", "REFERENCE_CONFIG", "REFERENCE_USEFUL_FLOPS",
    "REQUIRED_KEYS", "check_config", "count_flops", "default_region", "example_batch", "flop_formulas",
    "gemm_rate", "make_fine", "make_lightly_step", "make_step", "model_config", "reference_useful_flops",
    "run_bench", "time_data_pipeline", "time_inference", "time_interleaved", "time_masking", "useful_flops",
]
