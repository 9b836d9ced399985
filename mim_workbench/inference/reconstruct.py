"""Reconstruct a masked X-ray with a pretrained model, and measure how well it did.

``reconstruct`` letterboxes the image to the model's training size (aspect kept,
padded bottom/right with 0, see :mod:`mim_workbench.io.letterbox`), masks it,
runs the model and returns 2-D pictures at that size plus the letterbox geometry
to map them back onto the source.

Metrics are computed in [0, 1] image space, only on pixels that are masked *and*
inside the letterboxed content (padding is not part of the image).  The baseline
fills every masked pixel with the mean of the visible content pixels: a model
that learned nothing about anatomy cannot beat it by much, so ``psnr`` >
``psnr_baseline`` is the sanity check that pretraining learned something. The harder
baseline, ``psnr_biharmonic``, fills the holes by biharmonic inpainting from the visible
pixels (scikit-image), a classical inpainter a useful model should beat.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch

from ..errors import ConfigError, ReaderError
from ..io.model_input import as_unit_array, to_channels
from ..io.meta import json_safe
from ..models.render import METHOD_PICTURES

if TYPE_CHECKING:
    from ..io.letterbox import Letterbox
    from ..io.meta import LoadedImage
    from ..models import MIMModel, MIMOutput, Rendered
    from ..models.checkpoint import Checkpoint

#: A checkpoint: its directory, a file inside it, a run directory, or a loaded ``Checkpoint``.
CheckpointLike = Union[str, Path, "Checkpoint"]
#: An image: a path, a ``LoadedImage``, or an array (H, W) / (H, W, C) in [0, 1] (integers are scaled).
ImageLike = Union[str, Path, "LoadedImage", np.ndarray]


@dataclass
class ReconstructionResult:
    """2-D float32 pictures ``[H, W]`` at the letterboxed training size."""

    image: np.ndarray               # the letterboxed input (grey)
    masked: np.ndarray              # input with masked patches shown as mid grey
    reconstruction: np.ndarray      # what the model produced
    recon_plus_visible: np.ndarray  # input with masked patches replaced by predictions
    error: np.ndarray               # squared error on masked content pixels, 0 elsewhere
    mask: np.ndarray                # bool, True on masked pixels
    content: np.ndarray             # bool, True inside the letterboxed content (not padding)
    letterbox: Letterbox            # canvas -> source mapping
    metrics: dict[str, Any] = field(default_factory=dict)
    fine_reconstruction: np.ndarray | None = None   # MIRAM's 2x head, [2H, 2W]
    tokens: np.ndarray | None = None                # BEiT: the true token map drawn through the codebook
    tokens_pred: np.ndarray | None = None           # BEiT: the predicted token map (visible patches: true)
    similarity: np.ndarray | None = None            # feature: cosine of predicted and teacher features

    def to_source(self, array: np.ndarray, *, order: int = 1) -> np.ndarray:
        """Map a canvas-sized picture back to the source image's shape."""
        return self.letterbox.restore(array, order=order)

    def save(self, out_dir: str | Path, *, extra: dict[str, Any] | None = None) -> list[Path]:
        """Write the pictures (PNG, letterbox padding cropped off) and ``metrics.json``.

        ``image.png``, ``masked.png``, ``reconstruction.png``, ``recon_plus_visible.png``
        (and BEiT's ``tokens.png``, ``tokens_pred.png``) are grey in [0, 1];
        ``similarity.png`` (latent targets) is the cosine on masked patches as a heat map; ``error.png`` is the squared error in a black-red-yellow
        heat map scaled to its 99th percentile on masked pixels (the scale is in
        ``metrics.json`` as ``error_png_scale``).  ``extra`` adds keys to the JSON.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        crop = self.letterbox.crop
        paths = []
        for name in ("image", "masked", "reconstruction", "recon_plus_visible", "tokens", "tokens_pred"):
            if getattr(self, name) is not None:
                paths.append(_write_grey(out / f"{name}.png", crop(getattr(self, name))))
        if self.similarity is not None:   # cosine in [-1, 1] on masked patches, 0 elsewhere
            paths.append(_write_rgb(out / "similarity.png", heat(np.clip(crop(self.similarity), 0.0, 1.0))))
        err = crop(self.error)
        on_mask = err[crop(self.mask)]
        scale = float(np.percentile(on_mask, 99)) if on_mask.size else 0.0
        paths.append(_write_rgb(out / "error.png", heat(err / scale if scale > 0 else err)))
        lb = self.letterbox
        record = {**self.metrics, **(extra or {}), "error_png_scale": scale,
                  "letterbox": {"source_shape": list(lb.source_shape), "size": list(lb.size),
                                "content_shape": list(lb.content_shape), "offset": list(lb.offset)}}
        (out / "metrics.json").write_text(json.dumps(json_safe(record), indent=2) + "\n", encoding="utf-8")
        paths.append(out / "metrics.json")
        return paths


# ====================================================================== loading
def model_from_checkpoint(checkpoint: CheckpointLike,
                          device: str | torch.device = "cpu") -> tuple[MIMModel, Checkpoint]:
    """(model in eval mode on ``device``, Checkpoint) from anything ``load_checkpoint`` accepts.

    Raises :class:`~mim_workbench.errors.CheckpointError` when the checkpoint stores no
    model configuration or its weights do not fit it.
    """
    from ..models import ModelConfig, build_model
    from ..models.checkpoint import Checkpoint, load_checkpoint

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    if ckpt.is_legacy or not ckpt.model_config:
        from ..errors import CheckpointError

        raise CheckpointError(f"{ckpt.path}: no model configuration stored; it cannot be rebuilt on its own")
    model = build_model(ModelConfig.from_dict(ckpt.model_config))
    model.load_weights(ckpt.model_state(), str(ckpt.path))
    return model.to(torch.device(device)).eval(), ckpt


# ====================================================================== mask settings
def load_model(checkpoint_or_model: CheckpointLike | MIMModel,
               device: str | torch.device = "cpu") -> tuple[MIMModel, dict[str, Any]]:
    """(model, its training settings): a model as given (settings ``{}``), else built from a checkpoint.

    A checkpoint's model comes back in eval mode on ``device``; raises
    :class:`~mim_workbench.errors.CheckpointError` when it cannot be rebuilt.
    """
    from ..models import MIMModel

    if isinstance(checkpoint_or_model, MIMModel):
        return checkpoint_or_model, {}
    model, ckpt = model_from_checkpoint(checkpoint_or_model, device)
    return model, dict(ckpt.config or {})


def mask_settings(method: str, train_cfg: dict[str, Any], strategy: str | None,
                  ratio: float | None) -> tuple[str, float]:
    """(strategy, ratio): those given, else the training's, else ``method``'s defaults.

    Raises :class:`~mim_workbench.errors.ConfigError` unless ``0 < ratio < 1``.
    """
    from ..training.config import method_defaults

    default = method_defaults(method)
    strategy = strategy or train_cfg.get("strategy") or default["strategy"]
    ratio = float(ratio if ratio is not None else (train_cfg.get("ratio") or default["ratio"]))
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"ratio={ratio!r}: must be a fraction strictly between 0 and 1")
    return strategy, ratio


def mask_options(train_cfg: dict[str, Any], strategy: str) -> dict[str, Any]:
    """The training's mask options that ``strategy`` takes (the others would be rejected)."""
    opts = dict(train_cfg.get("mask_options") or {})
    opts = {k: v for k, v in opts.items() if strategy == "region" or k not in ("min_overlap", "ratio_of")}
    if strategy != "block":
        opts.pop("mask_patch_size", None)
    return opts


