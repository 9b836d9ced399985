"""Dense head from painted strokes: paint a few images, get per-class probability maps.

    strokes = [simulate_strokes({"caries": m}, fraction=0.02, seed=i) for i, m in enumerate(masks)]
    head = train_dense(images, strokes, checkpoint="runs/pretrain", classes=["caries", "other"])
    pred = head.predict(new_image)             # pred.probs [K, H, W], pred.labels [H, W] (1..K)
    head.save("runs/dense")                    # ckpt-<step>/ of kind "dense"; DenseHead.load(...)

The head itself (:class:`~mim_workbench.models.dense.DenseHead`, with
:class:`~mim_workbench.models.dense.DenseConfig`) lives beside its network in
:mod:`mim_workbench.models`; this module trains it.

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
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, MimError
from ..models.checkpoint import Checkpoint
from ..models.config import ModelConfig
from ..models.dense import DenseConfig, DenseHead, DensePrediction, ImageLike, PreparedImage, as_image, crop_window
from ..models.dense_head import DenseHeadNet
from .control import Control, NullControl
from .encoder_source import LoadedEncoder, load_encoder
from .events import CheckpointSaved, EventHandler, Failed, Finished, Progress, Started, null_handler

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


# ====================================================================== training
def _class_names(cfg: DenseConfig, n_labels: int) -> list[str]:
    if cfg.classes is not None:
        if len(cfg.classes) < n_labels:
            raise ConfigError(f"strokes use labels up to {n_labels} but only {len(cfg.classes)} class names "
                              f"were given ({', '.join(cfg.classes)})")
        return list(cfg.classes)
    return [f"class {k}" for k in range(1, n_labels + 1)]


def _stroke_canvas(strokes: np.ndarray, prep: PreparedImage, canvas_shape: tuple[int, int]) -> torch.Tensor:
    """Stroke labels on the working canvas: class index 0..K-1, -1 unlabelled."""
    from ..io.letterbox import place, resize_to

    lab = strokes
    if tuple(lab.shape) != tuple(prep.content):
        lab = resize_to(lab.astype(np.int32), prep.content, order=0)
    canvas = place(lab.astype(np.int64), canvas_shape)
    return torch.from_numpy(canvas - 1)


def train_dense(images: list[ImageLike], strokes: list[np.ndarray | str | Path], *,
                checkpoint: str | Path | None = None, model_config: ModelConfig | dict[str, Any] | None = None,
                config: DenseConfig | None = None, out: str | Path | None = None,
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

    Returns:
        the trained head (``history``: one row per step; ``checkpoint``: where it was saved).

    Raises:
        ConfigError: image and stroke counts or shapes differ, no images, fewer than two
            painted classes, too few class names, or bad settings; CheckpointError: the
            encoder cannot be loaded.  A Failed event is emitted first.
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


@dataclass
class _StrokeData:
    """The training set of a dense head: per image its prepared features and its stroke labels on
    the working canvas (class 0..K-1, -1 unlabelled), and where each class was painted."""

    preps: list[PreparedImage]
    targets: list[torch.Tensor]
    where: list[np.ndarray]       # per class: stroke pixels as rows (image, row, col)
    present: list[int]            # classes with at least one stroke pixel
    weight: torch.Tensor | None   # class weights of the loss (None: unweighted)


def _train_dense(images: list[ImageLike], strokes: list[np.ndarray | str | Path], checkpoint: str | Path | None,
                 model_config: ModelConfig | dict[str, Any] | None, cfg: DenseConfig,
                 out: str | Path | None, emit: EventHandler, control: Control) -> DenseHead:
    from .optim import build_optimizer
    from .runtime import prepare_device

    if len(images) != len(strokes):
        raise ConfigError(f"{len(images)} images but {len(strokes)} stroke images")
    if not images:
        raise ConfigError("no images to train the dense head on")
    device = prepare_device(cfg.device, threads=cfg.threads)
    torch.manual_seed(cfg.seed)
    loaded = load_encoder(checkpoint, model_config=model_config)
    labels_np = _stroke_labels(images, strokes)
    head = _build_head(loaded, cfg, labels_np, device)
    t_setup = time.perf_counter()
    data = _stroke_data(head, images, labels_np, device)
    optimizer = build_optimizer(head.net, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    setup_s = time.perf_counter() - t_setup
    emit(Started(run_dir=str(out or ""), config={**cfg.to_dict(), "task": "dense", "classes": head.classes},
                 total_steps=cfg.steps, device=str(device), steps_per_epoch=cfg.steps, n_train=len(images),
                 n_params=sum(p.numel() for p in head.net.parameters()), lr=cfg.lr, stop_at=cfg.steps,
                 notes=tuple(head.notes + [f"features of {len(images)} image(s) in {setup_s:.1f} s"])))
    step, reason = _dense_steps(head, data, optimizer, cfg, emit, control)
    head.net.eval()
    if out is not None:
        path = head.save(out, step=step)
        emit(CheckpointSaved(path=str(path), step=step))
    emit(Finished(run_dir=str(out or ""), step=step, last_checkpoint=head.checkpoint, reason=reason))
    return head


def _stroke_labels(images: list[ImageLike], strokes: list[np.ndarray | str | Path]) -> list[np.ndarray]:
    """Each image's stroke labels as an int64 array (label images read at the image's shape)."""
    labels_np = []
    for img, st in zip(images, strokes):
        src_shape = as_image(img).shape[:2] if isinstance(st, (str, Path)) else None
        arr = read_strokes(st, src_shape) if isinstance(st, (str, Path)) else np.asarray(st).astype(np.int64)
        labels_np.append(arr)
    return labels_np


def _build_head(loaded: LoadedEncoder, cfg: DenseConfig, labels_np: list[np.ndarray], device: torch.device) -> DenseHead:
    """An untrained head on ``loaded``'s encoder with one class per stroke label.

    Raises ConfigError when no stroke is painted or class names are too few."""
    n_labels = max(int(a.max()) for a in labels_np)
    if n_labels < 1:
        raise ConfigError("the strokes are empty: paint at least two classes")
    classes = _class_names(cfg, n_labels)
    net = DenseHeadNet(loaded.encoder.embed_dim, len(classes), image_channels=1 + len(cfg.blur_sigmas),
                       feat_dim=cfg.feat_dim, hidden=cfg.hidden, dilations=cfg.dilations, refine=cfg.refine,
                       use_features=cfg.use_features)
    head = DenseHead(loaded.encoder, net, loaded.model_config, cfg, classes, encoder_info=loaded.describe(),
                     device=device)
    head.notes += loaded.notes
    return head


def _stroke_data(head: DenseHead, images: list[ImageLike], labels_np: list[np.ndarray],
                 device: torch.device) -> _StrokeData:
    """Encoder features and canvas labels of every image, and the stroke pixels of each class.

    Raises ConfigError when strokes and image shapes differ or fewer than two classes are painted."""
    cfg, classes = head.config, head.classes
    K = len(classes)
    preps, targets = [], []
    for i, (img, lab) in enumerate(zip(images, labels_np)):
        prep = head.prepare(img)
        if tuple(lab.shape) != tuple(prep.source_shape):
            raise ConfigError(f"strokes {i} have shape {lab.shape}, image {i} has {prep.source_shape}")
        preps.append(prep)
        targets.append(_stroke_canvas(lab, prep, tuple(prep.image.shape[-2:])).to(device))
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
    return _StrokeData(preps=preps, targets=targets, where=where, present=present, weight=weight)


def _dense_steps(head: DenseHead, data: _StrokeData, optimizer: torch.optim.Optimizer, cfg: DenseConfig,
                 emit: EventHandler, control: Control) -> tuple[int, str]:
    """Run the optimiser steps, a Progress event after each; returns (steps done, Finished's reason)."""
    from .optim import lr_at, set_lr

    rng = np.random.default_rng(cfg.seed)
    t_active, step_s = 0.0, None
    head.net.train()
    step = 0
    for step in range(1, cfg.steps + 1):
        if control.pause_requested() and not control.stop_requested():
            while control.pause_requested() and not control.stop_requested():
                time.sleep(0.05)
        if control.stop_requested():
            return step - 1, "stopped"
        if cfg.time_budget_s is not None and t_active >= cfg.time_budget_s:
            return step - 1, "time_budget"
        t0 = time.perf_counter()
        lr = lr_at(step - 1, total_steps=cfg.steps, warmup_steps=min(cfg.warmup_steps, cfg.steps), lr=cfg.lr)
        set_lr(optimizer, lr)
        loss = _crop_loss(head, data, rng, cfg)
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
    return step, "completed"


def _crop_loss(head: DenseHead, data: _StrokeData, rng: np.random.Generator, cfg: DenseConfig) -> torch.Tensor:
    """The loss of one batch of ``crop`` x ``crop`` windows centred near stroke pixels of a class
    drawn uniformly (stroke pixels only; with ``refine``, plus the per-patch classifier's loss)."""
    crop = cfg.crop
    logits, patch_logits, labs = [], [], []
    for _ in range(cfg.batch_size):
        k = data.present[int(rng.integers(len(data.present)))]
        i, r, c = data.where[k][int(rng.integers(len(data.where[k])))]
        jr, jc = rng.integers(-crop // 4, crop // 4 + 1, size=2)
        Hc, Wc = data.targets[i].shape
        r0 = int(np.clip(r - crop // 2 + jr, 0, max(0, Hc - crop)))
        c0 = int(np.clip(c - crop // 2 + jc, 0, max(0, Wc - crop)))
        win, patch = head.window_logits(data.preps[i], r0, c0, crop, crop)
        logits.append(win)
        if patch is not None:
            patch_logits.append(patch)
        labs.append(crop_window(data.targets[i], r0, c0, crop, crop, -1))
    target = torch.stack(labs)
    loss = F.cross_entropy(torch.cat(logits), target, weight=data.weight, ignore_index=-1)
    if cfg.refine and patch_logits and cfg.aux_weight > 0:
        # Deep supervision: the per-patch classifier must stand on its own too.
        loss = loss + cfg.aux_weight * F.cross_entropy(torch.cat(patch_logits), target, weight=data.weight,
                                                       ignore_index=-1)
    return loss


def predict_dense(head: DenseHead | str | Path | Checkpoint, image: ImageLike, *,
                  device: str | torch.device = "cpu") -> DensePrediction:
    """Probability maps ``[K, H, W]`` on ``image``'s grid; ``head`` may be a DenseHead or a dense
    checkpoint (loaded onto ``device``; CheckpointError when it is not one)."""
    if not isinstance(head, DenseHead):
        head = DenseHead.load(head, device=device)
    return head.predict(image)


__all__ = ["predict_dense", "read_strokes", "train_dense"]
