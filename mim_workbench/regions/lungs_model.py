"""The ``lungs`` preset: a small learned lung model shipped with the package, or the atlas.

The model (``lungs_model.safetensors``, 250 kB, a :class:`~.learned.RegionNet` trained by
``benchmarks/train_lungs_model.py`` on permissively licensed chest X-rays with human lung
masks; sources in ``ATLAS_SOURCES.md``) is the default: on a collection it never saw it
scores a mean Dice of 0.77 where the atlas scores 0.69, and it is four times faster
(``benchmarks/results/lungs-model-2026-12-02.md`` and
``regions-travel-lungs-model-2026-12-02.json``).  ``method="atlas"`` keeps the classical atlas
registration (:mod:`.lungs`), which needs no neural network.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mim_workbench.errors import ConfigError

if TYPE_CHECKING:
    import dask.array as da

    from mim_workbench.regions.learned import RegionModel

MODEL_FILE = Path(__file__).with_name("lungs_model.safetensors")
#: "auto" takes an image for inverted only when the model is this much surer of it that way:
#: on 212 chest X-rays (two collections) it kept 211 of them the right way up and found 196
#: of the same images inverted (with no margin: 204 and 204)
_INVERTED_MARGIN = 0.01


@lru_cache(maxsize=1)
def shipped_lungs_model() -> RegionModel:
    """The shipped lung model, loaded once per process."""
    from mim_workbench.regions.learned import RegionModel

    return RegionModel.load(MODEL_FILE)


def propose_lungs_preset(image: np.ndarray | da.Array, *, method: str = "model", polarity: str = "auto",
                         **options: Any) -> np.ndarray:
    """Lung fields of a frontal chest X-ray, uint8 {0, 1} at the image's H×W.

    ``method="model"``: the shipped learned model; ``polarity`` "normal" (lungs dark),
    "inverted" (a MONOCHROME1 film shown raw) or "auto": both are tried and the one the
    model is surer of wins (its mean probability inside the proposed region), the right way
    up unless the other is clearly surer (``_INVERTED_MARGIN``).  ``method="atlas"``:
    atlas registration, with the options :func:`~.lungs.propose_lungs` lists.  ConfigError for
    another method, an unknown option or polarity, or (model) an image that is not grey or RGB(A)
    or holds NaN/Inf.
    """
    if method == "atlas":
        from mim_workbench.regions.lungs import propose_lungs

        return propose_lungs(image, polarity=polarity, **options)
    if method != "model":
        raise ConfigError(f"preset 'lungs': method must be 'model' or 'atlas', got {method!r}")
    if options:
        raise ConfigError(f"preset 'lungs': unknown option(s) {sorted(options)} for the learned model "
                          "(atlas options need method='atlas')")
    if polarity not in ("auto", "normal", "inverted"):
        raise ConfigError(f"preset 'lungs': polarity must be 'auto', 'normal' or 'inverted', got {polarity!r}")
    shape = getattr(image, "shape", ())
    if len(shape) == 3 and shape[2] not in (1, 3, 4):
        raise ConfigError(f"preset 'lungs': expected a grey or RGB(A) image, got shape {shape}")
    from mim_workbench.io.model_input import as_unit_array

    img = as_unit_array(image)
    model = shipped_lungs_model()
    if polarity == "auto":
        normal, inverted = (_confidence(model.probabilities(_oriented(img, p))) for p in ("normal", "inverted"))
        polarity = "inverted" if inverted > normal + _INVERTED_MARGIN else "normal"
    return model.propose(_oriented(img, polarity))


def _oriented(img: np.ndarray, polarity: str) -> np.ndarray:
    return 1.0 - img if polarity == "inverted" else img


def _confidence(prob: np.ndarray) -> float:
    inside = prob >= 0.5
    return float(prob[inside].mean()) if inside.any() else 0.0


__all__ = ["MODEL_FILE", "propose_lungs_preset", "shipped_lungs_model"]
