"""What an encoder looks at in an image: attention, rollout, patch-feature colours, class activation.

Maps are computed on the encoder's patch grid for the letterboxed image and brought back to
the image's own grid (the letterbox undone), so they lie on the image as layers with its
scale and translate.  The patch-feature colours come from a PCA fitted once over a set of
images (:func:`fit_patch_pca`), so a colour means the same thing from image to image.

Large images: an image longer than ``MAX_MAP_SIDE`` pixels is reduced to it first (lazily
for dask / zarr arrays, so a whole slide is never loaded at full size) and its maps come at
that size, with :attr:`Explanation.scale` source pixels per map pixel.  On such images one
pass of the encoder sees the whole image through a few patches; :meth:`Explainer.explain_tiled`
explains it tile by tile instead and pieces the maps together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..io.model_input import as_unit_array, to_channels

#: maps of a larger image are computed and returned at this many pixels on its long side
MAX_MAP_SIDE = 2048
#: side (map pixels) of a tile of :meth:`Explainer.explain_tiled`
DEFAULT_TILE = 512

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

    from ..io.letterbox import Letterbox
    from ..models.classifier import Classifier
    from .reconstruct import CheckpointLike, ImageLike


@dataclass
class PatchPCA:
    """Three principal components of patch features and the range that maps each to [0, 1].

    A plain PCA of all patches of the fitting set (one mean for every position): on aligned
    radiographs, where anatomy and position go together, taking each position's own mean out
    would take the anatomy out with it.  A random network's colours then follow only its
    position embedding (the same gradient on every image); a trained one's follow content.
    """

    mean: np.ndarray          # [gh, gw, D] the fitting set's mean patch feature, at every position
    components: np.ndarray    # [3, D]
    low: np.ndarray           # [3]: 1st percentile of each component over the fitting set
    high: np.ndarray          # [3]: 99th percentile

    def colours(self, features: np.ndarray) -> np.ndarray:
        """``[gh, gw, D]`` features -> ``[gh, gw, 3]`` RGB in [0, 1] (clipped outside the fitted range)."""
        proj = (np.asarray(features, np.float64) - self.mean) @ self.components.T
        return np.clip((proj - self.low) / np.maximum(self.high - self.low, 1e-12), 0.0, 1.0).astype(np.float32)


@dataclass
class Explanation:
    """Maps of one image on its own pixel grid (``[H, W]``), float32, and the same on the patch grid."""

    attn_heads: np.ndarray              # [heads, H, W]: class-token attention of the last block per head
    attn_mean: np.ndarray               # [H, W]: its mean over heads
    rollout: np.ndarray                 # [H, W] in [0, 1]: attention rollout through every block
    pca_rgb: np.ndarray | None = None   # [H, W, 3] in [0, 1]: patch features through a fitted PatchPCA
    cams: dict[str, np.ndarray] = field(default_factory=dict)   # class -> [H, W] per-patch logit
    grid: dict[str, np.ndarray] = field(default_factory=dict)   # the raw maps on the patch grid (one pass only)
    scale: float = 1.0                  # source pixels per map pixel (> 1 for images reduced to MAX_MAP_SIDE)
    tiles: int = 1                      # encoder passes the maps are pieced from

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write ``attn_mean.png``, ``attn_head_<k>.png``, ``rollout.png``, ``pca_rgb.png`` and
        ``cam_<class>.png`` (heat maps scaled per map) and the raw maps as ``maps.tif``-style
        TIFFs (``attn_heads.tif`` [heads, H, W], ``attn_mean.tif``, ``rollout.tif``, ``cam_<class>.tif``)."""
        import tifffile

        from .reconstruct import _write_rgb, heat

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        maps = {"attn_mean": self.attn_mean, "rollout": self.rollout,
                **{f"attn_head_{k}": a for k, a in enumerate(self.attn_heads)},
                **{f"cam_{_safe(c)}": m for c, m in self.cams.items()}}
        paths = [_write_rgb(out / f"{name}.png", heat(_unit(m))) for name, m in maps.items()]
        if self.pca_rgb is not None:
            paths.append(_write_rgb(out / "pca_rgb.png", self.pca_rgb))
        raw = {"attn_heads": self.attn_heads, "attn_mean": self.attn_mean, "rollout": self.rollout,
               **{f"cam_{_safe(c)}": m for c, m in self.cams.items()}}
        for name, m in raw.items():
            tifffile.imwrite(out / f"{name}.tif", np.asarray(m, np.float32))
            paths.append(out / f"{name}.tif")
        return paths