# ====================================================================== main entry
@torch.no_grad()
def reconstruct(
    checkpoint_or_model: CheckpointLike | MIMModel,
    image: ImageLike,
    *,
    region_mask: str | Path | np.ndarray | None = None,
    strategy: str | None = None,
    ratio: float | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> ReconstructionResult:
    """Mask ``image``, reconstruct it with the model, and score the reconstruction.

    Args:
        checkpoint_or_model: a checkpoint (directory, file inside it, run directory,
            or a loaded ``Checkpoint``) or a ``MIMModel``.
        image: path, ``LoadedImage`` or array in [0, 1] (integer arrays are scaled).
        region_mask: organ mask (path or array of the image's shape) for the
            ``region`` strategy; without one that strategy falls back to random
            masking, with a note in ``metrics["notes"]``.
        strategy, ratio: default to the checkpoint's training settings.
        seed: seeds the mask, so a result is reproducible.
    Returns:
        pictures ``[H, W]`` at the model's training size and the metrics.
    Raises:
        ConfigError: a ratio outside (0, 1), an image that is not 2-D / 3-D or not finite,
            or an array smaller than one patch; ReaderError: an unreadable or too small file.
    """
    model, train_cfg = load_model(checkpoint_or_model, device)
    strategy, ratio = mask_settings(model.cfg.method, train_cfg, strategy, ratio)
    src = _source(image, model.patch_size)
    dev = next(model.parameters()).device
    x, fine, content, lb = _model_inputs(src, model, dev)
    mask, strategy, notes = _draw_mask(model, train_cfg, strategy, ratio, region_mask, src.shape[:2], seed)
    out, r = _forward(model, x, mask, fine)
    result = _result(x, r, content, lb, out.losses)
    result.metrics.update({"ratio": ratio, "strategy": strategy, "seed": int(seed),
                           "masked_fraction": float(mask.float().mean()), "notes": notes})
    return result


def _source(image: ImageLike, patch_size: int) -> np.ndarray:
    """The image as a unit array, refused when smaller than one patch."""
    src = as_unit_array(image)
    if min(src.shape[:2]) < patch_size:
        # Upscaling a few pixels to the model size would only invent the picture it then scores.
        what = f"image is {src.shape[0]} x {src.shape[1]} px, smaller than one {patch_size} px patch; nothing to mask"
        if isinstance(image, (str, Path)):
            raise ReaderError(image, what)
        raise ConfigError(what)
    return src


def _model_inputs(src: np.ndarray, model: MIMModel,
                  dev: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray, Letterbox]:
    """(image ``[1, C, H, W]``, MIRAM's fine image or None, content mask ``[H, W]``, letterbox)."""
    from ..io import letterbox

    H, W = model.cfg.encoder.img_size
    canvas, lb = letterbox(src, (H, W), order=1)
    content = np.zeros((H, W), dtype=bool)
    (r0, c0), (ch, cw) = lb.offset, lb.content_shape
    content[r0:r0 + ch, c0:c0 + cw] = True
    x = torch.from_numpy(to_channels(canvas, model.in_chans)).float()[None].to(dev)     # [1, C, H, W]
    fine = None
    if model.cfg.method == "miram":
        s = int(model.cfg.miram_scale)
        fine_canvas, _ = letterbox(src, (s * H, s * W), order=1)
        fine = torch.from_numpy(to_channels(fine_canvas, model.in_chans)).float()[None].to(dev)
    return x, fine, content, lb


def _draw_mask(model: MIMModel, train_cfg: dict[str, Any], strategy: str, ratio: float,
               region_mask: str | Path | np.ndarray | None, source_shape: tuple[int, int],
               seed: int) -> tuple[torch.Tensor, str, list[str]]:
    """(mask ``[1, L]``, the strategy used, notes): seeded by ``seed`` alone."""
    notes: list[str] = []
    region = None
    if region_mask is not None:
        canvas = _region_canvas(region_mask, source_shape, tuple(model.cfg.encoder.img_size))
        region = torch.from_numpy(canvas.astype(np.float32))[None]
    if strategy == "region" and region is None:
        notes.append("strategy region needs a region mask; none given, masked at random instead")
        strategy = "random"
    gen = torch.Generator().manual_seed(int(seed))
    mask = model.make_mask(strategy, 1, ratio, region=region, generator=gen, **mask_options(train_cfg, strategy))
    return mask, strategy, notes


def _forward(model: MIMModel, x: torch.Tensor, mask: torch.Tensor,
             fine: torch.Tensor | None) -> tuple[MIMOutput, Rendered]:
    """The model's output and pictures of ``x`` under ``mask``, in eval mode (its mode restored after)."""
    was_training = model.training
    model.eval()
    try:
        out = model(x, mask, fine=fine)
        return out, model.render(out, x)
    finally:
        model.train(was_training)


def _grey(t: torch.Tensor) -> np.ndarray:
    """The first picture of ``t [B, C, H, W]`` averaged over channels, float32 ``[H, W]``."""
    return t[0].float().mean(dim=0).cpu().numpy().astype(np.float32)


def _result(x: torch.Tensor, r: Rendered, content: np.ndarray, lb: Letterbox,
            losses: dict[str, torch.Tensor]) -> ReconstructionResult:
    """2-D pictures, the error map and the metrics of one rendered image: masked-pixel MSE and
    PSNR for pixel targets (BEiT's drawn tokens too, with ``token_acc``), the mean cosine
    of predicted and teacher features on masked patches for latent targets."""
    img = _grey(x)
    rpv = _grey(r.recon_plus_visible)
    pix_mask = r.mask[0, 0].cpu().numpy() > 0.5
    extra = {name: _grey(getattr(r, name)) for name in ("fine_reconstruction", *(field for field, _ in METHOD_PICTURES))
             if getattr(r, name, None) is not None}
    if "similarity" in extra:   # latent targets: no pixels were predicted
        on = pix_mask & content
        metrics: dict[str, Any] = {"cosine_masked": float(extra["similarity"][on].mean()) if on.any() else None}
        error = np.where(on, r.error[0, 0].cpu().numpy(), 0.0).astype(np.float32)
    else:
        metrics = masked_metrics(x[0].cpu().numpy(), r.recon_plus_visible[0].float().cpu().numpy(), pix_mask,
                                 content, biharmonic=True)
        error = np.where(pix_mask & content, (rpv - img) ** 2, 0.0).astype(np.float32)
    metrics.update({k: float(losses[k]) for k in ("token_acc", "token_base") if k in losses})
    return ReconstructionResult(image=img, masked=_grey(r.masked), reconstruction=_grey(r.reconstruction),
                                recon_plus_visible=rpv, error=error, mask=pix_mask, content=content,
                                letterbox=lb, metrics=metrics, **extra)


def _region_canvas(region_mask: str | Path | np.ndarray, source_shape: tuple[int, int],
                   size: tuple[int, int]) -> np.ndarray:
    """Region mask (path or array) -> {0, 1} at the letterboxed size, like the image."""
    from ..io import letterbox, read_mask

    if isinstance(region_mask, (str, Path)):
        m = read_mask(region_mask, shape=source_shape)
    else:
        m = np.asarray(region_mask)
        if m.ndim == 3:
            m = m[..., 0]
        m = (m > 0).astype(np.uint8)
        if m.shape != tuple(source_shape):
            from ..io.masks import resample_nearest

            m = resample_nearest(m, source_shape)
    canvas, _ = letterbox(m, size, order=0)
    return canvas > 0


def masked_metrics(truth: np.ndarray, pred: np.ndarray, masked: np.ndarray, content: np.ndarray, *,
                   biharmonic: bool = False) -> dict[str, Any]:
    """MSE / PSNR of ``pred`` and of the visible-mean fill on masked content pixels; with
    ``biharmonic`` also of biharmonic inpainting (about 0.25 s at 224 px, so whole images only).

    ``truth`` and ``pred`` are ``[C, H, W]`` in [0, 1]; ``masked`` and ``content``
    are bool ``[H, W]``.  PSNR uses a data range of 1.
    """
    sel = masked & content
    vis = ~masked & content
    n = int(sel.sum())
    out: dict[str, Any] = {"n_pixels": n}
    if n == 0:
        out.update(mse=None, psnr=None, mse_baseline=None, psnr_baseline=None)
        if biharmonic:
            out.update(mse_biharmonic=None, psnr_biharmonic=None)
        return out
    t = truth[:, sel].astype(np.float64)                      # [C, n]
    p = pred[:, sel].astype(np.float64)
    fill = truth[:, vis].mean(axis=1, keepdims=True) if vis.any() else np.full((truth.shape[0], 1), 0.5)
    mse = float(np.mean((p - t) ** 2))
    mse_b = float(np.mean((fill - t) ** 2))
    out.update(mse=mse, psnr=psnr(mse), mse_baseline=mse_b, psnr_baseline=psnr(mse_b))
    if biharmonic:
        filled = biharmonic_fill(truth, masked)
        mse_h = float(np.mean((filled[:, sel].astype(np.float64) - t) ** 2))
        out.update(mse_biharmonic=mse_h, psnr_biharmonic=psnr(mse_h))
    return out


def biharmonic_fill(image: np.ndarray, masked: np.ndarray) -> np.ndarray:
    """``image [C, H, W]`` with the ``masked`` pixels inpainted biharmonically from the others."""
    from skimage.restoration import inpaint_biharmonic

    if not masked.any() or masked.all():
        return image.copy()
    filled = inpaint_biharmonic(np.moveaxis(image, 0, -1), masked, channel_axis=-1)
    return np.moveaxis(filled, -1, 0).astype(np.float32)


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB of a mean squared error on [0, 1] data (inf for 0)."""
    return math.inf if mse <= 0 else 10.0 * math.log10(1.0 / mse)


# ====================================================================== pictures
def _write_grey(path: Path, arr: np.ndarray) -> Path:
    from PIL import Image

    a = np.clip(np.nan_to_num(np.asarray(arr, dtype=np.float32)), 0.0, 1.0)
    Image.fromarray((a * 255.0 + 0.5).astype(np.uint8), mode="L").save(path)
    return path


def _write_rgb(path: Path, rgb: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray((np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), mode="RGB").save(path)
    return path


# Anchors of a black-red-yellow-white heat colormap (ordered in lightness, so it also
# reads in greyscale); matplotlib is a GUI-only dependency, so no colormap from there.
_HEAT = ((0.0, (0.0, 0.0, 0.0)), (0.35, (0.55, 0.05, 0.25)), (0.65, (0.95, 0.35, 0.05)),
         (0.9, (1.0, 0.85, 0.25)), (1.0, (1.0, 1.0, 0.9)))


def heat(values: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] RGB in [0, 1]."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0.0, 1.0)
    xs = [a for a, _ in _HEAT]
    return np.stack([np.interp(v, xs, [c[i] for _, c in _HEAT]) for i in range(3)], axis=-1)
