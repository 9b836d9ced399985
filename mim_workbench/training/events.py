"""Events: the only way information leaves the training loop.

The same stream drives the GUI (through a multiprocessing queue, hence plain,
picklable, frozen dataclasses with numpy arrays, never tensors), the CLI progress
bar and tests.  Fields are primitives, so a consumer in another process needs
neither torch nor the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np


@dataclass(frozen=True)
class Started:
    run_dir: str
    config: dict[str, Any]        # the resolved PretrainConfig as a dict
    total_steps: int              # optimiser steps of the whole schedule
    device: str
    start_step: int = 0           # > 0 when resuming
    steps_per_epoch: int = 0
    world_size: int = 1
    n_train: int = 0
    n_val: int = 0
    n_params: int = 0
    lr: float = 0.0               # peak learning rate
    amp: str = "off"              # precision actually used: "bf16", "fp16" or "off"
    stop_at: int = 0              # step at which the run will stop (max_steps or the schedule end)
    notes: tuple[str, ...] = ()   # anything the user should know (fallbacks, ignored settings)


@dataclass(frozen=True)
class Preparing:
    """A step before training starts (e.g. proposing region masks): ``done`` of ``total``."""

    stage: str                    # what is being prepared, in words
    done: int
    total: int
    eta_s: float | None = None


@dataclass(frozen=True)
class Progress:
    step: int                     # optimiser steps completed
    total: int
    epoch: int
    loss: float                   # mean training loss of this step (nan when skipped)
    lr: float
    images_per_s: float
    eta_s: float | None
    val_loss: float | None = None  # set on the event that closes an epoch
    skipped_steps: int = 0        # steps skipped so far because the loss or gradients were not finite
    message: str | None = None    # e.g. why this step was skipped
    unreadable: tuple[str, ...] = ()  # files first found undecodable at this step (reader messages)
    metrics: dict[str, float] = field(default_factory=dict)   # the method's step metrics (token_acc, target_std)


@dataclass(frozen=True, eq=False)
class Preview:
    """Small float32 2-D arrays in [0, 1] (downsampled), one fixed held-back image."""

    step: int
    image: np.ndarray
    masked: np.ndarray
    reconstruction: np.ndarray
    error: np.ndarray
    recon_plus_visible: np.ndarray | None = None
    #: the method's own pictures by name: BEiT's "tokens" and "predicted tokens" (token maps drawn
    #: through the codebook), the feature method's "similarity" (cosine on masked patches)
    extra: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointSaved:
    path: str
    step: int


@dataclass(frozen=True)
class Finished:
    run_dir: str
    step: int
    last_checkpoint: str | None
    reason: str = "completed"     # "completed" | "stopped" | "max_steps" | "time_budget"


@dataclass(frozen=True)
class Failed:
    message: str
    run_dir: str | None = None
    last_checkpoint: str | None = None   # the newest checkpoint that survived, to resume from
    traceback: str | None = None


Event = Union[Preparing, Started, Progress, Preview, CheckpointSaved, Finished, Failed]
EventHandler = Callable[[Event], None]


@dataclass
class RunResult:
    """What ``pretrain`` returns (the Finished event plus summary numbers)."""

    run_dir: str
    step: int
    last_checkpoint: str | None
    reason: str
    final_loss: float | None = None
    val_loss: float | None = None
    skipped_steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)   # one row per step, as metrics.csv


def null_handler(event: Event) -> None:
    """Default ``on_event``: drop everything."""
