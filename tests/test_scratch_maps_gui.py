"""Tiled output maps are scratch: replaced maps go at once, the rest when the dock closes,
a crashed session's leftovers at the next start."""

from __future__ import annotations

import os
import time

import pytest

pytestmark = pytest.mark.gui


def _fake_map(path):
    path.mkdir(parents=True)
    (path / "zarr.json").write_text("{}")
    return path


def test_replaced_and_closed_maps_are_removed(monkeypatch, tmp_path, qapp):
    from mim_workbench_napari._multiscale import ScratchMaps

    monkeypatch.setenv("MIM_WORKBENCH_CACHE", str(tmp_path))
    maps = ScratchMaps("predict")
    first, second, other = (_fake_map(maps.new()) for _ in range(3))
    assert first.parent == tmp_path / "predict" and first.name.endswith(".zarr") and first != second
    maps.show("cxr", first)
    maps.show("mg", other)
    maps.show("cxr", second)
    assert not first.exists(), "a map nothing shows any more is removed at once"
    assert second.exists() and other.exists()
    maps.clear()
    assert not second.exists() and not other.exists() and maps.shown == {}


def test_leftovers_of_a_crashed_session_are_pruned_when_old(monkeypatch, tmp_path, qapp):
    from mim_workbench_napari._multiscale import STALE_AFTER_S, ScratchMaps

    monkeypatch.setenv("MIM_WORKBENCH_CACHE", str(tmp_path))
    root = tmp_path / "inspect"
    old = _fake_map(root / "old.zarr")
    recent = _fake_map(root / "recent.zarr")   # perhaps another viewer's, still open
    past = time.time() - STALE_AFTER_S - 60
    os.utime(old, (past, past))
    ScratchMaps("inspect")
    assert not old.exists() and recent.exists()


def test_closing_the_viewer_removes_the_docks_maps(make_napari_viewer, monkeypatch, tmp_path):
    from mim_workbench_napari._finetune_widget import FinetuneWidget
    from mim_workbench_napari._inspect_widget import InspectWidget

    monkeypatch.setenv("MIM_WORKBENCH_CACHE", str(tmp_path))
    viewer = make_napari_viewer()
    docks = [InspectWidget(viewer), FinetuneWidget(viewer)]
    made = []
    for w in docks:
        viewer.window.add_dock_widget(w)
        made.append(_fake_map(w.maps.new()))
        w.maps.show("img", made[-1])
    viewer.close()
    from qtpy.QtCore import QCoreApplication, QEvent

    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    assert not any(p.exists() for p in made)
