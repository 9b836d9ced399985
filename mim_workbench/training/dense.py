"""Dense head from painted strokes: paint a few images, get per-class probability maps.

    strokes = [simulate_strokes({"caries": m}, fraction=0.02, seed=i) for i, m in enumerate(masks)]
    head = train_dense(images, strokes, checkpoint="runs/pretrain", classes=["caries", "other"])
    pred = head.predict(new_image)             # pred.probs [K, H, W], pred.labels [H, W] (1..K)
    head.save("runs/dense")                    # ckpt-<step>/ of kind "dense"; DenseHead.load(...)

A stroke image is a label array of the image's shape: 0 = unlabelled, 1..K = the
classes.  The loss is computed on stroke pixels only (class-balanced by stroke
pixel counts), so a handful of thin strokes per image is enough.

**Images of any size.**  The encoder sees inputs of its training size
``img_size``; two ways to get there (``DenseConfig.mode``):

``tile`` (default)
    the image is resized by ``scale`` (1.0 = native resolution; 0.5 halves it)
    to the *working* image, covered by tiles of ``img_size`` overlapping by
    ``overlap`` pixels (a multiple of the patch size, default a quarter tile),
    padded with 0 at the bottom/right edge; patch features of overlapping tiles
    are averaged.  Detail is kept, cost grows with the area.
``letterbox``
    the whole image is letterboxed into ``img_size`` (aspect kept, see
    :mod:`mim_workbench.io.letterbox`), one encoder pass; the working image is
    that canvas.  Cheap and global, but small structures shrink with the image.

The encoder is frozen: its patch features are computed once per image.  The
head (:class:`~mim_workbench.models.dense_head.DenseHeadNet`) is a per-patch
linear classifier whose logits are upsampled bilinearly to the working pixels,
plus (``refine``) a few dilated convolutions on the upsampled logits, projected
features and *image channels* (the working image, z-scored over its content,
and Gaussian-smoothed copies at ``blur_sigmas`` working pixels).  Training
samples ``crop`` x ``crop`` windows centred near stroke pixels of a class drawn
uniformly.  Probabilities are computed at the working resolution and resized
bilinearly to the source image.

Note what drives the result: with ``refine`` the image channels alone can
separate classes that differ in brightness or local texture, whatever the
encoder; ``use_features=False`` trains that image-only head, and ``refine=False``
a features-only head, which is how the benchmarks tell them apart.
"""

from __future__ import annotations

import dataclasses
import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError, MimError, check_known_keys
from .control import Control, NullControl
from .events import CheckpointSaved, EventHandler, Failed, Finished, Progress, Started, null_handler

DENSE_KIND = "dense"
MODES = ("tile", "letterbox")
_PREDICT_WINDOW = 256   # working pixels per side of one refinement window at prediction


@dataclass
class DenseConfig:
    """Settings of :func:`train_dense` (sizes in working-image pixels)."""

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
        d = dataclasses.asdict(self)
        d["dilations"] = list(self.dilations)
        d["blur_sigmas"] = list(self.blur_sigmas)
        return d

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DenseConfig:
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
class _Prepared:
    source_shape: tuple[int, int]
    content: tuple[int, int]          # (h, w) of the working image at the canvas's top-left
    image: torch.Tensor               # [C, Hc, Wc] image channels (0 on padding)
    grid: torch.Tensor | None         # [D, Hc/p, Wc/p] encoder patch features


# ====================================================================== image helpers
def as_image(image: Any) -> np.ndarray:
    """Path / LoadedImage / array -> float32 ``(H, W)`` or ``(H, W, C)`` in [0, 1]."""
    from ..inference.reconstruct import _as_unit_array

    return _as_unit_array(image)


