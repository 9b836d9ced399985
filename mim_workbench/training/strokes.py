"""A stroke simulator: thin random strokes inside given masks, as a user would paint them.

Used by tests and benchmarks of the dense head (:mod:`mim_workbench.training.dense`)
in place of painted annotations.  What it draws, for each class mask (and, by
default, for the background):

* strokes are **random walks with momentum**: a start pixel drawn uniformly from
  the mask (eroded by the stroke radius when that leaves something, so the whole
  stroke width fits inside), a random initial direction that turns by a normal
  angle increment (sd 0.35 rad) each 1-pixel step, until the walk leaves the
  mask or reaches ``length`` steps; the centre line is then thickened to
  ``width`` pixels (a disk) and clipped to the mask;
* the **pixel budget** is ``fraction`` of the image's pixels in total, shared
  equally between the classes; a class never gets more than half of its own
  mask's area (small lesions are only partly painted, as a person would), and
  what a small class cannot use goes to the others.  Strokes are added until the
  class's share is used (the last stroke is shortened to fit), so the painted
  total is strictly below ``fraction`` of the pixels;
* the **background** is everything outside all masks and outside a margin of
  ``margin`` pixels (default ``2 * width``) around them: annotators do not paint
  right at a boundary they are unsure of.

Labels: with integer keys the keys are the label values (>= 1); with other keys
(e.g. names) the classes get 1..K in the mapping's order.  The background gets
``background`` (default: the largest label + 1; ``None`` paints no background).
0 means unlabelled.  Masks overlapping each other: the first class painted at a
pixel keeps it.  Everything is reproducible from ``seed``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import ndimage

from ..errors import ConfigError

_TURN_SD = 0.35      # radians per step
_MAX_TRIES = 4000    # strokes attempted per class before giving up on its budget


def _disk(radius: float) -> np.ndarray:
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (yy * yy + xx * xx) <= (radius + 0.5) ** 2


def _walk(start: tuple[int, int], region: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """Centre-line pixels ``[n, 2]`` of one random walk inside ``region`` (unique, in order)."""
    H, W = region.shape
    theta = rng.uniform(0.0, 2.0 * np.pi)
    turns = rng.normal(0.0, _TURN_SD, size=length)
    y, x = float(start[0]), float(start[1])
    pts = [(int(start[0]), int(start[1]))]
    for k in range(length):
        theta += turns[k]
        y += np.sin(theta)
        x += np.cos(theta)
        r, c = int(round(y)), int(round(x))
        if not (0 <= r < H and 0 <= c < W) or not region[r, c]:
            break
        if (r, c) != pts[-1]:
            pts.append((r, c))
    return np.array(pts, dtype=np.int64)


def _thicken(pts: np.ndarray, paint_ok: np.ndarray, foot: np.ndarray) -> tuple[slice, slice, np.ndarray]:
    """Disk-dilated stroke, clipped to ``paint_ok``, as (row slice, col slice, bool patch)."""
    r = foot.shape[0] // 2
    H, W = paint_ok.shape
    r0, c0 = max(0, pts[:, 0].min() - r), max(0, pts[:, 1].min() - r)
    r1, c1 = min(H, pts[:, 0].max() + r + 1), min(W, pts[:, 1].max() + r + 1)
    box = np.zeros((r1 - r0, c1 - c0), dtype=bool)
    box[pts[:, 0] - r0, pts[:, 1] - c0] = True
    if r > 0:
        box = ndimage.binary_dilation(box, structure=foot)
    sl = (slice(r0, r1), slice(c0, c1))
    return sl[0], sl[1], box & paint_ok[sl]


def simulate_strokes(masks: Mapping[Any, Any], *, fraction: float = 0.02, width: int = 3, seed: int = 0,
                     background: int | None | str = "auto", margin: int | None = None,
                     length: int | None = None) -> np.ndarray:
    """Simulated stroke labels for one image (see the module docstring).

    Args:
        masks: class -> bool mask, all of one shape ``(H, W)``.
        fraction: upper bound on the painted share of all pixels (0-1).
        width: stroke width in pixels.
        seed: random seed.
        background: label of background strokes; "auto" = largest label + 1, None = none.
        margin: background strokes keep this many pixels away from every mask.
        length: maximum steps of one stroke (default 10 % of the shorter image side, >= 10).

    Returns:
        ``(H, W)`` uint8 (uint16 above 255 labels): 0 unlabelled, else the class label.

    Raises:
        ConfigError: no masks, masks of different shapes or not 2-D, ``fraction`` outside
            (0, 1), ``width`` < 1, or label values below 1 or above 16 bits.
    """
    if not masks:
        raise ConfigError("simulate_strokes: no class masks given")
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"fraction={fraction!r}: must be strictly between 0 and 1")
    if width < 1:
        raise ConfigError(f"width={width!r}: must be >= 1")
    values, arrays = _label_masks(masks)
    H, W = shape = arrays[0].shape
    radius = (width - 1) / 2.0
    foot = _disk(radius)
    margin = 2 * width if margin is None else int(margin)
    length = max(10, int(0.1 * min(H, W))) if length is None else int(length)
    classes = _paint_regions(values, arrays, background, radius, margin)
    dtype = np.uint8 if max(v for v, _, _ in classes) < 256 else np.uint16
    labels = np.zeros(shape, dtype=dtype)
    rng = np.random.default_rng(seed)
    total = int(np.floor(fraction * H * W * 0.999))          # strictly below the fraction
    # Small classes first, so that what they cannot use is shared by the rest.
    order = sorted(range(len(classes)), key=lambda i: int(classes[i][1].sum()))
    left, n_left = total, len(order)
    for i in order:
        value, paint, start = classes[i]
        budget = min(left // max(1, n_left), int(0.5 * paint.sum()))
        n_left -= 1
        left -= _paint_class(labels, value, paint, start, budget, length, foot, rng)
    return labels


def _label_masks(masks: Mapping[Any, Any]) -> tuple[list[int], list[np.ndarray]]:
    """(label value, bool mask) per class: integer keys are the labels, other keys get 1..K.

    Raises ConfigError when an integer key is below 1 or the masks are not 2-D and of one shape."""
    keys = list(masks)
    if all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in keys):
        values = [int(k) for k in keys]
        if min(values) < 1:
            raise ConfigError("simulate_strokes: integer class keys are label values and must be >= 1")
    else:
        values = list(range(1, len(keys) + 1))
    arrays = [np.asarray(masks[k]).astype(bool) for k in keys]
    shape = arrays[0].shape
    if len(shape) != 2 or any(a.shape != shape for a in arrays):
        raise ConfigError(f"simulate_strokes: masks must be 2-D and of one shape, got {[a.shape for a in arrays]}")
    return values, arrays


def _paint_regions(values: list[int], arrays: list[np.ndarray], background: int | None | str, radius: float,
                   margin: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(label, paint region, start region) per class, then the background's unless ``background``
    is None; a start region is the paint region eroded by ``radius`` when that leaves pixels."""
    erode = _disk(radius) if radius >= 1 else None
    classes: list[tuple[int, np.ndarray, np.ndarray]] = []
    for v, m in zip(values, arrays):
        start = ndimage.binary_erosion(m, structure=erode) if erode is not None else m
        classes.append((v, m, start if start.any() else m))
    if background is not None:
        bg_value = max(values) + 1 if background == "auto" else int(background)  # type: ignore[arg-type]
        union = np.logical_or.reduce(arrays)
        near = ndimage.binary_dilation(union, iterations=margin) if margin > 0 and union.any() else union
        bg = ~near
        if bg.any():
            start = ndimage.binary_erosion(bg, structure=erode) if erode is not None else bg
            classes.append((bg_value, bg, start if start.any() else bg))
    if max(v for v, _, _ in classes) > np.iinfo(np.uint16).max:
        raise ConfigError("simulate_strokes: label values must fit in 16 bits")
    return classes


