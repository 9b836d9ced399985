"""Evaluate dock: did pretraining on my images make my few labels go further?

A thin skin over :func:`mim_workbench.study.run_study`: the study runs in a child process
(the runner pretraining uses, :mod:`._background`), its progress and time left come back as
events, and when it is done the dock shows the verdict, the AUC table with intervals and
the plot.  Re-starting with the same study folder resumes an interrupted study.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import napari  # the viewer annotation must resolve: napari injects it by type
from magicgui.widgets import ComboBox, Container, FloatSpinBox, LineEdit, ProgressBar, PushButton, Select, SpinBox

from mim_workbench.study.config import DEFAULT_VARIANTS, METHODS
from mim_workbench.training.events import Failed

from ._background import BackgroundRun, RunControls
from ._self_check import arm_from_env
from ._status import path_edit, status_label
from ._training_widgets import detected_devices, fmt_eta

if TYPE_CHECKING:
    from magicgui.widgets import FileEdit

    from mim_workbench.study import StudyFinished, StudyProgress

VARIANTS = ["scratch", *METHODS]
#: where rgmim's region masks come from
REGION_SOURCES = ["propose: lungs", "propose: breast", "propose: teeth", "propose: tissue", "pool's masks folder"]


class _PlotView:
    """The study's plot.png in the dock (``clear`` / ``canvas`` as RunControls expects of a plot)."""

    def __init__(self) -> None:
        from qtpy.QtWidgets import QLabel

        self.canvas = QLabel()
        self.canvas.setMinimumHeight(0)

    def clear(self) -> None:
        """Remove the plot shown."""
        self.canvas.clear()

    def show(self, path: str) -> None:
        """Show the image file at ``path`` scaled to the canvas's width (at least 200 pixels)."""
        from qtpy.QtCore import Qt
        from qtpy.QtGui import QPixmap

        pix = QPixmap(path)
        width = max(200, self.canvas.width() or 360)
        self.canvas.setPixmap(pix.scaledToWidth(width, Qt.TransformationMode.SmoothTransformation))


