"""Model settings: one JSON-safe dataclass that checkpoints and the CLI share.

Everything a checkpoint needs to rebuild the model lives here, so ``meta.json`` can
store ``cfg.to_dict()`` and ``ModelConfig.from_dict`` can restore it.  Values are
checked when the object is made (``__post_init__``) so a bad setting fails with a
:class:`ConfigError` naming it, not with a shape error deep inside timm.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ConfigError, check_known_keys

METHODS = ("mae", "simmim", "miram", "beit", "feature")
#: image features: the class token, or the mean of the patch tokens
POOLS = ("token", "avg")
#: The mean of the patch tokens, for probes too: every MIM loss here scores patch tokens only,
#: so nothing trains the class token directly.  On the 20-minute CPU encoders the mean gives
#: BEiT 0.874 / 0.904 AUC at 1 % / 10 % labels where the class token gives 0.820 / 0.892, and
#: 0.861 against 0.662 with two labels of another hospital; MAE is the same within 0.006
#: (benchmarks/RESULTS.md).  BEiT's and data2vec's own probes pool the same way.
DEFAULT_POOL = "avg"


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


ENCODER_FIELDS = ("model", "img_size", "in_chans", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


@dataclass
class EncoderConfig:
    """The encoder's architecture: a timm ViT name, its input size and channels.

    ``patch_size``, ``embed_dim``, ``depth``, ``num_heads`` and ``mlp_ratio`` override the
    timm model's own values when not None (tiny test models, custom widths).  Every run
    config (pretraining, fine-tuning, a study) nests one of these; it is checked here once.
    """

    model: str = "vit_tiny_patch16_224"
    img_size: tuple[int, int] = (224, 224)
    in_chans: int = 1
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"model must be a timm model name, got {self.model!r}")
        self.img_size = parse_img_size(self.img_size)
        _pos_int("in_chans", self.in_chans)
        for name in ("patch_size", "embed_dim", "depth", "num_heads"):
            _pos_int(name, getattr(self, name), optional=True)
        if self.mlp_ratio is not None:
            self.mlp_ratio = _nonneg_float("mlp_ratio", self.mlp_ratio)
            if self.mlp_ratio == 0:
                raise ConfigError("mlp_ratio must be > 0, got 0")
        if self.embed_dim is not None and self.num_heads is not None and self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.patch_size is not None:
            check_img_size(self.img_size, self.patch_size)

    def timm_overrides(self) -> dict[str, Any]:
        """Architecture keyword arguments passed to ``timm.create_model`` on top of the name."""
        names = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (``img_size`` as a list)."""
        d = asdict(self)
        d["img_size"] = list(self.img_size)
        return d

    @classmethod
    def from_dict(cls, data: Any) -> EncoderConfig:
        """Inverse of :meth:`to_dict` (an ``EncoderConfig`` passes through); unknown keys raise ConfigError."""
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise ConfigError(f"encoder settings must be a mapping, got {type(data).__name__}")
        check_known_keys(cls, data, "encoder setting")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"invalid encoder settings: {exc}") from None


def nest_encoder_fields(values: dict[str, Any], keys: tuple[str, ...] = ENCODER_FIELDS) -> dict[str, Any]:
    """``values`` with its flat architecture ``keys`` (``model``, ``img_size``, ...) moved into ``encoder``.

    The CLI and settings files may spell them flat, as checkpoints of earlier versions do;
    a key given both ways is refused rather than silently picking one.
    """
    flat = {k: values[k] for k in keys if k in values}
    if not flat:
        return dict(values)
    out = {k: v for k, v in values.items() if k not in flat}
    nested = out.get("encoder")
    if isinstance(nested, EncoderConfig):
        nested = nested.to_dict()
    nested = dict(nested or {})
    both = sorted(set(flat) & set(nested))
    if both:
        raise ConfigError(f"{', '.join(both)} given both flat and under encoder: give each once")
    out["encoder"] = {**nested, **flat}
    return out


@dataclass
class ModelConfig:
    """How to build a MIM model around a timm ViT: the encoder plus the method's parts.

    ``mask_patch_size`` is SimMIM's mask cell in pixels (the ``block`` strategy's
    option).  ``miram_scale`` is the fine/coarse resolution factor of MIRAM.
    ``learn_pos_embed`` False keeps the encoder's sin-cos position embedding fixed
    during pretraining, as MAE does (it is still exported as timm's ``pos_embed``).
    ``codebook_size`` is the number of visual tokens of ``beit``'s tokenizer;
    ``feature_layers`` the teacher blocks whose outputs ``feature`` averages (None: the
    top half), ``ema_start`` and ``ema_end`` its teacher's momentum at the first and last step.
    """

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    method: str = "mae"
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
    codebook_size: int = 512
    feature_layers: int | None = None
    ema_start: float = 0.999
    ema_end: float = 0.9999

    def __post_init__(self) -> None:
        self.encoder = EncoderConfig.from_dict(self.encoder)
        _pos_int("codebook_size", self.codebook_size, minimum=2)
        _pos_int("feature_layers", self.feature_layers, optional=True)
        for name in ("ema_start", "ema_end"):
            value = _nonneg_float(name, getattr(self, name))
            if value >= 1:
                raise ConfigError(f"{name} must be a momentum in [0, 1), got {value!r}")
            setattr(self, name, value)
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r} (valid: {', '.join(METHODS)})")
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

    # ----------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict with the encoder nested under ``encoder``."""
        d = asdict(self)
        d["encoder"] = self.encoder.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`, also reading the flat spelling of older checkpoints;
        unknown keys raise ConfigError (they are typos or a newer schema)."""
        if not isinstance(data, dict):
            raise ConfigError(f"model config must be a mapping, got {type(data).__name__}")
        data = nest_encoder_fields(data)
        check_known_keys(cls, data, "model setting")
        return cls(**data)


def parse_img_size(value: Any) -> tuple[int, int]:
    """``224``, ``"224"``, ``"256x320"``, ``[256, 320]`` -> ``(H, W)``; anything else raises ConfigError."""
    try:
        if isinstance(value, str):
            nums = [int(part) for part in value.lower().replace("×", "x").split("x")]
            nums = nums * 2 if len(nums) == 1 else nums
        elif isinstance(value, int) and not isinstance(value, bool):
            nums = [value, value]
        elif any(isinstance(v, bool) for v in value):
            raise TypeError
        else:
            nums = [int(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"img_size={value!r}: use N or HxW (e.g. 224 or 256x320)") from None
    if len(nums) != 2 or min(nums) < 1:
        raise ConfigError(f"img_size={value!r}: use N or HxW with positive sizes")
    return nums[0], nums[1]


def check_img_size(img_size: tuple[int, int], patch_size: int) -> None:
    """Raise ConfigError unless both sides of ``img_size`` divide by ``patch_size``."""
    h, w = img_size
    if h % patch_size or w % patch_size:
        raise ConfigError(
            f"img_size {h}x{w} is not divisible by the patch size {patch_size}; "
            f"use a multiple of {patch_size} (e.g. {max(1, round(h / patch_size)) * patch_size}"
            f"x{max(1, round(w / patch_size)) * patch_size})"
        )