def read_strokes(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A stroke label image (PNG/TIFF label image or ``.npy``) as integer labels.

    Resampled nearest-neighbour to ``shape`` when it differs.  RGB(A) files are
    not label images: an error says so.
    """
    p = Path(path)
    if p.suffix.lower() == ".npy":
        arr = np.load(p, allow_pickle=False)
    else:
        from PIL import Image

        try:
            with Image.open(p) as im:
                if im.mode in ("RGB", "RGBA", "CMYK"):
                    raise ConfigError(f"{p}: strokes must be a label image (one channel of integers), not {im.mode}")
                arr = np.asarray(im)
        except OSError:
            import tifffile

            arr = tifffile.imread(p)
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ConfigError(f"{p}: strokes must be a 2-D label array, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(arr == np.round(arr)):
            raise ConfigError(f"{p}: stroke labels must be integers")
    arr = arr.astype(np.int64)
    if arr.min() < 0:
        raise ConfigError(f"{p}: stroke labels must be >= 0")
    if shape is not None and tuple(arr.shape) != tuple(shape):
        from ..io.letterbox import resize_to

        arr = resize_to(arr.astype(np.int32), shape, order=0).astype(np.int64)
    return arr


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


def _window(t: torch.Tensor, r0: int, c0: int, h: int, w: int, fill: float) -> torch.Tensor:
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

    def __init__(self, encoder: Any, net: Any, model_config: Any, config: DenseConfig, classes: list[str],
                 *, encoder_info: dict[str, Any] | None = None, device: str | torch.device = "cpu") -> None:
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
        self.device = torch.device(device)
        self.encoder.to(self.device)
        self.net.to(self.device)
        return self

    @property
    def patch_size(self) -> int:
        from ..models.encoder import patch_size_of

        return patch_size_of(self.encoder)

    @property
    def img_size(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.encoder.patch_embed.img_size)  # type: ignore[return-value]

    # ------------------------------------------------------------------ features
    def _tile_origins(self, size: int, tile: int, stride: int) -> list[int]:
        if size <= tile:
            return [0]
        n = math.ceil((size - tile) / stride) + 1
        return [k * stride for k in range(n)]

    @torch.no_grad()
    def prepare(self, image: Any, *, norm: tuple[float, float] | None = None) -> _Prepared:
        """Working image, its channels and its encoder patch features (``norm``: see :func:`image_channels`)."""
        from ..inference.reconstruct import _channels
        from ..io.letterbox import letterbox, place, resize_to
        from ..models.classifier import encoder_tokens, patch_grid

        src = as_image(image)
        grey = src if src.ndim == 2 else src[..., :3].mean(axis=-1)
        H, W = src.shape[:2]
        th, tw = self.img_size
        p = self.patch_size
        cfg = self.config
        in_chans = self.model_config.in_chans
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
            x = torch.from_numpy(_channels(canvas, in_chans)).float()                  # [C, Hc, Wc]
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
        return _Prepared(source_shape=(H, W), content=tuple(content), image=img.to(self.device), grid=grid)

    def _window_logits(self, prep: _Prepared, r0: int, c0: int, h: int, w: int,
                       maps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``[1, K, h, w]`` of one window of the working canvas (differentiable), and
        the upsampled per-patch logits alone (None without features)."""
        from ..models.dense_head import upsample_window

        if maps is None and prep.grid is not None:
            maps = self.net.grid_maps(prep.grid[None])
        up = upsample_window(maps, self.patch_size, r0, c0, h, w) if maps is not None else None
        img = _window(prep.image, r0, c0, h, w, 0.0)[None]
        patch = up[:, :self.net.num_classes] if up is not None else None
        return self.net.forward_pixels(up, img), patch

    @torch.no_grad()
    def working_probs(self, prep: _Prepared) -> torch.Tensor:
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
                logits, _ = self._window_logits(prep, r - halo, c - halo, hh + 2 * halo, ww + 2 * halo, maps)
                out[:, r:r + hh, c:c + ww] = logits[0, :, halo:halo + hh, halo:halo + ww].softmax(0).float().cpu()
        return out

    @torch.no_grad()
    def predict(self, image: Any) -> DensePrediction:
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
        n = self.net
        return {"embed_dim": int(self.encoder.embed_dim), "num_classes": n.num_classes,
                "image_channels": n.image_channels, "feat_dim": self.config.feat_dim, "hidden": self.config.hidden,
                "dilations": list(n.dilations), "refine": n.refine, "use_features": n.use_features}

    def save(self, out_dir: str | Path, *, step: int | None = None, extra: dict[str, Any] | None = None) -> Path:
        """Write ``out_dir/ckpt-<step>/`` (kind "dense"): encoder + head weights, classes, settings."""
        from .checkpoint import save_checkpoint

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
    def load(cls, checkpoint: Any, *, device: str | torch.device = "cpu") -> DenseHead:
        """Rebuild a head saved by :meth:`save` (anything ``load_checkpoint`` accepts)."""
        from ..models import ModelConfig
        from ..models.dense_head import DenseHeadNet
        from ..models.encoder import create_encoder
        from .checkpoint import Checkpoint, load_checkpoint

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


# ====================================================================== training
def _class_names(cfg: DenseConfig, n_labels: int) -> list[str]:
    if cfg.classes is not None:
        if len(cfg.classes) < n_labels:
            raise ConfigError(f"strokes use labels up to {n_labels} but only {len(cfg.classes)} class names "
                              f"were given ({', '.join(cfg.classes)})")
        return list(cfg.classes)
    return [f"class {k}" for k in range(1, n_labels + 1)]


def _stroke_canvas(strokes: np.ndarray, prep: _Prepared, canvas_shape: tuple[int, int]) -> torch.Tensor:
    """Stroke labels on the working canvas: class index 0..K-1, -1 unlabelled."""
    from ..io.letterbox import place, resize_to

    lab = strokes
    if tuple(lab.shape) != tuple(prep.content):
        lab = resize_to(lab.astype(np.int32), prep.content, order=0)
    canvas = place(lab.astype(np.int64), canvas_shape)
    return torch.from_numpy(canvas - 1)


def train_dense(images: list[Any], strokes: list[Any], *, checkpoint: Any = None,
                model_config: Any = None, config: DenseConfig | None = None, out: str | Path | None = None,
                on_event: EventHandler | None = None, control: Control | None = None,
                **overrides: Any) -> DenseHead:
    """Train a dense head on stroke-labelled images (see the module docstring).

    Args:
        images: paths or arrays (any size; grey or RGB).
        strokes: label arrays or label-image paths, one per image (0 = unlabelled, 1..K).
        checkpoint: the encoder: a checkpoint, an exported encoder, or None/"random"
            (then ``model_config`` says which architecture; see
            :func:`mim_workbench.training.encoder_source.load_encoder`).
        config: :class:`DenseConfig`; keyword ``overrides`` replace its fields.
        out: when given, the trained head is saved there (``ckpt-<steps>/``).
        on_event / control: the training events and stop/pause control of ``pretrain``.
    """
    emit = on_event or null_handler
    control = control or NullControl()
    cfg = dataclasses.replace(config or DenseConfig(), **overrides) if overrides else (config or DenseConfig())
    try:
        return _train_dense(images, strokes, checkpoint, model_config, cfg, out, emit, control)
    except BaseException as exc:
        msg = "interrupted" if isinstance(exc, KeyboardInterrupt) else (
            str(exc) if isinstance(exc, MimError) else f"{type(exc).__name__}: {exc}")
        try:
            emit(Failed(message=msg, run_dir=str(out) if out else None,
                        traceback=None if isinstance(exc, (MimError, KeyboardInterrupt)) else traceback.format_exc()))
        except Exception:
            pass
        raise


def _train_dense(images: list[Any], strokes: list[Any], checkpoint: Any, model_config: Any, cfg: DenseConfig,
                 out: str | Path | None, emit: EventHandler, control: Control) -> DenseHead:
    from ..models.dense_head import DenseHeadNet
    from .encoder_source import load_encoder
    from .optim import build_optimizer, lr_at, set_lr
    from .runtime import prepare_device

    if len(images) != len(strokes):
        raise ConfigError(f"{len(images)} images but {len(strokes)} stroke images")
    if not images:
        raise ConfigError("no images to train the dense head on")
    device = prepare_device(cfg.device, threads=cfg.threads)
    torch.manual_seed(cfg.seed)
    loaded = load_encoder(checkpoint, model_config=model_config)
    labels_np = []
    for img, st in zip(images, strokes):
        src_shape = as_image(img).shape[:2] if isinstance(st, (str, Path)) else None
        arr = read_strokes(st, src_shape) if isinstance(st, (str, Path)) else np.asarray(st).astype(np.int64)
        labels_np.append(arr)
    n_labels = max(int(a.max()) for a in labels_np)
    if n_labels < 1:
        raise ConfigError("the strokes are empty: paint at least two classes")
    classes = _class_names(cfg, n_labels)
    K = len(classes)
    net = DenseHeadNet(loaded.encoder.embed_dim, K, image_channels=1 + len(cfg.blur_sigmas), feat_dim=cfg.feat_dim,
                       hidden=cfg.hidden, dilations=cfg.dilations, refine=cfg.refine, use_features=cfg.use_features)
    head = DenseHead(loaded.encoder, net, loaded.model_config, cfg, classes, encoder_info=loaded.describe(),
                     device=device)
    head.notes += loaded.notes
    t_setup = time.perf_counter()
    preps, targets = [], []
    for i, (img, lab) in enumerate(zip(images, labels_np)):
        prep = head.prepare(img)
        if tuple(lab.shape) != tuple(prep.source_shape):
            raise ConfigError(f"strokes {i} have shape {lab.shape}, image {i} has {prep.source_shape}")
        preps.append(prep)
        targets.append(_stroke_canvas(lab, prep, tuple(prep.image.shape[-2:])).to(device))
    # Stroke pixels of each class over all images: (image, row, col).
    where: list[np.ndarray] = []
    counts = np.zeros(K, dtype=np.int64)
    for k in range(K):
        rows = [np.concatenate([np.full((int(n.shape[0]), 1), i), n], axis=1)
                for i, t in enumerate(targets) if (n := (t == k).nonzero().cpu().numpy()).shape[0]]
        where.append(np.concatenate(rows) if rows else np.zeros((0, 3), dtype=np.int64))
        counts[k] = len(where[-1])
    present = [k for k in range(K) if counts[k] > 0]
    if len(present) < 2:
        raise ConfigError(f"strokes of at least two classes are needed, found {len(present)} "
                          f"({', '.join(classes[k] for k in present) or 'none'})")
    missing = [classes[k] for k in range(K) if counts[k] == 0]
    if missing:
        head.notes.append(f"no strokes for {', '.join(missing)}: never predicted with confidence")
    weight = None
    if cfg.class_balance:
        w = np.where(counts > 0, counts.sum() / (len(present) * np.maximum(counts, 1)), 0.0)
        weight = torch.tensor(w, dtype=torch.float32, device=device)
    optimizer = build_optimizer(net, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    rng = np.random.default_rng(cfg.seed)
    n_params = sum(p.numel() for p in net.parameters())
    setup_s = time.perf_counter() - t_setup
    emit(Started(run_dir=str(out or ""), config={**cfg.to_dict(), "task": "dense", "classes": classes},
                 total_steps=cfg.steps, device=str(device), steps_per_epoch=cfg.steps, n_train=len(images),
                 n_params=n_params, lr=cfg.lr, stop_at=cfg.steps,
                 notes=tuple(head.notes + [f"features of {len(images)} image(s) in {setup_s:.1f} s"])))
    crop = cfg.crop
    t_active, step_s = 0.0, None
    reason = "completed"
    net.train()
    step = 0
    for step in range(1, cfg.steps + 1):
        if control.pause_requested() and not control.stop_requested():
            while control.pause_requested() and not control.stop_requested():
                time.sleep(0.05)
        if control.stop_requested():
            reason, step = "stopped", step - 1
            break
        if cfg.time_budget_s is not None and t_active >= cfg.time_budget_s:
            reason, step = "time_budget", step - 1
            break
        t0 = time.perf_counter()
        lr = lr_at(step - 1, total_steps=cfg.steps, warmup_steps=min(cfg.warmup_steps, cfg.steps), lr=cfg.lr)
        set_lr(optimizer, lr)
        logits, patch_logits, labs = [], [], []
        for _ in range(cfg.batch_size):
            k = present[int(rng.integers(len(present)))]
            i, r, c = where[k][int(rng.integers(len(where[k])))]
            jr, jc = rng.integers(-crop // 4, crop // 4 + 1, size=2)
            Hc, Wc = targets[i].shape
            r0 = int(np.clip(r - crop // 2 + jr, 0, max(0, Hc - crop)))
            c0 = int(np.clip(c - crop // 2 + jc, 0, max(0, Wc - crop)))
            win, patch = head._window_logits(preps[i], r0, c0, crop, crop)
            logits.append(win)
            if patch is not None:
                patch_logits.append(patch)
            labs.append(_window(targets[i], r0, c0, crop, crop, -1))
        target = torch.stack(labs)
        loss = F.cross_entropy(torch.cat(logits), target, weight=weight, ignore_index=-1)
        if cfg.refine and patch_logits and cfg.aux_weight > 0:
            # Deep supervision: the per-patch classifier must stand on its own too.
            loss = loss + cfg.aux_weight * F.cross_entropy(torch.cat(patch_logits), target, weight=weight,
                                                           ignore_index=-1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        dt = time.perf_counter() - t0
        t_active += dt
        step_s = dt if step_s is None else 0.8 * step_s + 0.2 * dt
        lv = float(loss.detach())
        head.history.append({"step": step, "loss": lv, "lr": lr, "elapsed_s": t_active})
        emit(Progress(step=step, total=cfg.steps, epoch=0, loss=lv, lr=lr,
                      images_per_s=cfg.batch_size / step_s if step_s else 0.0, eta_s=(cfg.steps - step) * step_s))
    net.eval()
    if out is not None:
        path = head.save(out, step=step)
        emit(CheckpointSaved(path=str(path), step=step))
    emit(Finished(run_dir=str(out or ""), step=step, last_checkpoint=head.checkpoint, reason=reason))
    return head


def predict_dense(head: DenseHead | Any, image: Any, *, device: str | torch.device = "cpu") -> DensePrediction:
    """Probability maps ``[K, H, W]`` of ``image``; ``head`` may be a DenseHead or a dense checkpoint."""
    if not isinstance(head, DenseHead):
        head = DenseHead.load(head, device=device)
    return head.predict(image)


__all__ = ["DENSE_KIND", "DenseConfig", "DenseHead", "DensePrediction", "image_channels", "predict_dense",
           "read_strokes", "train_dense"]
