"""The study as a background job: what the workbench's runner starts in a child process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..training.control import Control
from .config import StudyConfig
from .events import StudyFinished, StudyProgress
from .run import StudyResult, run_study

#: the runner's name for this job (``TrainingProcess(config, task=TASK)``)
TASK = "mim_workbench.study.job:run_job"


def run_job(config: dict[str, Any], on_event: Callable[[StudyProgress | StudyFinished], None] | None = None,
            control: Control | None = None) -> StudyResult:
    """``run_study`` of ``StudyConfig.from_dict(config)`` (ConfigError for bad settings); the runner's entry point."""
    return run_study(StudyConfig.from_dict(config), on_event=on_event, control=control)


__all__ = ["TASK", "run_job"]