class Explainer:
    """An encoder (from a pretraining, fine-tuning or exported checkpoint) ready to explain images."""

    def __init__(self, checkpoint: CheckpointLike, *, device: str | torch.device = "cpu") -> None:
        """Load the encoder (and, for a fine-tuned classifier, its head and classes) in eval mode.
        CheckpointError when ``checkpoint`` holds no encoder that can be rebuilt."""
        from ..models.checkpoint import load_checkpoint
        from ..models.classifier import FINETUNE_KIND
        from ..training.encoder_source import load_encoder

        self.device = torch.device(device)
        self.classifier: Classifier | None = None
        self.classes: list[str] = []
        path = Path(str(checkpoint))
        ckpt = None if path.suffix == ".safetensors" else load_checkpoint(path)
        if ckpt is not None and ckpt.kind == FINETUNE_KIND:
            from .predict import Predictor

            pred = Predictor(ckpt, device=self.device)   # the checkpoint read once
            self.classifier, self.classes = pred.model, pred.classes
            self.encoder: VisionTransformer = pred.model.encoder
            encoder_cfg = pred.model_config.encoder
        else:
            loaded = load_encoder(checkpoint)
            self.encoder, encoder_cfg = loaded.encoder.to(self.device), loaded.model_config.encoder
        self.encoder.eval()
        self.img_size, self.in_chans = encoder_cfg.img_size, encoder_cfg.in_chans

    def model_input(self, image: ImageLike) -> tuple[torch.Tensor, Letterbox]:
        """``[1, C, H, W]`` letterboxed model input of ``image`` and its letterbox."""
        from ..io import letterbox

        canvas, lb = letterbox(as_unit_array(image), self.img_size, order=1)
        return torch.from_numpy(to_channels(canvas, self.in_chans)).float()[None].to(self.device), lb

    def patch_features(self, image: ImageLike) -> np.ndarray:
        """``[gh, gw, D]`` float32 patch tokens of ``image`` after the encoder's final norm."""
        return self._grid_features(self.model_input(bounded(image)[0])[0])

    @torch.no_grad()
    def _grid_features(self, x: torch.Tensor) -> np.ndarray:
        """``[gh, gw, D]`` patch tokens of one model input ``x [1, C, H, W]``."""
        from ..models.classifier import patch_grid
        from ..models.encoder import encoder_tokens

        grid = patch_grid(self.encoder, encoder_tokens(self.encoder, x))[0]     # [D, gh, gw]
        return grid.permute(1, 2, 0).float().cpu().numpy()

    @torch.no_grad()
    def explain(self, image: ImageLike, *, pca: PatchPCA | None = None,
                classes: list[str] | None = None) -> Explanation:
        """The maps of :class:`Explanation` for ``image``; ``pca`` adds the feature colours, and
        a classifier's class-activation maps are drawn for ``classes`` (default: the predicted one)."""
        from ..models.attention import block_attentions, query_attention, rollout

        image, factor = bounded(image)
        x, lb = self.model_input(image)
        attns = block_attentions(self.encoder, x)
        heads = query_attention(self.encoder, attns[-1])[0]                      # [heads, gh, gw]
        grid = {"attn_heads": heads.cpu().numpy(), "rollout": rollout(self.encoder, attns)[0].cpu().numpy()}
        back = _Back(lb, self.img_size)
        exp = Explanation(attn_heads=np.stack([back(h) for h in grid["attn_heads"]]),
                          attn_mean=back(grid["attn_heads"].mean(0)), rollout=back(grid["rollout"]), grid=grid)
        if pca is not None:
            rgb = pca.colours(self._grid_features(x))                             # [gh, gw, 3]
            exp.pca_rgb = np.stack([back(rgb[..., c], order=0) for c in range(3)], axis=-1)
        if self.classifier is not None:
            exp.cams = self._cams(x, back, classes)
        exp.scale = factor
        return exp

    def explain_tiled(self, image: ImageLike, *, tile: int | None = None, pca: PatchPCA | None = None,
                      classes: list[str] | None = None,
                      on_tile: Callable[[int, int], None] | None = None) -> Explanation:
        """The maps of ``image`` pieced together from one encoder pass per ``tile`` × ``tile``
        block of it (default ``DEFAULT_TILE``, after reducing it to ``MAX_MAP_SIDE``).  Attention
        and rollout are each tile's own (where inside a tile the encoder looks); the colours use
        ``pca``, by default one fitted on all the tiles, so they agree across tiles; a
        classifier maps ``classes`` (default: its prediction for the whole image) in every tile.
        ``on_tile(done, total)`` after each tile.  ConfigError for a tile under 16 pixels."""
        from ..errors import ConfigError

        tile = DEFAULT_TILE if tile is None else tile
        if tile < 16:
            raise ConfigError(f"tile={tile}: tiles must be at least 16 pixels")
        pixels, factor = bounded(image)
        h, w = pixels.shape[:2]
        boxes = [(r, c, min(r + tile, h), min(c + tile, w)) for r in range(0, h, tile) for c in range(0, w, tile)]
        crops = [pixels[r0:r1, c0:c1] for r0, c0, r1, c1 in boxes]
        pca = pca or fit_patch_pca(self, crops)
        if self.classifier is not None and classes is None:
            with torch.no_grad():
                classes = [self.classes[int(self.classifier(self.model_input(pixels)[0]).argmax())]]
        out: Explanation | None = None
        for k, ((r0, c0, r1, c1), crop) in enumerate(zip(boxes, crops), 1):
            part = self.explain(crop, pca=pca, classes=classes)
            out = out or _blank_like(part, (h, w))
            for name in ("attn_heads", "attn_mean", "rollout"):
                getattr(out, name)[..., r0:r1, c0:c1] = getattr(part, name)
            out.pca_rgb[r0:r1, c0:c1] = part.pca_rgb
            for c, m in part.cams.items():
                out.cams[c][r0:r1, c0:c1] = m
            if on_tile is not None:
                on_tile(k, len(boxes))
        out.scale, out.tiles = factor, len(boxes)
        return out

    def _cams(self, x: torch.Tensor, back: _Back, classes: list[str] | None) -> dict[str, np.ndarray]:
        """Per-patch logits of ``classes`` (default: the predicted class), on the image's grid."""
        from ..errors import ConfigError

        logits = self.classifier.patch_logits(x)[0].float().cpu().numpy()          # [K, gh, gw]
        if classes is None:
            classes = [self.classes[int(self.classifier(x).argmax())]]
        unknown = [c for c in classes if c not in self.classes]
        if unknown:
            raise ConfigError(f"class {unknown[0]!r} is not one of this classifier's ({', '.join(self.classes)})")
        return {c: back(logits[self.classes.index(c)]) for c in classes}


