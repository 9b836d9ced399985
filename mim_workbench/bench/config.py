"""The bench's configuration: the reference configuration, its checks, and example inputs.

A bench config is a flat mapping of model, masking and optimiser sizes (the keys of
:data:`REQUIRED_KEYS`, plus the optional :data:`OPTIONAL_KEYS`); every bench function
checks it with :func:`check_config` before use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..models import ModelConfig
from ..models.config import METHODS as MODEL_METHODS
from ..models.config import EncoderConfig

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
METHODS = MODEL_METHODS
STRATEGIES = ("random", "block", "blockwise", "region")
#: AdamW betas of the training loop's default (PretrainConfig.betas), MAE's values.
BETAS = (0.9, 0.95)
#: timm architecture the overrides apply to (class token, qkv bias, pre-norm blocks).
BASE_MODEL = "vit_tiny_patch16_224"
#: SimMIM's mask cell in pixels (rounded to a multiple of the patch size).
MASK_CELL_PX = 32
#: MIRAM's fine/coarse scale (ModelConfig.miram_scale default).
MIRAM_SCALE = 2


def check_choice(kind: str, value: str, valid: tuple[str, ...]) -> None:
    """Raise ConfigError unless ``value`` is one of ``valid`` (``kind`` names it in the message)."""
    if value not in valid:
        raise ConfigError(f"unknown {kind} {value!r} (valid: {', '.join(valid)})")


def check_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict: ``config`` with the optional keys filled in.

    Raises ConfigError for a non-mapping, unknown or missing keys, an unknown method
    or strategy, a non-bool ``compile``, ``in_chans`` other than 1 or 3, a
    ``batch_size`` that is not a positive int, ``mask_ratio`` outside (0, 1), or a
    negative / non-finite ``lr`` or ``weight_decay``.
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"bench config must be a mapping, got {type(config).__name__}")
    unknown = sorted(set(config) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise ConfigError(f"unknown bench config key(s): {', '.join(unknown)}")
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ConfigError(f"bench config is missing: {', '.join(missing)}")
    cfg = {**OPTIONAL_KEYS, **dict(config)}
    check_choice("method", cfg["method"], METHODS)
    check_choice("strategy", cfg["strategy"], STRATEGIES)
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
    """``(H, W)`` in pixels of ``config["img_size"]`` (an int for a square, or a pair)."""
    size = config["img_size"]
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def mask_patch_size(patch_size: int) -> int:
    """SimMIM's mask cell in pixels: :data:`MASK_CELL_PX` rounded to a multiple of ``patch_size`` (>= 1 patch)."""
    return patch_size * max(1, round(MASK_CELL_PX / patch_size))


def model_config(config: Mapping[str, Any]) -> ModelConfig:
    """The :class:`~mim_workbench.models.ModelConfig` a bench config describes; ConfigError as :func:`check_config`."""
    cfg = check_config(config)
    p = int(cfg["patch_size"])
    encoder = EncoderConfig(
        model=BASE_MODEL, img_size=img_hw(cfg), in_chans=int(cfg["in_chans"]), patch_size=p,
        embed_dim=int(cfg["embed_dim"]), depth=int(cfg["depth"]), num_heads=int(cfg["num_heads"]),
        mlp_ratio=float(cfg["mlp_ratio"]))
    return ModelConfig(
        encoder=encoder, method=cfg["method"], decoder_embed_dim=int(cfg["decoder_embed_dim"]),
        decoder_depth=int(cfg["decoder_depth"]), decoder_num_heads=int(cfg["decoder_num_heads"]),
        norm_pix_loss=bool(cfg["norm_pix_loss"]), mask_patch_size=mask_patch_size(p),
        miram_scale=MIRAM_SCALE,
    )


# ====================================================================== example inputs
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
    """Per-sample elliptical region masks, float32 ``[B, H, W]`` in {0, 1} (jittered centre and axes).

    Deterministic for a given ``seed``.
    """
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
    """BENCHMARK-ONLY stand-in for MIRAM's fine target: ``x`` ``[B, C, H, W]`` upsampled ``scale`` x (bilinear).

    Returns ``[B, C, scale*H, scale*W]``.  Training takes the fine image from the
    *source* pixels (``MIMDataset(fine_scale=2)``); an upsampled input only has the
    right shape and cost, which is all a timing needs.
    """
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)


def example_batch(config: Mapping[str, Any], *, seed: int = 0) -> torch.Tensor:
    """Float32 CPU images ``[B, C, H, W]`` in [0, 1) for a bench config (deterministic for ``seed``).

    ConfigError as :func:`check_config`.
    """
    cfg = check_config(config)
    H, W = img_hw(cfg)
    g = torch.Generator().manual_seed(seed)
    return torch.rand(cfg["batch_size"], cfg["in_chans"], H, W, generator=g)
