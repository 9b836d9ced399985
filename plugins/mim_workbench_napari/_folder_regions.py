"""The Workbench dock's folder panel: propose a region for every image of a folder.

The work is :func:`mim_workbench.regions.folder.propose_folder`, the same code as
``mim-workbench regions propose``, run in a napari thread worker; when it ends, the proposals
its quality check flagged open first, each image with its mask as an editable region layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import Container, ProgressBar, PushButton, SpinBox

from ._status import job_handlers, path_edit, short_path, start_job, status_label

if TYPE_CHECKING:
    from mim_workbench.regions.folder import FolderProgress

#: flagged proposals opened for correction after a folder run (the rest are in the contact sheet)
OPEN_FLAGGED = 4


class FolderRegionsPanel:
    """Mixed into the Workbench dock, which has ``viewer``, ``preset`` and ``open_with_region``;
    :meth:`_build_folder_panel` makes the panel's widgets and returns them in a container."""

    def _build_folder_panel(self) -> Container:
        self.folder = path_edit(label="Folder", mode="d", placeholder="a folder of images (any layout)")
        self.folder_out = path_edit(label="Masks to", mode="d", placeholder="where the masks go: OUT/<image>.png")
        self.open_flagged = SpinBox(label="Open flagged", min=0, max=50, value=OPEN_FLAGGED)
        self.folder_button = PushButton(text="Propose for folder")
        self.folder_progress = ProgressBar(label="Folder", min=0, max=1, value=0, visible=False)
        self.folder_status = status_label("")
        self.folder_worker = None
        self._folder_failed, self._folder_done = job_handlers(
            self, label=self.folder_status, button=self.folder_button, worker_attr="folder_worker",
            action="Folder proposal")
        self.folder_button.changed.connect(self.propose_folder)
        return Container(widgets=[self.folder, self.folder_out, self.open_flagged, self.folder_button,
                                  self.folder_progress, self.folder_status], labels=True)

    def propose_folder(self) -> None:
        """Start the folder run in a thread worker (one at a time)."""
        from napari.utils.notifications import show_error

        data, out = str(self.folder.value), str(self.folder_out.value)
        if data in ("", ".") or out in ("", "."):
            show_error("Choose a folder of images and a folder for the masks.")
            return
        if self.folder_worker is not None:
            return
        preset = self.preset.value
        if preset == "learned model":
            from mim_workbench.regions.folder import model_source

            preset = model_source(self.region_model_path)
        self.folder_button.enabled = False
        self.folder_progress.visible = True
        self.folder_status.value = f"proposing {self.preset.value} for {short_path(data)}…"
        self.folder_worker = start_job(_folder_job, data, out, preset, on_yield=self._folder_step,
                                       on_done=lambda records: self._folder_finished(records, out),
                                       on_error=self._folder_failed, on_finished=self._folder_done)

    def _folder_step(self, progress: FolderProgress) -> None:
        self.folder_progress.max = max(1, progress.total)
        self.folder_progress.value = progress.done
        eta = "" if progress.eta_s is None else f", about {int(progress.eta_s) + 1} s left"
        self.folder_status.value = f"{progress.done}/{progress.total} images{eta}"

    def _folder_finished(self, records: list[dict[str, Any]], out: str) -> None:
        from napari.utils.notifications import show_info, show_warning

        flagged = [r for r in records if r.get("flag")]
        unreadable = [r for r in records if "error" in r]
        self.folder_progress.visible = False
        self.folder_status.value = (f"{len(records)} images: {len(flagged)} flagged, {len(unreadable)} unreadable; "
                                    f"masks and contact_sheet.png in {out}")
        for record in unreadable:
            show_warning(f"Skipped: {record['error']}")
        for record in flagged[: self.open_flagged.value]:
            self.open_with_region(record["image"], record["mask"])
        show_info(f"Proposed {len(records) - len(unreadable)} masks, {len(flagged)} flagged"
                  + (f"; the first {min(len(flagged), self.open_flagged.value)} are open to correct" if flagged else ""))


def _folder_job(data: str, out: str, preset: str):
    """Generator for the thread worker: yields progress, returns the records and writes the sheet."""
    from mim_workbench.regions.folder import contact_sheet, propose_folder

    pending: list[FolderProgress] = []
    records = []
    for record in propose_folder(data, out, preset=preset, on_progress=pending.append):
        records.append(record)
        while pending:
            yield pending.pop(0)
    if any("mask" in r for r in records):
        contact_sheet(records, Path(out) / "contact_sheet.png")
    return records