def _paint_class(labels: np.ndarray, value: int, paint: np.ndarray, start: np.ndarray, budget: int, length: int,
                 foot: np.ndarray, rng: np.random.Generator) -> int:
    """Paint strokes of ``value`` into ``labels`` (unlabelled pixels of ``paint`` only) until
    ``budget`` pixels are used (the last stroke shortened to fit); returns the pixels painted."""
    coords = np.argwhere(start)
    painted, tries = 0, 0
    while painted < budget and tries < _MAX_TRIES and len(coords):
        tries += 1
        s = coords[rng.integers(len(coords))]
        pts = _walk((int(s[0]), int(s[1])), paint, length, rng)
        ok = paint & (labels == 0)
        rs, cs, stroke = _thicken(pts, ok, foot)
        n_new = int(stroke.sum())
        if n_new == 0:
            continue
        if painted + n_new > budget:  # shorten the last stroke to fit the budget
            keep = max(1, int(len(pts) * (budget - painted) / n_new))
            while keep >= 1:
                rs, cs, stroke = _thicken(pts[:keep], ok, foot)
                n_new = int(stroke.sum())
                if painted + n_new <= budget:
                    break
                keep -= 1
            if keep < 1 or n_new == 0:
                break
        labels[rs, cs][stroke] = value
        painted += n_new
    return painted


def stroke_summary(labels: np.ndarray) -> dict[str, Any]:
    """Painted fraction and pixels per label (for notes and tests)."""
    vals, counts = np.unique(labels[labels > 0], return_counts=True)
    return {"fraction": float((labels > 0).mean()), "pixels": {int(v): int(c) for v, c in zip(vals, counts)}}


__all__ = ["simulate_strokes", "stroke_summary"]
