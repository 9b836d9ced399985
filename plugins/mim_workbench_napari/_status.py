"""Status lines for the docks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import FileEdit, Label

if TYPE_CHECKING:
    from magicgui.widgets import PushButton
    from napari.qt.threading import FunctionWorker, GeneratorWorker


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


def short_path(path: str | Path, max_chars: int = 48) -> str:
    """``path`` elided in the middle to at most ``max_chars``, keeping its last parts.

    For one-line messages (napari's notifications collapse to one elided line): the end of
    a path (run folder, checkpoint) is what tells two apart.
    """
    text = str(path)
    if len(text) <= max_chars:
        return text
    keep = max_chars - 1
    head = keep // 3
    return f"{text[:head]}…{text[len(text) - (keep - head):]}"


def checkpoint_phrase(path: str | Path) -> str:
    """``"ckpt-800 in …/runs/run"``: a checkpoint named first, then its run folder elided,
    so that the one line a notification shows says which checkpoint it was."""
    path = Path(path)
    return f"{path.name} in {short_path(path.parent, 40)}"


def path_edit(placeholder: str = "", **kwargs) -> FileEdit:
    """A magicgui ``FileEdit`` whose path is elided in the middle while it is not being edited,
    with the full path as its tooltip.

    The visible field is superqt's eliding line edit; magicgui's own line edit stays the one
    source of the value (hidden), so ``.value`` and ``.changed`` behave as usual.
    ``placeholder`` is shown while the field is empty: what to put there.
    """
    from qtpy.QtCore import Qt
    from superqt import QElidingLineEdit

    edit = FileEdit(**kwargs)
    inner = edit.line_edit.native
    shown = QElidingLineEdit()
    shown.setElideMode(Qt.TextElideMode.ElideMiddle)
    shown.setPlaceholderText(placeholder)
    edit.native.layout().replaceWidget(inner, shown)
    inner.hide()

    def from_value(text: str) -> None:
        """Show ``text`` elided (magicgui's "." as empty); the tooltip is all of it, or the placeholder."""
        text = "" if text == "." else text  # magicgui writes an empty path as "."
        if shown.text() != text:
            shown.setText(text)
        shown.setToolTip(text or placeholder)

    inner.textChanged.connect(from_value)
    shown.editingFinished.connect(lambda: inner.setText(shown.text()))
    from_value(inner.text())
    return edit


def start_job(work: Callable[..., Any], *args: Any, on_yield: Callable[[Any], None], on_done: Callable[[Any], None],
              on_error: Callable[[Exception], None], on_finished: Callable[[], None]
              ) -> FunctionWorker | GeneratorWorker:
    """A napari thread worker running the generator function ``work(*args)``, wired and
    started: what it yields goes to ``on_yield``, what it returns to ``on_done``, an error to
    ``on_error``; ``on_finished`` runs after either. How the docks run a background job (tiled
    maps, folder proposals, region learning)."""
    from napari.qt.threading import create_worker

    worker = create_worker(work, *args, _ignore_errors=True)   # errors are reported through on_error
    worker.yielded.connect(on_yield)
    worker.returned.connect(on_done)
    worker.errored.connect(on_error)
    worker.finished.connect(on_finished)
    worker.start()
    return worker


def job_handlers(owner: Any, *, label: Label, button: PushButton, worker_attr: str,
                 action: str) -> tuple[Callable[[Exception], None], Callable[[], None]]:
    """``(failed, finished)`` handlers of a dock's background job (a napari thread worker).

    ``failed(exc)``: the dock's ``label`` says "<action> failed" and a notification says why;
    ``finished()``: ``button`` is enabled again and ``owner.<worker_attr>`` cleared, after
    success and failure alike.
    """

    def failed(exc: Exception) -> None:
        """``label`` says "<action> failed"; an error notification says why (``exc``)."""
        from napari.utils.notifications import show_error

        label.value = f"{action.lower()} failed"
        show_error(f"{action} failed: {exc}")

    def finished() -> None:
        """``button`` enabled again, ``owner.<worker_attr>`` set to None."""
        button.enabled = True
        setattr(owner, worker_attr, None)

    return failed, finished
