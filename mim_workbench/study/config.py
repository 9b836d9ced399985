"""What a study compares and on which data: :class:`StudyConfig` and its variants.

Three sets, never mixed:

``unlabeled``  the pretraining pool (any number of images; labels ignored).  When it shares
               images with the labelled set, the labelled test images are taken out of it.
``data``       the labelled set, split once by patient into train / val / test; label
               fractions are drawn from train.
``test_data``  optional external set (another hospital): scored, never used for training or
               for choosing a model.

Variants (``variants``): ``scratch`` (the same encoder, randomly initialised), ``mae``,
``rgmim`` (MAE with region-guided masking; regions from ``masks``, ``region_preset`` or
``region_model``), ``simmim``, ``miram``, and ``init=FILE`` (the user's own weights), which
gives two variants: ``init:NAME`` probed as they are and ``init:NAME+mae`` continued with
MAE pretraining on the pool.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

#: pretraining settings of each method variant (PretrainConfig fields)
METHODS: dict[str, dict[str, Any]] = {
    "mae": {"method": "mae", "strategy": "random"},
    "rgmim": {"method": "mae", "strategy": "region"},
    "simmim": {"method": "simmim"},
    "miram": {"method": "miram"},
    "beit": {"method": "beit"},
    "feature": {"method": "feature"},
}
VARIANT_NAMES = ("scratch", *METHODS, "init=FILE")
#: what a study compares unless told: no pretraining, random and region-guided masking, and
#: the visual tokens the ``cpu`` preset pretrains
DEFAULT_VARIANTS = ("scratch", "mae", "rgmim", "beit")


@dataclass(frozen=True)
class Variant:
    """One row of the study: how its encoder is obtained."""

    name: str
    pretrain: dict[str, Any] | None = None   # PretrainConfig fields; None: not pretrained here
    init: str | None = None                  # the user's weights (probed as is, or where pretraining starts)

    @property
    def pretrained(self) -> bool:
        """Whether this variant pretrains an encoder (scratch and ``init=FILE`` as is do not)."""
        return self.pretrain is not None


def parse_variants(names: tuple[str, ...]) -> list[Variant]:
    """The variants named in ``names`` (see the module docstring), in order."""
    out: list[Variant] = []
    for raw in names:
        name = raw.strip()
        if name == "scratch":
            out.append(Variant("scratch"))
        elif name in METHODS:
            out.append(Variant(name, pretrain=dict(METHODS[name])))
        elif name.startswith("init="):
            path = Path(name[5:]).expanduser()
            if not path.exists():
                raise ConfigError(f"variant {name!r}: {path} not found (give a checkpoint, run folder or "
                                  "exported encoder)")
            stem = path.stem if path.is_file() else path.name
            out.append(Variant(f"init:{stem}", init=str(path)))
            out.append(Variant(f"init:{stem}+mae", pretrain={**METHODS["mae"], "init": str(path)}, init=str(path)))
        else:
            raise ConfigError(f"variant {name!r}: choose from {', '.join(VARIANT_NAMES)}")
    names_out = [v.name for v in out]
    if len(set(names_out)) != len(names_out) or not out:
        raise ConfigError(f"variants {', '.join(names)}: give each variant once, at least one")
    return out


def parse_fractions(text: str, name: str = "label fractions") -> tuple[float, ...]:
    """``"0.01, 0.1, 1"`` as label fractions; ConfigError naming the setting (``name``) and the
    text when it is not numbers."""
    try:
        return tuple(float(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise ConfigError(f"{name} {text!r}: give numbers in (0, 1] separated by commas") from None


@dataclass
class StudyConfig:
    data: str | None = None                  # labelled set
    unlabeled: str | None = None             # pretraining pool; None: the labelled set's images
    test_data: str | None = None             # external labelled set
    masks: str | None = None                 # region masks (rgmim), for the pool's images
    region_preset: str | None = None         # or proposed by a region preset ...
    region_model: str | None = None          # ... or by a learned region model
    out: str | None = None
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    seeds: int = 3                           # seeds 0 .. seeds-1
    mode: str = "probe"                      # "probe" | "full"
    budget_minutes: float | None = 20.0      # pretraining per variant (the schedule is planned to end with it)
    budget_steps: int | None = None          # or a number of optimiser steps (then budget_minutes is ignored)
    pretrain: dict[str, Any] = field(default_factory=lambda: {"preset": "cpu"})   # PretrainConfig fields
    finetune: dict[str, Any] = field(default_factory=dict)   # FinetuneConfig fields (epochs, pool, ...)
    encoders: str | None = None              # where pretrained encoders are kept and reused (default out/encoders)
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    split_seed: int = 0
    pretrain_seed: int = 0
    knn_k: int = 20
    bootstrap: int = 2000
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        self.fractions = tuple(float(f) for f in self.fractions)
        self.variants = tuple(str(v) for v in self.variants)
        if not self.fractions or any(not 0.0 < f <= 1.0 for f in self.fractions):
            raise ConfigError(f"fractions={self.fractions!r}: each must be in (0, 1]")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ConfigError(f"seeds={self.seeds!r}: must be a positive number of seeds")
        if self.budget_steps is not None and self.budget_steps < 1:
            raise ConfigError(f"budget_steps={self.budget_steps!r}: must be a positive number of steps")
        if self.budget_steps is None and not (self.budget_minutes or 0) > 0:
            raise ConfigError(f"budget_minutes={self.budget_minutes!r}: must be positive (or give budget_steps)")
        if self.mode not in ("probe", "full"):
            raise ConfigError(f"mode={self.mode!r}: choose probe or full")
        if self.knn_k < 1 or self.bootstrap < 100:
            raise ConfigError(f"knn_k={self.knn_k}, bootstrap={self.bootstrap}: need k >= 1 and >= 100 replicates")
        for name in ("pretrain", "finetune"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{name}: must be a mapping of settings")
        parse_variants(self.variants)

    def variant_list(self) -> list[Variant]:
        """The variants' settings, in the order given; ConfigError names an unknown one."""
        return parse_variants(self.variants)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe settings (tuples become lists), as ``summary.json`` records them."""
        d = dataclasses.asdict(self)
        d["fractions"], d["variants"] = list(self.fractions), list(self.variants)
        return d

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StudyConfig:
        """Inverse of :meth:`to_dict`; ConfigError names unknown keys and unusable values."""
        from ..errors import check_known_keys

        check_known_keys(cls, values, "study setting")
        return cls(**values)


__all__ = ["METHODS", "StudyConfig", "Variant", "parse_fractions", "parse_variants"]
