"""Pretraining: ``pretrain(config, on_event, control) -> RunResult`` and what it needs.

Note: ``mim_workbench.training.pretrain`` (this package's attribute) is the function;
the module of the same name is reached with ``from mim_workbench.training.pretrain import ...``.
"""

from __future__ import annotations

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import PRESETS, PretrainConfig
from .control import Control, NullControl, ProcessControl
from .events import CheckpointSaved, Event, Failed, Finished, Preview, Progress, RunResult, Started
from .metrics import read_metrics
from .pretrain import pretrain

__all__ = [
    "PRESETS", "Checkpoint", "CheckpointSaved", "Control", "Event", "Failed", "Finished", "NullControl",
    "Preview", "PretrainConfig", "ProcessControl", "Progress", "RunResult", "Started",
    "load_checkpoint", "pretrain", "read_metrics", "save_checkpoint",
]
