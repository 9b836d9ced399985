"""The training jobs a runner can start by name, each from a plain dict.

A child process receives ``(task, config dict)``; dicts cross process boundaries
and are what the run folder stores, so every job is rebuilt from one here.

``pretrain``  :class:`~.config.PretrainConfig` → :func:`~.pretrain.pretrain`
``finetune``  :class:`~.finetune.FinetuneConfig` → :func:`~.finetune.finetune`
``dense``     :class:`DenseJob` → :func:`~.dense.train_dense` (images + painted strokes)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, check_known_keys
from .control import Control
from .events import EventHandler

if TYPE_CHECKING:
    from ..models.dense import DenseHead

TASKS = ("pretrain", "finetune", "dense")


@dataclass
class DenseJob:
    """A dense head trained from stroke files: everything :func:`train_dense` needs, on disk."""

    images: list[str]
    strokes: list[str]
    out: str
    checkpoint: str | None = None               # encoder source; None = random init (model below)
    model: dict[str, Any] = field(default_factory=dict)   # ModelConfig fields of a random encoder
    config: dict[str, Any] = field(default_factory=dict)  # DenseConfig fields

    def __post_init__(self) -> None:
        if len(self.images) != len(self.strokes):
            raise ConfigError(f"dense job: {len(self.images)} images but {len(self.strokes)} stroke files")
        if not self.images:
            raise ConfigError("dense job: no images with strokes")
        if not self.out:
            raise ConfigError("dense job: out (run folder) is not set")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DenseJob:
        """Build from ``to_dict``'s output; ConfigError for unknown keys, no images, unpaired strokes or no ``out``."""
        check_known_keys(cls, values, "dense job setting")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of the fields."""
        return dataclasses.asdict(self)

    def run(self, on_event: EventHandler | None = None, control: Control | None = None) -> DenseHead:
        """Write ``out/job.json`` and train the head with :func:`~.dense.train_dense` (its errors propagate)."""
        from ..models.dense import DenseConfig
        from .dense import train_dense

        cfg = DenseConfig.from_dict(self.config)
        model_config = dict(self.model) or None
        out = Path(self.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "job.json").write_text(json.dumps(self.to_dict(), indent=2))
        return train_dense(self.images, self.strokes, checkpoint=self.checkpoint, model_config=model_config,
                           config=cfg, out=out, on_event=on_event, control=control)


def is_task(task: str) -> bool:
    """One of :data:`TASKS`, or ``"package.module:function"``: a job of a higher layer (a study)
    that takes ``(config, on_event=, control=)``; the runner only needs its name."""
    module, sep, func = task.partition(":")
    return task in TASKS or (bool(sep) and module.startswith("mim_workbench.") and func.isidentifier())


def run_task(task: str, config: dict[str, Any], on_event: EventHandler | None = None,
             control: Control | None = None) -> Any:
    """Run the job ``task`` (see :func:`is_task`) described by ``config``."""
    if ":" in task and is_task(task):
        import importlib

        module, _, func = task.partition(":")
        return getattr(importlib.import_module(module), func)(config, on_event=on_event, control=control)
    if task == "pretrain":
        from .config import PretrainConfig
        from .pretrain_loop import pretrain

        return pretrain(PretrainConfig.from_dict(config), on_event=on_event, control=control)
    if task == "finetune":
        from .finetune import FinetuneConfig, finetune

        return finetune(FinetuneConfig.from_dict(config), on_event=on_event, control=control)
    if task == "dense":
        return DenseJob.from_dict(config).run(on_event=on_event, control=control)
    raise ConfigError(f"task={task!r}: choose one of {', '.join(TASKS)}")


__all__ = ["TASKS", "DenseJob", "is_task", "run_task"]
