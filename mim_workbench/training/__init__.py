"""Pretraining: ``pretrain(config, on_event, control) -> RunResult`` and what it needs.

The loop itself is :mod:`.pretrain_loop`; fine-tuning and dense heads are in :mod:`.finetune`
and :mod:`.dense`, the run settings in :mod:`.config`, ``metrics.csv`` in :mod:`.metrics_log`
and the classification metrics in :mod:`.class_metrics`.
"""

from __future__ import annotations

from ..models.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import PRESETS, PretrainConfig
from .control import Control, NullControl, ProcessControl
from .events import CheckpointSaved, Event, Failed, Finished, Preview, Progress, RunResult, Started
from .metrics_log import read_metrics
from .pretrain_loop import pretrain

__all__ = [
    "PRESETS", "Checkpoint", "CheckpointSaved", "Control", "Event", "Failed", "Finished", "NullControl",
    "Preview", "PretrainConfig", "ProcessControl", "Progress", "RunResult", "Started",
    "load_checkpoint", "pretrain", "read_metrics", "save_checkpoint",
]
