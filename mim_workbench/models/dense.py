"""The dense head: a frozen encoder plus a trained :class:`~.dense_head.DenseHeadNet`.

:class:`DenseHead` turns an image of any size into per-class probability maps: it
prepares the *working* image (tiles of the encoder's ``img_size`` or one letterboxed
canvas, see :class:`DenseConfig`), computes the encoder's patch features once, and
runs the head window by window.  It is saved and loaded as a checkpoint of kind
``"dense"``.  Training it from painted strokes is
:func:`mim_workbench.training.dense.train_dense`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

from ..errors import CheckpointError, ConfigError, check_known_keys
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import ModelConfig
from .dense_head import DenseHeadNet, upsample_window
from .encoder import create_encoder, patch_size_of

if TYPE_CHECKING:
    from ..io.meta import LoadedImage

#: What the head reads as an image: a file path, a decoded image, or an array (grey or RGB).
ImageLike = Union[str, Path, np.ndarray, "LoadedImage"]


DENSE_KIND = "dense"
MODES = ("tile", "letterbox")
_PREDICT_WINDOW = 256   # working pixels per side of one refinement window at prediction


@dataclass
class DenseConfig:
    """Settings of a dense head and of :func:`~mim_workbench.training.dense.train_dense`
    (sizes in working-image pixels); saved with the head."""

    classes: list[str] | None = None       # names of labels 1..K (default "class 1", ...)
    mode: str = "tile"                     # "tile" | "letterbox"
    scale: float = 1.0                     # tile mode: working image = source resized by this
    overlap: int | None = None             # tile overlap (multiple of the patch size); None: a quarter tile
    refine: bool = True                    # conv refinement on upsampled features + image channels
    use_features: bool = True              # False: image channels only (baseline)
    feat_dim: int = 16
    hidden: int = 16
    dilations: tuple[int, ...] = (1, 2, 4)
    blur_sigmas: tuple[float, ...] = (2.0, 8.0)
    steps: int = 300
    batch_size: int = 8
    crop: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    aux_weight: float = 1.0                # loss on the per-patch logits alone (with refine)
    class_balance: bool = True
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    time_budget_s: float | None = None
    feature_batch: int = 16                # tiles per encoder forward pass

    def __post_init__(self) -> None:
        self.dilations = tuple(int(d) for d in self.dilations)
        self.blur_sigmas = tuple(float(s) for s in self.blur_sigmas)
        if self.classes is not None:
            self.classes = [str(c) for c in self.classes]
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r}: choose tile or letterbox")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ConfigError(f"scale={self.scale!r}: must be a positive number")
        if not (self.refine or self.use_features):
            raise ConfigError("refine=False needs use_features=True (nothing would be trained)")
        for name in ("steps", "batch_size", "crop", "feat_dim", "hidden", "feature_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r}: must be a positive integer")
        if self.overlap is not None and self.overlap < 0:
            raise ConfigError(f"overlap={self.overlap!r}: must be >= 0")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr!r}: must be positive")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings (tuples as lists), as :meth:`from_dict` reads them."""
        d = dataclasses.asdict(self)
        d["dilations"] = list(self.dilations)
        d["blur_sigmas"] = list(self.blur_sigmas)
        return d

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DenseConfig:
        """Settings from :meth:`to_dict`'s form; raises ConfigError for unknown keys or unusable values."""
        check_known_keys(cls, values, "dense setting")
        return cls(**values)


@dataclass
class DensePrediction:
    """Per-class probabilities ``[K, H, W]`` (float32, sum 1 per pixel) on the source grid."""

    probs: np.ndarray
    classes: list[str]

    @property
    def labels(self) -> np.ndarray:
        """``[H, W]`` argmax label, 1..K (uint8; uint16 above 255 classes)."""
        dtype = np.uint8 if len(self.classes) < 256 else np.uint16
        return (self.probs.argmax(axis=0) + 1).astype(dtype)

    def prob(self, cls: str | int) -> np.ndarray:
        """Probability map of a class given by name or label value (1..K)."""
        k = self.classes.index(cls) if isinstance(cls, str) else int(cls) - 1
        return self.probs[k]


