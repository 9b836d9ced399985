"""Each variant's encoder: pretrained on the pool under one budget, reused when already done.

A pretrained encoder is kept in ``<encoders>/<variant>-<key>/`` where the key hashes
what decides the result (the resolved pretraining settings, the pool's file list and the
budget).  A finished one (``encoder.json`` written) is reused by any later study with the
same key whose test images it never saw: its excluded pool images must include the ones
this study excludes.  That is how a second labelled task (another hospital's images, none
of them in the pool) reuses the first study's encoders.  An interrupted run resumes from
its checkpoint with what is left of its time budget.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..models.config import EncoderConfig
from ..training.control import Control
from .config import StudyConfig, Variant
from .data import StudyData

if TYPE_CHECKING:
    from ..training.events import EventHandler

#: settings of a pretraining run that do not change what it learns
_NOT_IN_KEY = ("out", "resume", "device", "threads", "num_workers", "preview_every", "preview_size",
               "checkpoint_every", "checkpoint_interval_s", "keep_checkpoints", "time_budget_s", "max_steps",
               "exclude_ids")


@dataclass
class Encoder:
    variant: str
    source: str | None                     # checkpoint / weights path; None: random (scratch)
    info: dict[str, Any]                   # how it was obtained (steps, loss, wall time, reused, ...)


def pretrain_values(cfg: StudyConfig, data: StudyData, variant: Variant) -> dict[str, Any]:
    """The PretrainConfig fields of a variant's run (without out and the budget)."""
    values: dict[str, Any] = {**cfg.pretrain, **(variant.pretrain or {}), "data": data.pool,
                              "exclude_ids": list(data.pool_excluded), "seed": cfg.pretrain_seed,
                              "val_fraction": 0.0, "val_every": 0, "preview_every": 0, "keep_checkpoints": 1,
                              "device": cfg.device, "threads": cfg.threads}
    if cfg.masks:
        values["masks"] = cfg.masks
    if values.get("strategy") == "region":
        for name in ("region_preset", "region_model"):
            if getattr(cfg, name):
                values[name] = getattr(cfg, name)
    return values


def architecture(cfg: StudyConfig) -> EncoderConfig:
    """The encoder architecture every variant shares (scratch is built with it)."""
    from ..training.config import PretrainConfig

    return PretrainConfig.from_dict(dict(cfg.pretrain)).encoder


