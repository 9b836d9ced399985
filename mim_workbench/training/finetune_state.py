"""Where a fine-tuning run stands at an epoch boundary, so a stopped or crashed run goes on.

``finetune`` writes ``OUT/resume.safetensors`` at the end of the first epoch, then at
epoch ends at most every ``checkpoint_interval_s`` (atomically: a crash while writing
leaves the previous one; tensors in safetensors, the rest as JSON in
its header, so nothing is unpickled) and removes it when the run has finished its
plan (completed or stopped early by patience).  A run stopped by the user, a time
budget or ``max_steps``, or killed, keeps it; ``FinetuneConfig(resume=True)`` (CLI:
``mim-workbench finetune --resume OUT``) continues from it with the run's own settings.
Sample order, augmentation and dropout are functions of the epoch and the saved random
state, so the continued run computes what an uninterrupted one would
(tests/test_finetune_resume.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from .config import saved_finetune_values

STATE_FILE = "resume.safetensors"
STATE_FORMAT = 1
#: Settings a continued run may change: where and how long it runs, not what it computes.
RUN_CONTROL = frozenset({"resume", "device", "threads", "num_workers", "max_steps", "time_budget_s",
                         "checkpoint_interval_s", "cache"})


@dataclass
class LoopState:
    """The fine-tuning loop's own variables; the model and optimiser are saved beside them."""

    epoch: int = 0                      # the next epoch to run
    step: int = 0
    best_loss: float = math.inf
    best_epoch: int | None = None
    best_step: int = 0
    bad_epochs: int = 0
    t_active: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None


def state_path(run_dir: str | Path) -> Path:
    """``run_dir/resume.safetensors``, whether or not it exists."""
    return Path(run_dir) / STATE_FILE


def save_state(run_dir: str | Path, loop: LoopState, *, config: dict[str, Any], train_ids: list[str],
               model_state: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None) -> Path:
    """Write ``run_dir/resume.safetensors`` atomically.  ``model_state``: what training
    changes (a probe's frozen encoder is rebuilt from its source on resume, so it is left out)."""
    from safetensors.torch import save_file

    from ..models.checkpoint import capture_rng_state, flatten_optimizer_state

    opt_tensors, opt_rest = flatten_optimizer_state(optimizer.state_dict())
    tensors = {f"model.{k}": v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    tensors.update({f"best.{k}": v.detach().to("cpu").contiguous() for k, v in (loop.best_state or {}).items()})
    tensors.update({f"optimizer.{k}": v for k, v in opt_tensors.items()})
    header = {
        "format": STATE_FORMAT, "config": config, "train_ids": list(train_ids),
        "loop": {k: v for k, v in dataclasses.asdict(loop).items() if k != "best_state"},
        "has_best": loop.best_state is not None, "optimizer": opt_rest,
        "scaler": scaler.state_dict() if scaler is not None else None, "rng": capture_rng_state(),
    }
    path = state_path(run_dir)
    tmp = path.with_name(f".{STATE_FILE}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={"state": json.dumps(header)})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_state(run_dir: str | Path, config: dict[str, Any], train_ids: list[str], *,
               read_settings: Callable[[dict[str, Any]], dict[str, Any]] = dict) -> dict[str, Any]:
    """The saved state of ``run_dir`` (``model``, ``best_state``, ``optimizer``, ``scaler``,
    ``rng``, ``loop``), checked against the continuing run's settings and data.

    ``read_settings`` brings the saved settings into the spelling of ``config`` (a state
    written by an earlier version spells them otherwise).

    Raises ConfigError naming what differs (a setting, the training images) or that
    there is nothing to continue, CheckpointError when the file cannot be read.
    """
    from safetensors import safe_open

    from ..models.checkpoint import unflatten_optimizer_state

    path = state_path(run_dir)
    if not path.is_file():
        raise ConfigError(f"resume: {str(path)!r} does not exist: this run has no epoch to continue from "
                          "(it finished, or stopped before its first epoch ended)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = json.loads((fh.metadata() or {})["state"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise CheckpointError(f"resume: cannot read {str(path)!r}: {exc}") from exc
    if not isinstance(header, dict) or header.get("format") != STATE_FORMAT:
        raise CheckpointError(f"resume: {str(path)!r} is not a fine-tuning state this version writes")
    saved = read_settings(header["config"])
    changed = sorted(k for k in set(saved) | set(config) if k not in RUN_CONTROL and saved.get(k) != config.get(k))
    if changed:
        what = ", ".join(f"{k}={saved.get(k)!r} -> {config.get(k)!r}" for k in changed)
        raise ConfigError(f"resume: the run in {str(Path(run_dir))!r} was started with other settings ({what}); "
                          f"only {', '.join(sorted(RUN_CONTROL - {'resume'}))} may change")
    if list(header["train_ids"]) != list(train_ids):
        raise ConfigError(f"resume: the training images of {str(Path(run_dir))!r} changed since the run started "
                          "(files added, removed or relabelled); start a new run")

    def part(prefix: str) -> dict[str, torch.Tensor]:
        """The tensors saved under ``prefix``, keyed without it."""
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    return {"loop": header["loop"], "model": part("model."), "best_state": part("best.") if header["has_best"] else None,
            "optimizer": unflatten_optimizer_state(part("optimizer."), header["optimizer"]),
            "scaler": header["scaler"], "rng": header["rng"]}


def restore_loop(payload: dict[str, Any]) -> LoopState:
    """The LoopState of a ``load_state`` payload, with its best weights (or None) as ``best_state``."""
    loop = LoopState(**payload["loop"])
    loop.best_state = payload["best_state"]
    return loop


def resume_config(run_dir: str | Path, *, device: str | None = None, threads: int | None = None,
                  max_steps: int | None = None, time_budget_s: float | None = None) -> dict[str, Any]:
    """The settings to continue the run in ``run_dir``: its own ``config.json`` with
    ``resume=True`` and the run control given now (the stopped run's step and time
    limits ended it, so they are not carried over; device and threads are kept unless given)."""
    cfg_file = Path(run_dir) / "config.json"
    try:
        values = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"resume: cannot read {str(cfg_file)!r} ({exc}); is {str(run_dir)!r} a fine-tuning "
                          "run folder?") from None
    if not isinstance(values, dict):
        raise ConfigError(f"resume: {str(cfg_file)!r} is not a fine-tuning config")
    values = saved_finetune_values(values)
    values.update(out=str(run_dir), resume=True, max_steps=max_steps, time_budget_s=time_budget_s)
    if device is not None:
        values["device"] = device
    if threads is not None:
        values["threads"] = threads
    return values


def resumable(run_dir: str | Path) -> bool:
    """True when ``run_dir`` holds a fine-tuning run that can continue."""
    return state_path(run_dir).is_file() and (Path(run_dir) / "config.json").is_file()


def remove_state(run_dir: str | Path) -> None:
    """Delete ``run_dir``'s resume state, if any: the run has nothing left to continue."""
    try:
        state_path(run_dir).unlink()
    except FileNotFoundError:
        pass


__all__ = ["LoopState", "RUN_CONTROL", "STATE_FILE", "load_state", "remove_state", "restore_loop", "resumable",
           "resume_config", "save_state", "state_path"]
