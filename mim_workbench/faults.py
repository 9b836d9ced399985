"""Fault injection for crash-safety tests: ``MIM_FAULT_INJECT=<point>[:<n>]``.

When the variable names a point, the process SIGKILLs itself the ``n``-th time
(default: the first) it reaches that point - no cleanup, no ``finally``, exactly
what a power cut or the OOM killer does.  Unset (always, outside tests) a point
costs one dictionary lookup; the writers call it a handful of times per
checkpoint, next to fsyncs that take milliseconds.

Points (see :func:`mim_workbench.models.checkpoint.save_checkpoint` and
:func:`mim_workbench.io.mask_writer.save_mask`):

``ckpt-after-model``, ``ckpt-after-optim``, ``ckpt-after-meta``
    after each file of a checkpoint is written and fsynced (in the temporary folder)
``ckpt-before-rename``
    the temporary folder is complete, not yet renamed to ``ckpt-<step>``
``ckpt-after-rename``
    ``ckpt-<step>`` is in place, ``latest`` still names the previous checkpoint
``ckpt-after-latest``
    ``latest`` moved, old checkpoints not yet pruned
``mask-before-rename``
    a mask (autosave) is written to its temporary file, not yet renamed
"""

from __future__ import annotations

import os
import signal

ENV = "MIM_FAULT_INJECT"
POINTS = (
    "ckpt-after-model", "ckpt-after-optim", "ckpt-after-meta", "ckpt-before-rename",
    "ckpt-after-rename", "ckpt-after-latest", "mask-before-rename",
)

_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Kill this process here if ``MIM_FAULT_INJECT`` says so (see the module docstring)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(nth or 1):
        kill = getattr(signal, "SIGKILL", None)  # Windows has none: exit without cleanup instead
        if kill is not None:
            os.kill(os.getpid(), kill)
        os._exit(137)


__all__ = ["ENV", "POINTS", "fault_point"]