def run_key(values: dict[str, Any], data: StudyData, budget: dict[str, Any]) -> str:
    """12 hex digits naming a pretraining run by what decides its result: the resolved settings ``values``
    (less those in ``_NOT_IN_KEY``), the pool's file list and ``budget``.  ConfigError for invalid ``values``."""
    from ..training.config import PretrainConfig

    resolved = PretrainConfig.from_dict(values).resolved().to_dict()
    # keyed in the flat spelling without an unset mlp_ratio, as earlier versions wrote their
    # settings: encoders they cached are still found
    resolved = {**{k: v for k, v in resolved.pop("encoder").items() if not (k == "mlp_ratio" and v is None)},
                **resolved}
    kept = {k: v for k, v in resolved.items() if k not in _NOT_IN_KEY}
    blob = json.dumps({"settings": kept, "pool": data.hashes["pool"], "budget": budget}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def obtain_encoder(cfg: StudyConfig, data: StudyData, variant: Variant, root: Path, *,
                   on_event: EventHandler, control: Control) -> Encoder:
    """The variant's encoder: random, the user's weights, or pretrained (reused, resumed or new)."""
    if not variant.pretrained:
        return Encoder(variant.name, variant.init, {"pretrained": False, "init": variant.init})
    values = pretrain_values(cfg, data, variant)
    budget = _budget(cfg, data, values)
    # the epochs of a step budget follow from the pool's size: the steps are what was asked
    key = run_key(values, data, {k: v for k, v in budget.items() if k != "epochs"})
    base = root / f"{re.sub(r'[^A-Za-z0-9_.+-]', '_', variant.name)}-{key}"
    needed = set(values["exclude_ids"])
    # the plain folder, or (when it saw some of this study's test images) one per exclusion set
    own = base.with_name(f"{base.name}-x{hashlib.sha256(json.dumps(sorted(needed)).encode()).hexdigest()[:8]}")
    for run_dir in (base, own):
        done = run_dir / "encoder.json"
        if done.is_file():
            info = json.loads(done.read_text(encoding="utf-8"))
            if needed <= set(info.get("excluded") or ()):
                return Encoder(variant.name, info["checkpoint"], {**info, "reused": True})
        elif not run_dir.exists() or _same_exclusions(run_dir, needed):
            return _pretrain(variant, values, budget, run_dir, on_event=on_event, control=control)
    raise ConfigError(f"{own}: holds another pretraining run; remove it or choose another encoders folder")


def _same_exclusions(run_dir: Path, needed: set[str]) -> bool:
    """An unfinished run in ``run_dir`` was started for these excluded images (so it may resume)."""
    try:
        return set(json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["exclude_ids"]) == needed
    except (OSError, ValueError, KeyError):
        return True   # nothing usable was written: start over there


def _budget(cfg: StudyConfig, data: StudyData, values: dict[str, Any]) -> dict[str, Any]:
    """``{"seconds": s}``, or ``{"steps": n, "epochs": e}`` (the schedule spans whole epochs)."""
    if cfg.budget_steps is None:
        return {"seconds": float(cfg.budget_minutes or 0) * 60.0}
    from ..training.config import PretrainConfig

    pc = PretrainConfig.from_dict(values)
    n = len(data.pool_ids) - len(data.pool_excluded)
    spe = max(1, math.ceil(n / pc.effective_batch))
    return {"steps": int(cfg.budget_steps), "epochs": max(1, math.ceil(cfg.budget_steps / spe))}


def _pretrain(variant: Variant, values: dict[str, Any], budget: dict[str, Any], run_dir: Path, *,
              on_event: EventHandler, control: Control) -> Encoder:
    from ..models.checkpoint import list_checkpoints, load_checkpoint
    from ..training.config import PretrainConfig
    from ..training.pretrain_loop import pretrain

    run = {**values, "out": str(run_dir)}
    if "steps" in budget:   # the steps decide, not a preset's time budget
        run.update(epochs=budget["epochs"], max_steps=budget["steps"], time_budget_s=None)
    else:
        run.update(epochs=max(int(values.get("epochs") or 0), 1000), time_budget_s=budget["seconds"])
    resumed = False
    if list_checkpoints(run_dir):
        spent = float((load_checkpoint(run_dir).meta.get("metrics") or {}).get("elapsed_s") or 0.0)
        if "seconds" in budget:
            run["time_budget_s"] = max(1.0, budget["seconds"] - spent)
        run["resume"], resumed = str(run_dir), True
    elif run_dir.exists():
        shutil.rmtree(run_dir)   # started but nothing saved: start over
    t0 = time.perf_counter()
    res = pretrain(PretrainConfig.from_dict(run), on_event=on_event, control=control)
    if res.reason == "stopped":
        raise ConfigError("study stopped")
    info = {"variant": variant.name, "checkpoint": res.last_checkpoint, "steps": res.step, "reason": res.reason,
            "final_loss": res.final_loss, "wall_s": round(time.perf_counter() - t0, 1),
            "train_s": res.history[-1]["elapsed_s"] if res.history else None, "budget": budget,
            "resumed": resumed, "run_dir": str(run_dir), "pretrained": True,
            "excluded": sorted(values["exclude_ids"])}
    (run_dir / "encoder.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return Encoder(variant.name, res.last_checkpoint, {**info, "reused": False})


__all__ = ["Encoder", "architecture", "obtain_encoder", "pretrain_values", "run_key"]