@dataclass
class PreparedImage:
    """One image made ready for the head by :meth:`DenseHead.prepare` (tensors on the head's device)."""

    source_shape: tuple[int, int]
    content: tuple[int, int]          # (h, w) of the working image at the canvas's top-left
    image: torch.Tensor               # [C, Hc, Wc] image channels (0 on padding)
    grid: torch.Tensor | None         # [D, Hc/p, Wc/p] encoder patch features


# ====================================================================== image helpers
def as_image(image: ImageLike) -> np.ndarray:
    """Path / LoadedImage / array -> float32 ``(H, W)`` or ``(H, W, C)`` in [0, 1]."""
    from ..io.model_input import as_unit_array

    return as_unit_array(image)


def image_channels(work: np.ndarray, sigmas: tuple[float, ...],
                   norm: tuple[float, float] | None = None) -> np.ndarray:
    """``[1 + len(sigmas), h, w]``: the image z-scored over its pixels, and smoothed copies.

    ``norm`` = (mean, std) to z-score with instead: a tile of a large image must use
    the whole image's statistics, or every tile would be normalised differently.
    """
    from scipy.ndimage import gaussian_filter

    x = work.astype(np.float32)
    m, s = (float(x.mean()), float(x.std())) if norm is None else (float(norm[0]), float(norm[1]))
    z = (x - m) / (s if s > 1e-6 else 1.0)
    chans = [z] + [gaussian_filter(z, sigma=sg, mode="nearest") for sg in sigmas]
    return np.stack(chans).astype(np.float32)


def crop_window(t: torch.Tensor, r0: int, c0: int, h: int, w: int, fill: float) -> torch.Tensor:
    """``t[..., r0:r0+h, c0:c0+w]`` with ``fill`` outside ``t``."""
    H, W = t.shape[-2:]
    if r0 >= 0 and c0 >= 0 and r0 + h <= H and c0 + w <= W:
        return t[..., r0:r0 + h, c0:c0 + w]
    out = torch.full((*t.shape[:-2], h, w), fill, dtype=t.dtype, device=t.device)
    a0, a1 = max(0, r0), min(H, r0 + h)
    b0, b1 = max(0, c0), min(W, c0 + w)
    if a1 > a0 and b1 > b0:
        out[..., a0 - r0:a1 - r0, b0 - c0:b1 - c0] = t[..., a0:a1, b0:b1]
    return out


