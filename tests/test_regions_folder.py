"""Region masks for a whole folder: masks the dataset readers pair with their images, a run
that continues after an interruption, settings that cannot be mixed, implausible masks
flagged, unreadable images named and skipped, a contact sheet for a visual check."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mim_workbench.io.masks import read_mask
from PIL import Image

from mim_workbench.errors import ConfigError, MimError
from mim_workbench.io.datasets import discover
from mim_workbench.regions.folder import MANIFEST, contact_sheet, propose_folder, quality_flag


@pytest.fixture
def folder(tmp_path, sample_root) -> Path:
    """Four sample X-rays in a flat folder, no masks."""
    out = tmp_path / "xrays"
    out.mkdir()
    for name in ("cxr0000.png", "cxr0058.png", "cxr0059.png", "cxr0124.png"):
        shutil.copy(sample_root / "images" / name, out / name)
    return out


def test_masks_pair_with_their_images_and_describe_the_region(folder, tmp_path):
    out = tmp_path / "masks"
    records = list(propose_folder(folder, out, preset="lungs"))
    assert [Path(r["image"]).name for r in records] == sorted(p.name for p in folder.iterdir())
    assert all(0.15 < r["area_fraction"] < 0.6 and r["flag"] is None for r in records)
    index = discover(folder, masks=out)
    assert index.n_masks == 4 and all(s.mask == out / s.image.name for s in index.samples)
    assert json.loads((out / MANIFEST).read_text())["preset"] == "lungs"


def test_an_interrupted_run_continues_where_it_stopped(folder, tmp_path):
    out = tmp_path / "masks"
    first = propose_folder(folder, out, preset="lungs")
    done = [next(first), next(first)]
    first.close()  # the run is stopped after two images
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert sorted(before) == sorted(Path(r["mask"]).name for r in done)
    again = list(propose_folder(folder, out, preset="lungs"))
    assert [r["reused"] for r in again] == [True, True, False, False]
    assert all(before[n] == (out / n).stat().st_mtime_ns for n in before), "kept masks are not rewritten"


def test_a_folder_written_with_other_settings_is_refused_unless_overwrite(folder, tmp_path):
    out = tmp_path / "masks"
    list(propose_folder(folder, out, preset="lungs"))
    with pytest.raises(MimError, match="other settings.*--overwrite"):
        next(propose_folder(folder, out, preset="lungs", options={"method": "atlas"}))
    records = list(propose_folder(folder, out, preset="lungs", options={"method": "atlas"}, overwrite=True))
    assert not any(r["reused"] for r in records)
    with pytest.raises(ConfigError, match="bones"):
        next(propose_folder(folder, out, preset="bones"))


def test_an_unreadable_image_is_named_and_skipped(folder, tmp_path):
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    records = list(propose_folder(folder, tmp_path / "masks", preset="lungs"))
    bad = [r for r in records if "error" in r]
    assert len(bad) == 1 and bad[0]["image"].endswith("broken.png") and "broken.png" in bad[0]["error"]
    assert sum("mask" in r for r in records) == 4


def test_implausible_masks_are_flagged():
    h, w = 200, 200
    empty = np.zeros((h, w), np.uint8)
    both = empty.copy()
    both[40:170, 20:90] = 1
    both[40:170, 110:180] = 1
    one = both.copy()
    one[:, 100:] = 0
    speckled = both.copy()
    speckled[50:160:30, 95:105] = 1  # small blobs between the lungs do not count as parts
    fragmented = empty.copy()
    for r in range(4):
        fragmented[20 + 45 * r:55 + 45 * r, 20:90] = 1
        fragmented[20 + 45 * r:55 + 45 * r, 110:180] = 1
    assert quality_flag(both, "lungs") is None
    assert quality_flag(empty, "lungs") == "empty"
    assert quality_flag(one, "lungs") == "one lung missing"
    assert quality_flag(speckled, "lungs") is None
    assert quality_flag(fragmented, "lungs") == "fragmented"
    assert quality_flag(np.ones((h, w), np.uint8), "lungs") == "too large"
    tiny = empty.copy()
    tiny[90:100, 90:100] = 1
    assert quality_flag(tiny, "lungs") == "too small"


def test_contact_sheet_shows_flagged_masks_first(folder, tmp_path):
    records = list(propose_folder(folder, tmp_path / "masks", preset="lungs"))
    records[-1] = {**records[-1], "flag": "one lung missing"}  # as if the check had found it
    sheet = np.asarray(Image.open(contact_sheet(records, tmp_path / "sheet.png", thumb=96, columns=2)))
    assert sheet.shape == (2 * (96 + 14), 2 * 96, 3)
    first = sheet[:96, :96]
    red = (first[..., 0] > 200) & (first[..., 1] < 100)
    green = (first[..., 1] > 200) & (first[..., 0] < 100)
    assert red.sum() > 50 and not green.any(), "the flagged image comes first, outlined in red"
    second = sheet[:96, 96:]
    assert ((second[..., 1] > 200) & (second[..., 0] < 100)).sum() > 50, "the others are outlined in green"


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mim_workbench.cli", "regions", "propose", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_cli_prints_json_lines_and_writes_a_contact_sheet(folder, tmp_path):
    (folder / "text.png").write_bytes(b"not a picture")  # the folder scan skips it
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # fails when decoded
    out = tmp_path / "masks"
    proc = _cli("--data", str(folder), "--out", str(out))
    assert proc.returncode == 2, "an unreadable image makes the exit code say so"
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 4 and set(lines[0]) == {"image", "mask", "area_fraction", "flag"}
    assert "text.png" in proc.stderr and "broken.png" in proc.stderr and "ETA" in proc.stderr
    assert "5 images, 0 flagged, 1 unreadable" in proc.stderr
    assert (out / "contact_sheet.png").is_file()
    assert "Traceback" not in proc.stderr


def test_cli_run_killed_midway_continues(tmp_path, sample_root):
    data = sample_root / "images"
    out = tmp_path / "masks"
    child = subprocess.Popen([sys.executable, "-m", "mim_workbench.cli", "regions", "propose", "--data", str(data),
                              "--out", str(out), "--sheet", "none", "--quiet", "--workers", "1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    def written() -> list[Path]:   # finished masks: a mask being written is a hidden temporary file
        return [p for p in out.glob("*.png") if not p.name.startswith(".")]

    while len(written()) < 3 and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    # one process, so that no worker outlives the kill and goes on writing masks
    masks = written()
    kept = {p.name: p.stat().st_mtime_ns for p in masks}
    assert 3 <= len(kept) < 12
    # a kill lands between masks or inside one's write: never a half-written mask under its name
    assert all(read_mask(p).shape for p in masks)
    proc = _cli("--data", str(data), "--out", str(out), "--sheet", "none")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 12 and len(list(out.glob("*.png"))) == 12
    assert not list(out.glob(".*.png")), "the partial write of the killed run is cleared"
    assert all((out / n).stat().st_mtime_ns == t for n, t in kept.items())


def test_several_processes_give_the_same_masks_in_the_same_order(folder, tmp_path):
    one = list(propose_folder(folder, tmp_path / "one", preset="lungs"))
    two = list(propose_folder(folder, tmp_path / "two", preset="lungs", workers=2))
    assert [r["image"] for r in one] == [r["image"] for r in two]
    for a, b in zip(one, two):
        assert a["area_fraction"] == b["area_fraction"] and a["flag"] == b["flag"]
        assert np.array_equal(np.asarray(Image.open(a["mask"])), np.asarray(Image.open(b["mask"])))
