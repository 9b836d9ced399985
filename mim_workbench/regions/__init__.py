"""Automatic region proposal (headless core): lung fields, breast, teeth, tissue.

    from mim_workbench.regions import propose_region, PRESETS
    mask = propose_region(image, "lungs")           # uint8 {0, 1}, image's H×W

``image`` is a float array in [0, 1] (what :func:`mim_workbench.io.read_image`
returns), 2-D for the X-ray presets, H×W×3 (or grey) for ``tissue``; integer
arrays and dask arrays are accepted too. Every preset works at a reduced
working size (longest side 256–1024 px) and resizes its mask back with a
smooth boundary, so any resolution is fine and a 5000 px mammogram takes well
under a second or two. Everything ships with the package: classical image
processing plus, for the lungs, a small learned model (``lungs_model.safetensors``,
``benchmarks/train_lungs_model.py``) and a 64×64 statistical atlas
(``lung_atlas.npz``, ``benchmarks/build_lung_atlas.py``), both built from
permissively licensed data; nothing is downloaded.

Presets (options are keyword arguments; unknown ones raise ConfigError):

- ``lungs``: frontal chest X-ray lung fields, by the shipped learned model, or
  with ``method="atlas"`` by atlas registration + intensity refinement; see
  :mod:`mim_workbench.regions.lungs_model`.
- ``breast``: mammogram breast without background and burned-in labels;
  ``exclude_pectoral=True`` removes the pectoral muscle on MLO views.
- ``teeth``: teeth on panoramic dental X-rays.
- ``tissue``: tissue on (RGB) slides, saturation + Otsu at a low level.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from mim_workbench.errors import ConfigError
from mim_workbench.regions.breast import propose_breast
from mim_workbench.regions.lungs_model import propose_lungs_preset
from mim_workbench.regions.morphology import dice
from mim_workbench.regions.teeth import propose_teeth
from mim_workbench.regions.tissue import propose_tissue

if TYPE_CHECKING:
    import dask.array as da

PRESETS: dict[str, Callable[..., np.ndarray]] = {
    "lungs": propose_lungs_preset,
    "breast": propose_breast,
    "teeth": propose_teeth,
    "tissue": propose_tissue,
}

#: one line per preset, for GUI menus and CLI help
DESCRIPTIONS: dict[str, str] = {
    "lungs": "lung fields on a frontal chest X-ray",
    "breast": "breast on a mammogram (no background or labels; optional pectoral exclusion)",
    "teeth": "teeth on a panoramic dental X-ray",
    "tissue": "tissue on a slide (saturation + Otsu)",
}


def propose_region(image: np.ndarray | da.Array, preset: str, **options: Any) -> np.ndarray:
    """Propose a region mask for ``image`` with a preset; uint8 {0, 1}, same H×W.

    Raises :class:`~mim_workbench.errors.ConfigError` for an unknown preset or
    option, or an image that is not 2-D / H×W×C.
    """
    fn = PRESETS.get(preset)
    if fn is None:
        raise ConfigError(f"unknown region preset {preset!r}; valid presets: {', '.join(sorted(PRESETS))}")
    shape = getattr(image, "shape", None)
    if shape is None or len(shape) not in (2, 3) or min(shape[:2]) < 1:
        raise ConfigError(f"preset {preset!r}: expected an (H, W) or (H, W, C) image, got shape {shape}")
    return fn(image, **options)


__all__ = ["DESCRIPTIONS", "PRESETS", "dice", "propose_region"]