# ====================================================================== the head
class DenseHead:
    """A frozen encoder plus a trained :class:`DenseHeadNet`; predicts probability maps."""

    def __init__(self, encoder: VisionTransformer, net: DenseHeadNet, model_config: ModelConfig,
                 config: DenseConfig, classes: list[str], *, encoder_info: dict[str, Any] | None = None,
                 device: str | torch.device = "cpu") -> None:
        """Wrap ``encoder`` (frozen here: eval mode, no gradients) and ``net`` (``net.num_classes``
        == ``len(classes)``, the names of labels 1..K) and move both to ``device``.
        ``model_config`` describes the encoder and ``encoder_info`` where it came from; both are
        saved with the head."""
        self.encoder = encoder.eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.net = net
        self.model_config = model_config
        self.config = config
        self.classes = list(classes)
        self.encoder_info = dict(encoder_info or {})
        self.device = torch.device(device)
        self.history: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.checkpoint: str | None = None
        self.to(self.device)

    def to(self, device: str | torch.device) -> DenseHead:
        """Move encoder and head to ``device``; returns self."""
        self.device = torch.device(device)
        self.encoder.to(self.device)
        self.net.to(self.device)
        return self

    @property
    def patch_size(self) -> int:
        """The encoder's patch side in pixels."""
        return patch_size_of(self.encoder)

    @property
    def img_size(self) -> tuple[int, int]:
        """(height, width) in pixels of the encoder's input: one tile."""
        return tuple(int(v) for v in self.encoder.patch_embed.img_size)  # type: ignore[return-value]

    # ------------------------------------------------------------------ features
    def _tile_origins(self, size: int, tile: int, stride: int) -> list[int]:
        if size <= tile:
            return [0]
        n = math.ceil((size - tile) / stride) + 1
        return [k * stride for k in range(n)]

    @torch.no_grad()
    def prepare(self, image: ImageLike, *, norm: tuple[float, float] | None = None) -> PreparedImage:
        """Working image, its channels and its encoder patch features (``norm``: see :func:`image_channels`)."""
        from ..io.model_input import to_channels
        from ..io.letterbox import letterbox, place, resize_to
        from .classifier import patch_grid
        from .encoder import encoder_tokens

        src = as_image(image)
        grey = src if src.ndim == 2 else src[..., :3].mean(axis=-1)
        H, W = src.shape[:2]
        th, tw = self.img_size
        p = self.patch_size
        cfg = self.config
        in_chans = self.model_config.encoder.in_chans
        if cfg.mode == "letterbox":
            canvas, lb = letterbox(src, (th, tw), order=1)
            content = lb.content_shape
            work_grey = resize_to(grey, content, order=1) if content != (H, W) else grey
            tiles = [(0, 0)]
            Hc, Wc = th, tw
        else:
            content = (max(1, round(H * cfg.scale)), max(1, round(W * cfg.scale)))
            work = resize_to(src, content, order=1) if content != (H, W) else src
            work_grey = work if work.ndim == 2 else work[..., :3].mean(axis=-1)
            ov = cfg.overlap if cfg.overlap is not None else p * max(1, (min(th, tw) // p) // 4)
            ov = int(round(ov / p)) * p
            if ov >= min(th, tw):
                raise ConfigError(f"overlap={ov} must be smaller than the tile size {th}x{tw}")
            rows = self._tile_origins(content[0], th, th - ov)
            cols = self._tile_origins(content[1], tw, tw - ov)
            Hc, Wc = rows[-1] + th, cols[-1] + tw
            canvas = place(work, (Hc, Wc))
            tiles = [(r, c) for r in rows for c in cols]
        chans = image_channels(work_grey, cfg.blur_sigmas, norm)
        img = torch.from_numpy(place(np.moveaxis(chans, 0, -1), (Hc, Wc))).permute(2, 0, 1).contiguous()
        grid = None
        if cfg.use_features:
            x = torch.from_numpy(to_channels(canvas, in_chans)).float()                  # [C, Hc, Wc]
            D = self.encoder.embed_dim
            acc = torch.zeros(D, Hc // p, Wc // p)
            cnt = torch.zeros(1, Hc // p, Wc // p)
            for i in range(0, len(tiles), cfg.feature_batch):
                part = tiles[i:i + cfg.feature_batch]
                batch = torch.stack([x[:, r:r + th, c:c + tw] for r, c in part]).to(self.device)
                g = patch_grid(self.encoder, encoder_tokens(self.encoder, batch)).float().cpu()  # [b, D, gh, gw]
                for (r, c), gi in zip(part, g):
                    acc[:, r // p:(r + th) // p, c // p:(c + tw) // p] += gi
                    cnt[:, r // p:(r + th) // p, c // p:(c + tw) // p] += 1
            grid = (acc / cnt.clamp_min(1)).to(self.device)
        return PreparedImage(source_shape=(H, W), content=tuple(content), image=img.to(self.device), grid=grid)

    def window_logits(self, prep: PreparedImage, r0: int, c0: int, h: int, w: int,
                       maps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``[1, K, h, w]`` of one window of the working canvas (differentiable), and
        the upsampled per-patch logits alone (None without features)."""
        if maps is None and prep.grid is not None:
            maps = self.net.grid_maps(prep.grid[None])
        up = upsample_window(maps, self.patch_size, r0, c0, h, w) if maps is not None else None
        img = crop_window(prep.image, r0, c0, h, w, 0.0)[None]
        patch = up[:, :self.net.num_classes] if up is not None else None
        return self.net.forward_pixels(up, img), patch

    @torch.no_grad()
    def working_probs(self, prep: PreparedImage) -> torch.Tensor:
        """``[K, h, w]`` probabilities on the working image (content only), window by window."""
        h, w = prep.content
        K = len(self.classes)
        out = torch.empty(K, h, w)
        maps = self.net.grid_maps(prep.grid[None]) if prep.grid is not None else None
        halo = self.net.halo
        step = _PREDICT_WINDOW
        for r in range(0, h, step):
            for c in range(0, w, step):
                hh, ww = min(step, h - r), min(step, w - c)
                logits, _ = self.window_logits(prep, r - halo, c - halo, hh + 2 * halo, ww + 2 * halo, maps)
                out[:, r:r + hh, c:c + ww] = logits[0, :, halo:halo + hh, halo:halo + ww].softmax(0).float().cpu()
        return out

    @torch.no_grad()
    def predict(self, image: ImageLike) -> DensePrediction:
        """Class probabilities ``[K, H, W]`` on the source image's grid."""
        from ..io.letterbox import resize_to

        was = self.net.training
        self.net.eval()
        try:
            prep = self.prepare(image)
            probs = self.working_probs(prep).numpy()
        finally:
            self.net.train(was)
        H, W = prep.source_shape
        if probs.shape[1:] != (H, W):
            probs = np.stack([resize_to(pk, (H, W), order=1) for pk in probs])
            probs = np.clip(probs, 0.0, 1.0)
            probs /= np.maximum(probs.sum(axis=0, keepdims=True), 1e-12)
        return DensePrediction(probs=probs.astype(np.float32), classes=list(self.classes))

    # ------------------------------------------------------------------ persistence
    def net_spec(self) -> dict[str, Any]:
        """The :class:`DenseHeadNet` constructor's arguments (JSON-ready) that rebuild ``net``."""
        n = self.net
        return {"embed_dim": int(self.encoder.embed_dim), "num_classes": n.num_classes,
                "image_channels": n.image_channels, "feat_dim": self.config.feat_dim, "hidden": self.config.hidden,
                "dilations": list(n.dilations), "refine": n.refine, "use_features": n.use_features}

    def save(self, out_dir: str | Path, *, step: int | None = None, extra: dict[str, Any] | None = None) -> Path:
        """Write ``out_dir/ckpt-<step>/`` (kind "dense"): encoder + head weights, classes, settings.

        ``step`` defaults to the number of training steps in ``history``; ``extra`` is merged into
        the metadata.  Returns the checkpoint folder; raises CheckpointWriteError when the disk
        refuses."""
        state = {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}
        state.update({f"head.{k}": v for k, v in self.net.state_dict().items()})
        meta = {
            "kind": DENSE_KIND,
            "classes": list(self.classes),
            "config": self.config.to_dict(),
            "model_config": self.model_config.to_dict(),
            "head": self.net_spec(),
            "encoder_source": self.encoder_info,
            "metrics": {"loss": self.history[-1]["loss"] if self.history else None},
            **(extra or {}),
        }
        step = len(self.history) if step is None else int(step)
        path = save_checkpoint(out_dir, step, model_state=state, optimizer_state=None, meta=meta, keep=0)
        self.checkpoint = str(path)
        return path

    @classmethod
    def load(cls, checkpoint: str | Path | Checkpoint, *, device: str | torch.device = "cpu") -> DenseHead:
        """Rebuild a head saved by :meth:`save` (a loaded checkpoint or anything ``load_checkpoint``
        accepts), on ``device``.  Raises CheckpointError for a missing or unreadable checkpoint,
        one of another kind, or metadata and weights that do not fit together."""
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, kind=DENSE_KIND)
        if ckpt.kind != DENSE_KIND:
            raise CheckpointError(f"{ckpt.path}: a {ckpt.kind!r} checkpoint, expected a dense head")
        meta = ckpt.meta
        try:
            model_cfg = ModelConfig.from_dict(meta["model_config"])
            cfg = DenseConfig.from_dict(meta["config"])
            spec = dict(meta["head"])
            classes = list(meta["classes"])
        except (KeyError, TypeError, ConfigError) as exc:
            raise CheckpointError(f"{ckpt.path}: dense-head metadata is incomplete ({exc})") from None
        enc = create_encoder(model_cfg)
        net = DenseHeadNet(spec.pop("embed_dim"), spec.pop("num_classes"), dilations=tuple(spec.pop("dilations")),
                           **spec)
        state = ckpt.model_state()
        try:
            enc.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("encoder.")}, strict=True)
            net.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")}, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{ckpt.path}: weights do not fit the stored settings: {exc}") from None
        head = cls(enc, net.eval(), model_cfg, cfg, classes, encoder_info=meta.get("encoder_source"), device=device)
        head.checkpoint = str(ckpt.path)
        return head


__all__ = ["DENSE_KIND", "MODES", "DenseConfig", "DenseHead", "DensePrediction", "ImageLike", "PreparedImage",
           "as_image", "crop_window", "image_channels"]
