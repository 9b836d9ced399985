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


def test_a_map_being_written_stops_at_its_next_band_and_goes_when_closed(monkeypatch, tmp_path, qapp):
    from mim_workbench_napari._multiscale import ScratchMaps

    monkeypatch.setenv("MIM_WORKBENCH_CACHE", str(tmp_path))
    maps = ScratchMaps("predict")
    out = maps.new()
    written, closed = [], []

    def writer():                   # a tiled writer: one file per band
        try:
            for k in range(10):
                out.mkdir(parents=True, exist_ok=True)
                (out / f"band{k}").write_text("x")
                written.append(k)
                yield k
        finally:
            closed.append(True)

    bands = maps.stream(out, lambda stats: writer())
    assert [next(bands)[0], next(bands)[0]] == [0, 1]
    maps.show("img", out)
    maps.clear()                    # the dock or the viewer closes while band 2 is being written
    assert list(bands) == [], "no band is handed on after closing"
    assert closed and len(written) < 10, "the writer was stopped, not run to the end"
    assert not out.exists(), "the partial map is removed"

    finished = ScratchMaps("predict")
    done = finished.new()
    assert [band for band, _ in finished.stream(done, lambda stats: iter([0, 1]))] == [0, 1]


def test_closing_mid_prediction_cuts_the_tiled_prediction_short(make_napari_viewer, qtbot, tmp_path, monkeypatch,
                                                                sample_root):
    import numpy as np
    from _mim_tiny import tiny_classifier

    import mim_workbench_napari._multiscale as multiscale
    from mim_workbench_napari._finetune_widget import FinetuneWidget

    monkeypatch.setenv("MIM_WORKBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(multiscale, "TILED_THRESHOLD_PIXELS", 500_000)
    checkpoint = tiny_classifier(tmp_path / "clf", sample_root, epochs=1)
    viewer = make_napari_viewer()
    w = FinetuneWidget(viewer)
    big = np.full((2400, 900), 0.4, dtype=np.float32)
    w.image.value = viewer.add_image(big, name="big")
    w.model.value = checkpoint
    w.predict()
    qtbot.waitUntil(lambda: len(w.band_updates) >= 1, timeout=60_000)
    out = w.maps.shown["big"]
    w.maps.clear()                 # what closing the dock or the viewer does
    qtbot.waitUntil(lambda: w.predict_worker is None, timeout=60_000)
    assert w.band_updates[-1][1] < big.shape[0], "it stopped before the last band"
    assert not out.exists() and not list((tmp_path / "cache" / "predict").glob("*.zarr"))
