"""Pretraining: ``pretrain(config, on_event, control) -> RunResult`` and what it needs.

The loop itself is :mod:`.pretrain_loop`; fine-tuning, dense heads and evaluation are in
:mod:`.finetune`, :mod:`.dense` and :mod:`.evaluate`.
"""

from __future__ import annotations

from ..models.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import PRESETS, PretrainConfig
from .control import Control, NullControl, ProcessControl
from .events import CheckpointSaved, Event, Failed, Finished, Preview, Progress, RunResult, Started
from .metrics import read_metrics
from .pretrain_loop import pretrain

__all__ = [
    "PRESETS", "Checkpoint", "CheckpointSaved", "Control", "Event", "Failed", "Finished", "NullControl",
    "Preview", "PretrainConfig", "ProcessControl", "Progress", "RunResult", "Started",
    "load_checkpoint", "pretrain", "read_metrics", "save_checkpoint",
]