class EvaluateWidget(RunControls, Container):
    stop_message = "stopping after the current step…"

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        from mim_workbench.sample import paediatric_root

        self.viewer = napari_viewer
        arm_from_env(napari_viewer)
        here = str(paediatric_root())
        self.pool = path_edit(label="Unlabelled pool", mode="d", value=here,
                              placeholder="folder of images to pretrain on (labels ignored)")
        self.data = path_edit(label="Labelled set", mode="d", value=here,
                              placeholder="class folders, labels.csv or a CSV manifest")
        self.external = path_edit(label="External test set", mode="d", value="",
                                  placeholder="optional: another hospital's labelled images, scored only")
        self.variants = Select(label="Variants", choices=VARIANTS, value=list(DEFAULT_VARIANTS))
        self.regions = ComboBox(label="Regions (rgmim)", choices=REGION_SOURCES, value=REGION_SOURCES[0])
        self.masks = path_edit(label="Masks folder", mode="d", value="", placeholder="the pool's region masks")
        self.fractions = LineEdit(label="Label fractions", value="0.1, 0.5, 1")
        self.seeds = SpinBox(label="Seeds", min=1, max=20, value=3)
        self.mode = ComboBox(label="Mode", choices=["probe", "full"], value="probe")
        self.minutes = FloatSpinBox(label="Minutes per variant", min=0.1, max=10000, step=1.0, value=2.0)
        self.out = path_edit(label="Study folder", mode="d",
                             value=str(Path.home() / "mim-workbench-runs" / "study"))
        self.device = ComboBox(label="Device", choices=detected_devices(), value="auto")
        self.start = PushButton(text="Start study")
        self.pause = PushButton(text="Pause")
        self.stop = PushButton(text="Stop")
        self.progress = ProgressBar(label="Progress", min=0, max=1, value=0)
        self.status = status_label("ready: choose the pool, the labelled set and a study folder, then Start "
                                   "(a folder holding this study resumes it)")
        self.verdict = status_label("")
        self.table = status_label("")
        self.extend([self.pool, self.data, self.external, self.variants, self.regions, self.masks, self.fractions,
                     self.seeds, self.mode, self.minutes, self.out, self.device, self.start, self.pause, self.stop,
                     self.progress, self.status, self.verdict, self.table])
        self.plot = _PlotView()
        self.native.layout().addWidget(self.plot.canvas)
        self.start.changed.connect(self.start_study)
        self.pause.changed.connect(self.toggle_pause)
        self.stop.changed.connect(self.stop_training)
        self.regions.changed.connect(self._update_visibility)
        self.variants.changed.connect(self._update_visibility)
        self.job = BackgroundRun(self.on_event, self._on_done)
        self.native.destroyed.connect(self.job.shutdown)
        self.result: StudyFinished | None = None
        self._set_running(False)
        self._update_visibility()

    # ------------------------------------------------------------------ settings
    def _update_visibility(self, *_: Any) -> None:
        rgmim = "rgmim" in (self.variants.value or [])
        self.regions.visible = rgmim
        self.masks.visible = rgmim and self.regions.value == REGION_SOURCES[-1]

    def config_dict(self) -> dict[str, Any]:
        """The StudyConfig the fields describe (checked: a wrong value raises ConfigError)."""
        from mim_workbench.study import StudyConfig
        from mim_workbench.study.config import parse_fractions

        def path(widget: FileEdit) -> str | None:
            """The field's path as text; None when it is empty."""
            text = str(widget.value)
            return None if text in ("", ".") else text

        fractions = parse_fractions(self.fractions.value)
        values: dict[str, Any] = dict(
            data=path(self.data), unlabeled=path(self.pool), test_data=path(self.external), out=path(self.out),
            variants=tuple(self.variants.value or ()), fractions=fractions, seeds=int(self.seeds.value),
            mode=self.mode.value, budget_minutes=float(self.minutes.value), device=self.device.value)
        if "rgmim" in values["variants"]:
            if self.regions.value == REGION_SOURCES[-1]:
                values["masks"] = path(self.masks)
            else:
                values["region_preset"] = self.regions.value.removeprefix("propose: ")
        return StudyConfig(**values).to_dict()

    # ------------------------------------------------------------------ control
    def _settings(self) -> tuple[Any, ...]:
        return (self.pool, self.data, self.external, self.variants, self.regions, self.masks, self.fractions,
                self.seeds, self.mode, self.minutes, self.out, self.device)

    def start_study(self) -> None:
        """Start the study the fields describe (a study folder holding this study resumes it); a MimError
        (e.g. ConfigError) becomes a notification and nothing starts."""
        from napari.utils.notifications import show_error

        from mim_workbench.errors import MimError
        from mim_workbench.study.job import TASK

        try:
            config = self.config_dict()
        except MimError as exc:
            show_error(str(exc))
            return
        self.verdict.value = self.table.value = ""
        self.result = None
        self._launch(TASK, config)

    def _on_done(self) -> None:
        self._set_running(False)

    # ------------------------------------------------------------------ events → widgets
    def on_event(self, event: StudyProgress | StudyFinished | Failed) -> None:
        """Show one study event: progress, the result (with a notification), or the failure; a failure that
        Stop caused says that Start resumes the study."""
        from napari.utils.notifications import show_error, show_info

        from mim_workbench.study import StudyFinished, StudyProgress

        if isinstance(event, StudyProgress):
            self._progress_later(event)
        elif isinstance(event, StudyFinished):
            self._pending_progress = None
            self.progress.value = self.progress.max
            self.show_result(event)
            show_info(f"Study done: {Path(event.files['table_md']).parent}")
        elif isinstance(event, Failed):
            self._pending_progress = None
            stopped = "study stopped" in event.message
            self.status.value = "stopped; Start resumes it" if stopped else "failed; ready"
            if not stopped:
                show_error(f"Study failed: {event.message}")

    def _render_progress(self, event: StudyProgress) -> None:
        self.progress.max = max(1, int(event.total))
        self.progress.value = min(int(event.done), self.progress.max)
        self.status.value = f"{event.stage}: {int(event.done)}/{int(event.total)} done, {fmt_eta(event.eta_s)} left"

    def show_result(self, event: StudyFinished) -> None:
        """The verdict, AUC per variant and fraction with its interval, and the plot."""
        self.result = event
        self.status.value = f"done: {event.files['table_md']}"
        self.verdict.value = event.verdict
        self.table.value = auc_lines(event.table)
        if "plot" in event.files:
            self.plot.show(event.files["plot"])


def auc_lines(table: Sequence[dict[str, Any]]) -> str:
    """One line giving, per variant in table order, the test AUC (mean over seeds) at each label fraction (in %);
    rows without ``auc_mean`` are left out."""
    lines = []
    for v in dict.fromkeys(r["variant"] for r in table):
        cells = [f"{r['fraction'] * 100:g} %: {r['auc_mean']:.3f}" for r in table
                 if r["variant"] == v and r.get("auc_mean") is not None]
        lines.append(f"{v}: " + ", ".join(cells))
    return "AUC (test split, mean over seeds) — " + "; ".join(lines)
