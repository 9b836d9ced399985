"""Model settings: one JSON-safe dataclass that checkpoints and the CLI share.

Everything a checkpoint needs to rebuild the model lives here, so ``meta.json`` can
store ``cfg.to_dict()`` and ``ModelConfig.from_dict`` can restore it.  Values are
checked when the object is made (``__post_init__``) so a bad setting fails with a
:class:`ConfigError` naming it, not with a shape error deep inside timm.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import ConfigError, check_known_keys

METHODS = ("mae", "simmim", "miram")


def _pos_int(name: str, value: Any, *, optional: bool = False, minimum: int = 1) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _nonneg_float(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


@dataclass
class ModelConfig:
    """How to build a MIM model around a timm ViT.

    ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio`` override
    the timm model's own values when not None (tiny test models, custom widths).
    ``mask_patch_size`` is SimMIM's mask cell in pixels (the ``block`` strategy's
    option).  ``miram_scale`` is the fine/coarse resolution factor of MIRAM.
    ``learn_pos_embed`` False keeps the encoder's sin-cos position embedding fixed
    during pretraining, as MAE does (it is still exported as timm's ``pos_embed``).
    """

    model: str = "vit_tiny_patch16_224"
    img_size: tuple[int, int] = (224, 224)
    in_chans: int = 1
    method: str = "mae"
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    decoder_embed_dim: int = 128
    decoder_depth: int = 4
    decoder_num_heads: int = 4
    norm_pix_loss: bool = True
    stats_loss_weight: float = 0.1
    mask_patch_size: int = 32
    miram_scale: int = 2
    miram_coarse_weight: float = 1.0
    miram_fine_weight: float = 1.0
    drop_path_rate: float = 0.0
    learn_pos_embed: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"model must be a timm model name, got {self.model!r}")
        self.img_size = _normalise_img_size(self.img_size)
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r} (valid: {', '.join(METHODS)})")
        _pos_int("in_chans", self.in_chans)
        for name in ("patch_size", "embed_dim", "depth", "num_heads"):
            _pos_int(name, getattr(self, name), optional=True)
        if self.mlp_ratio is not None:
            self.mlp_ratio = _nonneg_float("mlp_ratio", self.mlp_ratio)
            if self.mlp_ratio == 0:
                raise ConfigError("mlp_ratio must be > 0, got 0")
        if self.embed_dim is not None and self.num_heads is not None and self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        _pos_int("decoder_embed_dim", self.decoder_embed_dim)
        _pos_int("decoder_depth", self.decoder_depth)
        _pos_int("decoder_num_heads", self.decoder_num_heads)
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ConfigError(
                f"decoder_embed_dim {self.decoder_embed_dim} is not divisible by "
                f"decoder_num_heads {self.decoder_num_heads}"
            )
        if not isinstance(self.norm_pix_loss, bool):
            raise ConfigError(f"norm_pix_loss must be true or false, got {self.norm_pix_loss!r}")
        if not isinstance(self.learn_pos_embed, bool):
            raise ConfigError(f"learn_pos_embed must be true or false, got {self.learn_pos_embed!r}")
        self.stats_loss_weight = _nonneg_float("stats_loss_weight", self.stats_loss_weight)
        _pos_int("mask_patch_size", self.mask_patch_size)
        _pos_int("miram_scale", self.miram_scale, minimum=2)
        self.miram_coarse_weight = _nonneg_float("miram_coarse_weight", self.miram_coarse_weight)
        self.miram_fine_weight = _nonneg_float("miram_fine_weight", self.miram_fine_weight)
        self.drop_path_rate = _nonneg_float("drop_path_rate", self.drop_path_rate)
        if self.drop_path_rate >= 1:
            raise ConfigError(f"drop_path_rate must be < 1, got {self.drop_path_rate!r}")
        if self.patch_size is not None:
            check_img_size(self.img_size, self.patch_size)

    # ----------------------------------------------------------------- timm
    def timm_overrides(self) -> dict[str, Any]:
        """Architecture keyword arguments passed to ``timm.create_model`` on top of the name."""
        out: dict[str, Any] = {}
        for name in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    # ----------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists)."""
        d = asdict(self)
        d["img_size"] = list(self.img_size)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ConfigError (they are typos or a newer schema)."""
        if not isinstance(data, dict):
            raise ConfigError(f"model config must be a mapping, got {type(data).__name__}")
        check_known_keys(cls, data, "model setting")
        return cls(**data)


def _normalise_img_size(value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    try:
        h, w = value
    except (TypeError, ValueError):
        raise ConfigError(f"img_size must be N or (H, W), got {value!r}") from None
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"img_size must be positive integers, got {value!r}")
    return int(h), int(w)


def check_img_size(img_size: tuple[int, int], patch_size: int) -> None:
    """Raise ConfigError unless both sides of ``img_size`` divide by ``patch_size``."""
    h, w = img_size
    if h % patch_size or w % patch_size:
        raise ConfigError(
            f"img_size {h}x{w} is not divisible by the patch size {patch_size}; "
            f"use a multiple of {patch_size} (e.g. {max(1, round(h / patch_size)) * patch_size}"
            f"x{max(1, round(w / patch_size)) * patch_size})"
        )
