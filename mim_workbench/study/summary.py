"""``summary.json``: what makes a study reproducible and every number it found."""

from __future__ import annotations

import importlib.metadata as md
from typing import Any

from ..io.meta import json_safe
from .config import StudyConfig
from .data import StudyData
from .encoders import Encoder


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("mim-workbench", "torch", "timm", "numpy", "scipy", "scikit-learn"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _intervals(ivs: dict[str, Any] | None) -> dict[str, Any] | None:
    if ivs is None:
        return None
    return {"auc": [{"variant": v, "fraction": f, "value": iv.value, "low": iv.low, "high": iv.high}
                    for (v, f), iv in ivs["auc"].items()],
            "differences": [{"variant": a, "reference": b, "fraction": f, "value": iv.value, "low": iv.low,
                             "high": iv.high, "n_boot": iv.n_boot} for (a, b, f), iv in ivs["diff"].items()]}


def summary(cfg: StudyConfig, data: StudyData, encoders: dict[str, Encoder], table: list[dict[str, Any]],
            ivs: dict[str, Any], ext_ivs: dict[str, Any] | None, verdict: str, notes: list[str],
            wall_s: float) -> dict[str, Any]:
    """The JSON-safe content of ``summary.json``: settings, data digests and ids, encoders, table, intervals,
    verdict, package versions, machine and ``wall_s`` (seconds of this run; the caller adds
    ``wall_s_total``, all runs of a resumed study together).  Writes nothing itself."""
    from ..bench.machine import machine_record

    return json_safe({
        "verdict": verdict, "config": cfg.to_dict(), "classes": data.classes,
        "seeds": list(range(cfg.seeds)), "pretrain_seed": cfg.pretrain_seed, "split_seed": cfg.split_seed,
        "data": {"digests": data.hashes, "pool": data.pool, "pool_images": len(data.pool_ids),
                 "pool_excluded": data.pool_excluded, "test_ids": [s.id for s in data.test],
                 "n_train": len(data.splits["train"]), "n_val": len(data.splits["val"]),
                 "n_test": len(data.test), "n_external": len(data.external)},
        "pretraining": {name: enc.info for name, enc in encoders.items()},
        "table": table, "intervals": _intervals(ivs), "external_intervals": _intervals(ext_ivs),
        "notes": notes, "versions": _versions(), "machine": machine_record(), "wall_s": round(wall_s, 1),
    })


__all__ = ["summary"]
