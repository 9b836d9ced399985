"""Status lines for the docks."""

from __future__ import annotations

from magicgui.widgets import Label


def status_label(value: str = "") -> Label:
    """A label whose text wraps instead of widening its dock.

    A long line ("step 12/1000  loss …  ETA …") widened the Pretrain dock once training
    started, which shrank the canvas under the user's cursor and made napari redraw it at the
    new size: a 60 ms stall of the viewer on software GL (bench_gui_latency.py).
    """
    from qtpy.QtWidgets import QSizePolicy

    label = Label(value=value)
    label.native.setWordWrap(True)
    # the dock's width comes from its other widgets: a wrapped label still asks for a wide line
    label.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    return label
