"""Widgets the training docks share: the device list, the ETA format and the loss curve."""

from __future__ import annotations

import math


def detected_devices() -> list[str]:
    """Devices to offer: auto, cpu, then cuda and mps where this machine has them."""
    import torch

    found = ["auto", "cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def fmt_eta(seconds: float | None) -> str:
    """``h:mm:ss`` or ``m:ss``; an en dash when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "–"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def decimate(xs: list, ys: list, bins: int) -> tuple[list, list]:
    """At most ``bins`` points: means of consecutive runs.

    Why: a repaint costs time in the GUI thread per point drawn; an overnight run has
    tens of thousands of steps, and a 20-minute soak showed the paint growing to
    ~30 ms (p99 event-loop gaps of 50 ms) before the curve was thinned to its width.
    """
    n = len(xs)
    if n <= bins:
        return xs, ys
    import numpy as np

    edges = np.linspace(0, n, bins + 1).astype(int)
    x = np.add.reduceat(np.asarray(xs, dtype=float), edges[:-1]) / np.diff(edges)
    y = np.add.reduceat(np.asarray(ys, dtype=float), edges[:-1]) / np.diff(edges)
    return x.tolist(), y.tolist()


class LossPlot:
    """Train and val loss curves painted with QPainter.

    matplotlib redraws took ~100 ms in the GUI thread and showed up as stalls of the
    viewer while training; painting two polylines costs well under a millisecond.
    """

    def __init__(self) -> None:
        from qtpy.QtWidgets import QWidget

        plot = self

        class _Canvas(QWidget):
            def paintEvent(self, event) -> None:  # noqa: N802 (Qt's name)
                """Draw the curves."""
                plot._paint(self)

        self.canvas = _Canvas()
        self.canvas.setMinimumHeight(140)
        self.train: tuple[list[int], list[float]] = ([], [])
        self.val: tuple[list[int], list[float]] = ([], [])

    def clear(self) -> None:
        """Forget both curves and repaint."""
        self.train = ([], [])
        self.val = ([], [])
        self.canvas.update()

    def add(self, step: int, loss: float, val_loss: float | None) -> None:
        """Add a step's training loss (and validation loss, when given); non-finite values are left out."""
        if math.isfinite(loss):
            self.train[0].append(step)
            self.train[1].append(loss)
        if val_loss is not None and math.isfinite(val_loss):
            self.val[0].append(step)
            self.val[1].append(val_loss)
        # repainted by the dock when it shows progress (at most once a second)

    def _paint(self, widget) -> None:
        from qtpy.QtCore import QPointF
        from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF

        p = QPainter(widget)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        w, h = widget.width(), widget.height()
        left, right, top, bottom = 46, 8, 8, 18
        p.fillRect(0, 0, w, h, QColor(30, 33, 40))
        p.setPen(QPen(QColor(150, 150, 150)))
        p.drawRect(left, top, w - left - right, h - top - bottom)
        xs = self.train[0] + self.val[0]
        ys = self.train[1] + self.val[1]
        if not xs:
            p.drawText(left + 6, top + 16, "loss (train, val) appears here")
            p.end()
            return
        x0, x1 = min(xs), max(max(xs), min(xs) + 1)
        y0, y1 = min(ys), max(ys)
        if y1 - y0 < 1e-12:
            y0, y1 = y0 - 0.5, y1 + 0.5
        sx = (w - left - right) / (x1 - x0)
        sy = (h - top - bottom) / (y1 - y0)

        def points(series):
            """The series decimated to the plot's width, in widget coordinates."""
            xs_, ys_ = decimate(*series, max(1, w - left - right))
            return QPolygonF([QPointF(left + (x - x0) * sx, top + (y1 - y) * sy) for x, y in zip(xs_, ys_)])

        p.drawText(2, top + 10, f"{y1:.3g}")
        p.drawText(2, h - bottom, f"{y0:.3g}")
        p.drawText(left, h - 4, f"step {x0}")
        p.drawText(w - right - 70, h - 4, f"step {x1}")
        p.setPen(QPen(QColor(90, 170, 255), 1.5))
        p.drawPolyline(points(self.train))
        if self.val[0]:
            p.setPen(QPen(QColor(255, 160, 60), 2))
            p.drawPolyline(points(self.val))
            dots = points(self.val)
            if len(dots) <= 200:  # markers only while they stay apart
                for pt in dots:
                    p.drawEllipse(pt, 2.5, 2.5)
        p.setPen(QPen(QColor(90, 170, 255)))
        p.drawText(w - right - 90, top + 14, "train")
        p.setPen(QPen(QColor(255, 160, 60)))
        p.drawText(w - right - 45, top + 14, "val")
        p.end()
