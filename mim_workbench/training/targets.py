"""What a method fits on the training images before it trains (BEiT's tokenizer), cached.

The fit depends only on the data set and a few settings, so it is done once and kept in
``<cache base>/targets/<key>.safetensors`` (keyed like the decoded-image cache, by the
data set's signature and those settings); a run on the same data reads it back.  The
model stores what was fitted in its own weights, so its checkpoints never need the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import ConfigError
from ..io.cache import cache_base
from ..models.base import MIMModel
from .events import Preparing

FIT_IMAGES = 256   # images the fit sees at most: ~12k patches at 112 px, 50k at 224 px
#: patches each visual token is fitted from, at least, when the codebook size is left to the data
PATCHES_PER_TOKEN = 8
MIN_CODEBOOK = 16


def codebook_for(n_images: int, num_patches: int, default: int) -> int:
    """The codebook size a data set of ``n_images`` (of ``num_patches`` patches each) can fit:
    ``default``, or the largest power of two that leaves :data:`PATCHES_PER_TOKEN` patches to
    each token (at least :data:`MIN_CODEBOOK`), so that a dozen images still make sensible tokens."""
    patches = min(n_images, FIT_IMAGES) * num_patches
    size = default
    while size > MIN_CODEBOOK and size * PATCHES_PER_TOKEN > patches:
        size //= 2
    return size


def targets_cache_path(signature: str, settings: dict[str, Any]) -> Path:
    """Where the fit of a data set (``signature``) with ``settings`` is cached."""
    blob = json.dumps({"data": signature, **settings}, sort_keys=True, default=str)
    return cache_base() / "targets" / f"{hashlib.sha256(blob.encode()).hexdigest()[:24]}.safetensors"


def fit_targets(model: MIMModel, dataset: Dataset, *, seed: int, signature: str,
                emit: Callable[[Any], None] | None = None) -> str | None:
    """Fit ``model`` (if its method needs it) on up to :data:`FIT_IMAGES` images of ``dataset``
    (items with an ``image [C, H, W]``), or read the fit from the cache; returns a note for
    the run's log, or None when the method fits nothing.  ConfigError when the images have
    fewer patches than the codebook has tokens."""
    if not model.needs_fitting:
        return None
    from safetensors.torch import load_file, save_file

    cfg = model.cfg
    settings = {"method": cfg.method, "kind": "kmeans-normalised-patches", "img_size": list(cfg.encoder.img_size),
                "in_chans": cfg.encoder.in_chans, "patch_size": model.patch_size,
                "codebook_size": cfg.codebook_size, "seed": seed, "images": FIT_IMAGES}
    path = targets_cache_path(signature, settings)
    if path.is_file():
        try:
            model.load_fitted_state(load_file(str(path)))
            return f"{cfg.method} targets: the tokenizer of these images was read from the cache ({path.name})"
        except Exception:  # noqa: BLE001 - a damaged cache entry is fitted again
            pass
    stage = f"fitting the {cfg.codebook_size}-token {cfg.method} tokenizer"
    if emit is not None:
        emit(Preparing(stage, 0, 1))
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(dataset), generator=g)[:FIT_IMAGES].tolist()
    patches = len(picks) * model.num_patches
    if patches < cfg.codebook_size:
        raise ConfigError(f"codebook_size={cfg.codebook_size}: {len(picks)} training images give only {patches} "
                          f"patches of {model.patch_size} px to fit that many tokens; lower the codebook size "
                          "(--codebook-size), use more images or a larger image size")
    images = torch.stack([torch.as_tensor(dataset[i]["image"]).float() for i in picks])
    model.fit(images, seed=seed)
    _write_atomically(path, model.fitted_state(), save_file)
    if emit is not None:
        emit(Preparing(stage, 1, 1))
    return f"{cfg.method} targets: a {cfg.codebook_size}-token tokenizer fitted on {len(picks)} training images"


def _write_atomically(path: Path, tensors: dict[str, torch.Tensor], save: Callable[..., None]) -> None:
    """Write ``tensors`` to ``path`` through a temporary file; a failed write loses only the cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)
    except OSError:
        pass


__all__ = ["FIT_IMAGES", "fit_targets", "targets_cache_path"]