def bounded(image: ImageLike) -> tuple[np.ndarray, float]:
    """``image`` as a float32 [0, 1] array at most ``MAX_MAP_SIDE`` pixels on its long side (a
    larger dask / zarr array is reduced block by block, never loaded whole) and its source
    pixels per returned pixel."""
    from ..io import LoadedImage, read_image
    from ..io.letterbox import fit_shape, resize_to

    if isinstance(image, (str, Path)):
        image = read_image(image, keep_color=False)
    data = image.data if isinstance(image, LoadedImage) else image
    if isinstance(data, (list, tuple)):        # a multiscale pyramid: its finest level
        data = data[0]
    shape = tuple(int(v) for v in data.shape[:2])
    if max(shape) <= MAX_MAP_SIDE:
        return as_unit_array(data), 1.0
    if np.dtype(data.dtype).kind in "ui":      # scale integers as as_unit_array would, before resampling
        data = data.astype(np.float32) / float(np.iinfo(data.dtype).max)
    target = fit_shape(shape, (MAX_MAP_SIDE, MAX_MAP_SIDE))
    return as_unit_array(resize_to(data, target, order=1)), shape[0] / target[0]


def _blank_like(part: Explanation, shape: tuple[int, int]) -> Explanation:
    """An all-zero :class:`Explanation` of ``shape`` with the maps ``part`` has."""
    zeros = lambda *lead: np.zeros((*lead, *shape), np.float32)  # noqa: E731
    return Explanation(attn_heads=zeros(len(part.attn_heads)), attn_mean=zeros(), rollout=zeros(),
                       pca_rgb=None if part.pca_rgb is None else np.zeros((*shape, 3), np.float32),
                       cams={c: zeros() for c in part.cams})


class _Back:
    """A patch-grid map -> the source image's grid (bilinear to the canvas, then the letterbox undone)."""

    def __init__(self, lb: Letterbox, size: tuple[int, int]) -> None:
        self.lb, self.size = lb, size

    def __call__(self, grid_map: np.ndarray, order: int = 1) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(grid_map, dtype=np.float32))[None, None]
        up = F.interpolate(t, size=self.size, mode="bilinear" if order else "nearest",
                           **({"align_corners": False} if order else {}))[0, 0].numpy()
        return self.lb.restore(up, order=order).astype(np.float32)


def fit_patch_pca(explainer: Explainer, images: list[ImageLike], *, max_patches: int = 50_000,
                  seed: int = 0) -> PatchPCA:
    """A :class:`PatchPCA` of the patch features of ``images`` (at most ``max_patches`` of them,
    drawn with ``seed``); the same images and seed give the same colours.  ValueError for no image."""
    from sklearn.decomposition import PCA

    if not images:
        raise ValueError("fitting the feature colours needs at least one image")
    grids = np.stack([explainer.patch_features(im) for im in images]).astype(np.float64)   # [n, gh, gw, D]
    mean = np.broadcast_to(grids.mean(axis=(0, 1, 2)), grids.shape[1:])
    feats = (grids - mean).reshape(-1, grids.shape[-1])
    rng = np.random.default_rng(seed)
    if len(feats) > max_patches:
        feats = feats[rng.choice(len(feats), max_patches, replace=False)]
    pca = PCA(n_components=3, svd_solver="full").fit(feats)
    proj = feats @ pca.components_.T
    return PatchPCA(mean=np.array(mean), components=pca.components_, low=np.percentile(proj, 1, axis=0),
                    high=np.percentile(proj, 99, axis=0))


def _unit(m: np.ndarray) -> np.ndarray:
    """``m`` scaled to [0, 1] by its own range (a flat map becomes 0)."""
    lo, hi = float(np.nanmin(m)), float(np.nanmax(m))
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def _safe(name: str) -> str:
    """A class name usable in a file name."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


__all__ = ["DEFAULT_TILE", "Explainer", "Explanation", "MAX_MAP_SIDE", "PatchPCA", "bounded", "fit_patch_pca"]
