"""A progress line driven by training events (the CLI's, the demo's; no GUI needed)."""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

from . import events as ev


class ProgressPrinter:
    """Turns training events into a progress line on ``stream``.

    On a terminal one line is redrawn with ``\\r``; otherwise (logs, CI) plain
    lines are printed, about 20 per run plus every validation.
    """

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._open_line = False
        self._every = 1
        self._last_print = 0.0

    def _line(self, text: str) -> None:
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def __call__(self, event: ev.Event) -> None:
        """Print what ``event`` says (an EventHandler); events of other kinds are ignored."""
        if isinstance(event, ev.Preparing):
            now = time.monotonic()
            if now - self._last_print >= 1.0 or event.done == event.total:
                self._last_print = now
                self._line(f"{event.stage}: {event.done}/{event.total} | ETA {_hms(event.eta_s)}")
        elif isinstance(event, ev.Started):
            c = event.config
            enc = c.get("encoder") or c   # the architecture nests under "encoder" (flat in older runs)
            where = f"{event.device}" + (f" x{event.world_size}" if event.world_size > 1 else "")
            resumed = f", resuming at step {event.start_step}" if event.start_step else ""
            self._line(f"pretrain: {c.get('method')}/{c.get('strategy')} {enc.get('model')} "
                       f"{'x'.join(map(str, enc.get('img_size') or []))}, {event.n_train} train / {event.n_val} val "
                       f"images, {event.total_steps} steps ({event.steps_per_epoch}/epoch), lr {event.lr:.3g}, "
                       f"{where}{', amp ' + event.amp if event.amp != 'off' else ''}{resumed} -> {event.run_dir}")
            for note in event.notes:
                self._line(f"  note: {note}")
            self._every = max(1, event.stop_at // 20)
        elif isinstance(event, ev.Progress):
            text = (f"step {event.step}/{event.total} | epoch {event.epoch} | loss {event.loss:.4f}"
                    + (f" | val {event.val_loss:.4f}" if event.val_loss is not None else "")
                    + "".join(f" | {name} {value:.3f}" for name, value in event.metrics.items())
                    + f" | {event.images_per_s:.1f} img/s | ETA {_hms(event.eta_s)}"
                    + (f" | skipped {event.skipped_steps}" if event.skipped_steps else ""))
            if event.message:
                self._line(f"  {event.message}")
            if self.tty:
                now = time.monotonic()
                if now - self._last_print >= 0.1 or event.step == event.total:
                    self.stream.write("\r" + text.ljust(100)[:120])
                    self.stream.flush()
                    self._open_line = True
                    self._last_print = now
            elif event.step % self._every == 0 or event.val_loss is not None or event.step == event.total:
                self._line(text)
        elif isinstance(event, ev.CheckpointSaved):
            if not self.tty:
                self._line(f"checkpoint: {event.path}")
        elif isinstance(event, ev.Finished):
            self._line(f"finished ({event.reason}) at step {event.step}; checkpoint: {event.last_checkpoint}")
        elif isinstance(event, ev.Failed):
            if self._open_line:
                self._line("")


def _hms(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
