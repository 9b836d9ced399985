"""Crops of large images at a chosen pyramid level, region-guided, for pretraining.

Letterboxing a 5000 px mammogram to 224 px throws away the detail MIRAM and RGMIM
learn from.  :class:`CropDataset` instead serves ``crop_size`` windows read from a
pyramid level (chosen by index or by pixel spacing in mm), so the model sees
tissue at a useful resolution and only the crop is ever read from disk.

Region guidance happens twice: here, a crop is centred on a random *region*
pixel with probability ``region_fraction`` (else anywhere), so crops overlap the
organ; then the pretrain loop's ``region`` strategy masks the patches inside it
first (the crop's ``region`` is returned for that).

MIRAM's fine target (``fine_scale = s``, a power of two) is the *same area* read
from the pyramid level ``log2(s)`` steps finer, at ``s x crop_size``: true detail,
never an upsampled input.  That needs ``level >= log2(s)``.

Items match :class:`~mim_workbench.training.mim_dataset.MIMDataset`: ``image`` [C, h, w],
``region`` [h, w], ``has_region``, ``fine`` [C, s*h, s*w] (MIRAM), ``index``,
``label``, plus ``crop`` = (level, row, col) of the crop's top-left corner.
The crop of item ``i`` in epoch ``e`` is a function of (seed, e, i): reproducible
on 1 or N processes and after a resume.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mim_workbench.errors import ConfigError
from mim_workbench.io.level_masks import mask_window
from mim_workbench.io.pyramid import Pyramid, open_pyramid
from mim_workbench.io.samples import Sample

if TYPE_CHECKING:
    from mim_workbench.training.config import PretrainConfig

#: Longest side of the mask kept for choosing crops (finer detail is not needed there).
CHOICE_MAX_SIDE = 1024


class CropDataset(Dataset):
    """``crops_per_image`` crops per sample per epoch (see module docstring)."""

    def __init__(
        self,
        samples: Sequence[Sample],
        *,
        crop_size: int | Sequence[int] = (224, 224),
        level: int | None = None,
        spacing: float | None = None,
        crops_per_image: int = 16,
        in_chans: int = 1,
        fine_scale: int | None = None,
        region_fraction: float = 0.9,
        auto_region: str | None = None,
        augment: bool = False,
        seed: int = 0,
        cache_root: str | os.PathLike | None = None,
    ) -> None:
        self.samples = list(samples)
        size = (int(crop_size), int(crop_size)) if isinstance(crop_size, int) else tuple(int(v) for v in crop_size)
        self.crop_size: tuple[int, int] = size  # type: ignore[assignment]
        if crops_per_image < 1:
            raise ConfigError(f"crops_per_image={crops_per_image!r}: must be a positive integer")
        if not 0.0 <= region_fraction <= 1.0:
            raise ConfigError(f"region_fraction={region_fraction!r}: must be in [0, 1]")
        if fine_scale is not None and (fine_scale < 1 or fine_scale & (fine_scale - 1)):
            raise ConfigError(f"fine_scale={fine_scale!r}: crops need a power of two (pyramid levels halve)")
        self.level, self.spacing = level, spacing
        self.crops_per_image = int(crops_per_image)
        self.in_chans = int(in_chans)
        self.fine_scale = int(fine_scale) if fine_scale is not None else None
        self.region_fraction = float(region_fraction)
        self.auto_region = auto_region
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        self.cache_root = cache_root
        labels = sorted({s.label for s in self.samples if s.label is not None})
        self._label_index = {name: k for k, name in enumerate(labels)}
        self._pyr: dict[int, Pyramid] = {}
        self._choice: dict[int, tuple[np.ndarray | None, tuple[float, float], np.ndarray | None]] = {}
        for k in range(len(self.samples)):  # build every pyramid (and its cache) up front, in one process
            self._level_of(k)

    # ------------------------------------------------------------------ bookkeeping
    def __len__(self) -> int:
        return len(self.samples) * self.crops_per_image

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops ``__getitem__`` serves (crop of item i = f(seed, epoch, i))."""
        self.epoch = int(epoch)

    def __getstate__(self) -> dict:
        # Open stores (tifffile handles) do not pickle into DataLoader workers: reopen there.
        state = dict(self.__dict__)
        state["_pyr"] = {}
        return state

    def pyramid(self, k: int) -> Pyramid:
        """The pyramid of sample ``k``, opened (built and cached if needed) on first use; ReaderError if unreadable."""
        if k not in self._pyr:
            keep_color = self.in_chans == 3
            self._pyr[k] = open_pyramid(self.samples[k].image, keep_color=keep_color, cache_root=self.cache_root)
        return self._pyr[k]

    def _level_of(self, k: int) -> int:
        pyr = self.pyramid(k)
        if self.spacing is not None:
            lvl = pyr.level_for_spacing(float(self.spacing))
        else:
            lvl = min(int(self.level or 0), len(pyr.levels) - 1)
        if self.fine_scale is not None and lvl < int(math.log2(self.fine_scale)):
            raise ConfigError(
                f"{self.samples[k].image}: crops at level {lvl} have no level {int(math.log2(self.fine_scale))} "
                f"steps finer for MIRAM's fine target; choose crop_level >= {int(math.log2(self.fine_scale))} "
                f"(or a coarser crop_spacing)"
            )
        return lvl

    def _region(self, k: int) -> tuple[np.ndarray | None, tuple[float, float], np.ndarray | None]:
        """(mask, its pixel size in level-0 pixels, flat indices of its region pixels) of sample k."""
        if k in self._choice:
            return self._choice[k]
        pyr = self.pyramid(k)
        sample = self.samples[k]
        mask = None
        if sample.mask is not None:
            from mim_workbench.io import read_mask

            mask = read_mask(sample.mask)
        elif self.auto_region:
            from mim_workbench.regions.large import propose_region_large

            mask = propose_region_large(pyr, self.auto_region).mask
        if mask is None:
            self._choice[k] = (None, (1.0, 1.0), None)
            return self._choice[k]
        H0, W0 = pyr.shape
        if max(mask.shape) > CHOICE_MAX_SIDE:  # a coarser copy is plenty to pick crop centres
            from mim_workbench.io.level_masks import resample_mask

            f = CHOICE_MAX_SIDE / max(mask.shape)
            mask = resample_mask(mask, (max(1, round(mask.shape[0] * f)), max(1, round(mask.shape[1] * f))),
                                 lazy=False)
        mask = (np.asarray(mask) > 0).astype(np.uint8)
        mscale = (H0 / mask.shape[0], W0 / mask.shape[1])
        on = np.flatnonzero(mask)
        self._choice[k] = (mask, mscale, on if on.size else None)
        return self._choice[k]

    # ------------------------------------------------------------------ one crop
    def crop_origin(self, k: int, level: int, rng: np.random.Generator) -> tuple[int, int]:
        """Top-left (row, col) at ``level``: centred on a region pixel, or uniform."""
        pyr = self.pyramid(k)
        H, W = pyr.level_shape(level)
        h, w = self.crop_size
        fy, fx = pyr.factor(level)
        mask, mscale, on = self._region(k)
        if on is not None and rng.random() < self.region_fraction:
            flat = int(on[rng.integers(on.size)])
            my, mx = divmod(flat, mask.shape[1])
            # a random point inside that mask pixel, in level pixels
            cy = (my + rng.random()) * mscale[0] / fy
            cx = (mx + rng.random()) * mscale[1] / fx
            r, c = int(round(cy - h / 2)), int(round(cx - w / 2))
        else:
            r, c = int(rng.integers(0, max(H - h, 0) + 1)), int(rng.integers(0, max(W - w, 0) + 1))
        # keep the crop inside the image where it fits (no black borders for nothing)
        r = min(max(r, 0), max(H - h, 0)) if H >= h else (H - h) // 2
        c = min(max(c, 0), max(W - w, 0)) if W >= w else (W - w) // 2
        return r, c

    def _to_chw(self, a: np.ndarray) -> torch.Tensor:
        if a.ndim == 2:
            t = torch.from_numpy(np.ascontiguousarray(a))[None]
            return t.expand(self.in_chans, -1, -1).contiguous() if self.in_chans > 1 else t
        if self.in_chans == 1:
            return torch.from_numpy(np.ascontiguousarray(a.mean(axis=-1)))[None]
        return torch.from_numpy(np.ascontiguousarray(a[..., : self.in_chans])).permute(2, 0, 1).contiguous()

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += len(self)
        k = i // self.crops_per_image
        pyr = self.pyramid(k)
        level = self._level_of(k)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        r, c = self.crop_origin(k, level, rng)
        h, w = self.crop_size
        image = pyr.read(level, (r, r + h), (c, c + w))
        mask, mscale, _on = self._region(k)
        fy, fx = pyr.factor(level)
        region = (mask_window(mask, mscale, (r, r + h), (c, c + w), (fy, fx)).astype(np.float32)
                  if mask is not None else None)
        fine = None
        if self.fine_scale is not None:
            s = self.fine_scale
            fl = level - int(math.log2(s))
            gy, gx = fy / pyr.factor(fl)[0], fx / pyr.factor(fl)[1]  # fine pixels per crop pixel (~s)
            fr, fc = int(round(r * gy)), int(round(c * gx))
            fine = pyr.read(fl, (fr, fr + s * h), (fc, fc + s * w))
        if self.augment and rng.random() < 0.5:  # a horizontal flip keeps anatomy plausible
            image = image[:, ::-1]
            region = region[:, ::-1] if region is not None else None
            fine = fine[:, ::-1] if fine is not None else None
        sample = self.samples[k]
        item: dict[str, Any] = {
            "image": self._to_chw(image),
            "region": torch.from_numpy(np.ascontiguousarray(region)) if region is not None
            else torch.zeros(self.crop_size, dtype=torch.float32),
            "has_region": region is not None,
            "index": i,
            "label": self._label_index.get(sample.label, -1) if sample.label is not None else -1,
            "crop": torch.tensor([level, r, c], dtype=torch.int64),
        }
        if fine is not None:
            item["fine"] = self._to_chw(fine)
        return item


def pretrain_crop_datasets(cfg: PretrainConfig, train: Sequence[Sample], val: Sequence[Sample],
                           fine_scale: int | None) -> tuple[CropDataset, CropDataset | None, CropDataset]:
    """(train, val, preview) crop datasets for a ``PretrainConfig`` with ``crop_level``/``crop_spacing``.

    Crops are ``img_size``; validation and preview crops are fixed (no flips, epoch 0).
    """
    common = dict(crop_size=cfg.encoder.img_size, level=cfg.crop_level, spacing=cfg.crop_spacing,
                  in_chans=cfg.encoder.in_chans, fine_scale=fine_scale, region_fraction=cfg.crop_region_fraction,
                  seed=cfg.seed)
    train_ds = CropDataset(train, crops_per_image=cfg.crops_per_image, augment=cfg.augment, **common)
    val_ds = CropDataset(val, crops_per_image=max(1, cfg.crops_per_image // 4), **common) if val else None
    preview_ds = CropDataset([(list(val) or list(train))[0]], crops_per_image=1, **common)
    return train_ds, val_ds, preview_ds
