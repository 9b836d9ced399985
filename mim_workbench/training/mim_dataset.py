"""``MIMDataset``: samples -> letterboxed tensors for masked image modeling.

Per item: read the image (and region mask), letterbox both onto ``img_size``
with one geometry (image bilinear + anti-aliasing, mask nearest), optionally a
second, finer letterbox at ``fine_scale`` x the size taken from the *source*
pixels (never upsampled from the training-size tensor: a fine reconstruction
target must hold real detail), then augment.

Order: decode -> letterbox -> [DecodeCache] -> augment -> tensors. Caching the
pre-augmentation arrays keeps augmentation fresh each epoch, and a cache hit
yields exactly what a miss computes.

Randomness: ``np.random.default_rng([seed, epoch, index])`` per item, so results
do not depend on DataLoader workers, processes or DDP ranks and a resumed run
repeats them. Call :meth:`MIMDataset.set_epoch` before each epoch (with
``persistent_workers=True`` workers keep their own copy; recreate the loader
or use non-persistent workers).

A file that passed the dataset scan but fails to decode (truncated pixel data, a
header that promises pixels it lacks) raises the reader's error naming it; with
``substitute_unreadable=True`` (pretraining: unlabelled, many images, long runs) the
next readable sample takes its place instead, so batches keep their size, and the
item's ``unreadable`` field carries the reader's message for the training loop to
report.  Only when no sample at all can be read is the error raised then.  Labelled
fine-tuning keeps the error: a few labels are too precious to swap silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mim_workbench.errors import ConfigError, ReaderError
from mim_workbench.training.augment import crop_resize, jitter, sample_params
from mim_workbench.io.cache import DecodeCache
from mim_workbench.io.letterbox import letterbox, place, resize_to
from mim_workbench.io.masks import check_aspect, read_mask
from mim_workbench.io.readers import read_image
from mim_workbench.io.samples import Sample

#: Reader settings that change decoded pixels; part of the cache key.
READER_SETTINGS_VERSION = 1


def _size(img_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    size = tuple(int(v) for v in img_size)
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(f"img_size must be a positive int or (H, W), got {img_size!r}")
    return size  # type: ignore[return-value]


class MIMDataset(Dataset):
    """Torch dataset of letterboxed images, region masks and optional fine targets.

    ``classes`` (an addition to the core API) fixes the label -> index mapping so
    that train and validation datasets agree; by default it is the sorted labels
    of ``samples``.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        *,
        img_size: int | Sequence[int] = (224, 224),
        in_chans: int = 1,
        fine_scale: int | None = None,
        augment: bool = False,
        seed: int = 0,
        cache: DecodeCache | None = None,
        classes: Sequence[str] | None = None,
        substitute_unreadable: bool = False,
    ) -> None:
        if in_chans not in (1, 3):
            raise ConfigError(f"in_chans must be 1 or 3, got {in_chans}")
        if fine_scale is not None and (int(fine_scale) != fine_scale or fine_scale < 1):
            raise ConfigError(f"fine_scale must be a positive integer, got {fine_scale}")
        self.samples = list(samples)
        self.img_size = _size(img_size)
        self.in_chans = in_chans
        self.fine_scale = int(fine_scale) if fine_scale is not None else None
        self.augment = bool(augment)
        self.seed = int(seed)
        self.cache = cache
        self.substitute_unreadable = bool(substitute_unreadable)
        self.epoch = 0
        self.classes = list(classes) if classes is not None else sorted({s.label for s in self.samples if s.label is not None})
        self._label_index = {c: i for i, c in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream: RNG = f(seed, epoch, index)."""
        self.epoch = int(epoch)

    # ---------------------------------------------------------------- decoding
    @property
    def reader_settings(self) -> dict[str, Any]:
        """JSON-safe settings that change the decoded arrays; part of each item's DecodeCache key."""
        return {
            "img_size": list(self.img_size),
            "fine_scale": self.fine_scale,
            "in_chans": self.in_chans,
            "keep_color": self.in_chans == 3,
            "reader": READER_SETTINGS_VERSION,
        }

    def _decode(self, sample: Sample) -> dict[str, np.ndarray]:
        """Letterboxed arrays for one sample, before augmentation."""
        loaded = read_image(sample.image, keep_color=self.in_chans == 3)
        source = loaded.data
        image, box = letterbox(source, self.img_size, order=1)
        out: dict[str, np.ndarray] = {"image": image.astype(np.float32, copy=False)}
        fine_content = (0, 0)
        if self.fine_scale is not None:
            fine_size = (self.img_size[0] * self.fine_scale, self.img_size[1] * self.fine_scale)
            fine, fbox = letterbox(source, fine_size, order=1)
            out["fine"] = fine.astype(np.float32, copy=False)
            fine_content = fbox.content_shape
        if sample.mask is not None:
            mask = read_mask(sample.mask)
            if tuple(mask.shape) != box.source_shape:
                check_aspect(tuple(mask.shape), box.source_shape, sample.mask)
            region = resize_to(mask, box.content_shape, order=0)
            out["region"] = place(region.astype(np.uint8), self.img_size)
        out["geometry"] = np.array([*box.source_shape, *box.content_shape, *fine_content], dtype=np.int64)
        return out

    def _arrays(self, sample: Sample) -> dict[str, np.ndarray]:
        if self.cache is None:
            return self._decode(sample)
        key = self.cache.key([sample.image, sample.mask], self.reader_settings)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        arrays = self._decode(sample)
        self.cache.put(key, arrays)
        return arrays

    # ---------------------------------------------------------------- items
    def _to_chw(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        if t.ndim == 2:
            t = t.unsqueeze(0)
            if self.in_chans == 3:
                t = t.expand(3, -1, -1)
        else:
            t = t.permute(2, 0, 1)
        return t.contiguous()

    def _readable(self, i: int) -> tuple[int, dict[str, np.ndarray], str]:
        """(index, arrays, problem): sample ``i``, or the next readable one when ``i`` cannot be decoded."""
        try:
            return i, self._arrays(self.samples[i]), ""
        except ReaderError as first:
            if not self.substitute_unreadable:
                raise
            n = len(self.samples)
            for k in range(1, n):
                j = (i + k) % n
                try:
                    return j, self._arrays(self.samples[j]), str(first)
                except ReaderError:
                    continue
            raise

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += len(self)
        i, arrays, unreadable = self._readable(i)
        sample = self.samples[i]
        image = arrays["image"]
        region = arrays.get("region")
        fine = arrays.get("fine")
        geometry = arrays["geometry"]
        content = (int(geometry[2]), int(geometry[3]))
        fine_content = (int(geometry[4]), int(geometry[5]))
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            params = sample_params(rng)
            image = jitter(crop_resize(image, content, params, order=1), content, params)
            if fine is not None:
                fine = jitter(crop_resize(fine, fine_content, params, order=1), fine_content, params)
            if region is not None:
                region = crop_resize(region, content, params, order=0)
        item: dict[str, Any] = {
            "image": self._to_chw(image),
            "region": torch.from_numpy(np.ascontiguousarray(region, dtype=np.float32)) if region is not None
            # numpy, not torch.zeros: torch fills in parallel, and in the main process
            # (num_workers=0) its OpenMP threads stalled ~5 ms per item on a busy machine
            else torch.from_numpy(np.zeros(self.img_size, dtype=np.float32)),
            "has_region": region is not None,
            "index": i,
            "label": self._label_index.get(sample.label, -1) if sample.label is not None else -1,
            "unreadable": unreadable,   # the skipped file's reader message, "" for none
        }
        if self.fine_scale is not None:
            item["fine"] = self._to_chw(fine)
        return item
