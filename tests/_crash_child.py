"""Child-process bodies for test_crash_safety.py (not a test module).

They run in processes forked from a forkserver that imported torch once, so a
killed-and-restarted process costs a fork instead of a 4 s interpreter start.
Environment variables are set here, in the child: forkserver children inherit
the server's environment, not the test's.
"""

from __future__ import annotations

import os
from typing import Any


def pretrain_until_killed(config: dict[str, Any], fault: str | None, progress: Any = None,
                          step_delay: float = 0.0) -> None:
    """Pretrain; ``fault`` sets MIM_FAULT_INJECT; ``progress`` (a queue) gets each checkpoint's step;
    ``step_delay`` seconds after each step keep the run alive long enough to be killed from outside."""
    import time

    from mim_workbench.training import events as ev
    from mim_workbench.training.config import PretrainConfig
    from mim_workbench.training.pretrain_loop import pretrain

    if fault:
        os.environ["MIM_FAULT_INJECT"] = fault
    else:
        os.environ.pop("MIM_FAULT_INJECT", None)

    def on_event(e: Any) -> None:
        if progress is not None and isinstance(e, ev.CheckpointSaved):
            progress.put(e.step)
        if step_delay and isinstance(e, ev.Progress):
            time.sleep(step_delay)

    pretrain(PretrainConfig.from_dict(config), on_event=on_event)


def autosave_forever(cache_dir: str, key: str, shape: tuple[int, int], fault: str | None, progress: Any) -> None:
    """Autosave masks whose every pixel is the version number 1, 2, 3, ... until killed."""
    import numpy as np

    from mim_workbench_napari._autosave import autosave_mask

    os.environ["MIM_WORKBENCH_CACHE"] = cache_dir
    if fault:
        os.environ["MIM_FAULT_INJECT"] = fault
    version = 0
    while True:
        version = version % 250 + 1
        autosave_mask(key, np.full(shape, version, np.uint8))
        progress.put(version)
