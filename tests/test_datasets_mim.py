"""MIMDataset tensors, fine targets, augmentation and the decode cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_io import ramp, shared_dir, write_dicom, write_png

from mim_workbench.errors import ConfigError
from mim_workbench.io import letterbox, read_image
from mim_workbench.io import cache as cache_mod
from mim_workbench.io.cache import DecodeCache
from mim_workbench.training.mim_dataset import MIMDataset
from mim_workbench.io.datasets import Sample


def _blob(shape: tuple[int, int]) -> np.ndarray:
    """uint8 image that is bright exactly where the mask is (so geometry can be compared)."""
    h, w = shape
    rr, cc = np.mgrid[:h, :w]
    inside = ((rr - 0.4 * h) ** 2 / (0.25 * h) ** 2 + (cc - 0.6 * w) ** 2 / (0.2 * w) ** 2) < 1
    return inside


@pytest.fixture
def samples(tmp_path: Path) -> list[Sample]:
    inside = _blob((150, 300))
    img = (inside * 200 + 30).astype(np.uint8)
    write_png(tmp_path / "a.png", img)
    write_png(tmp_path / "a_mask.png", inside.astype(np.uint8) * 255)
    write_png(tmp_path / "b.png", ramp((120, 90)))
    rgb = np.dstack([ramp((64, 64)), np.zeros((64, 64), np.uint8), ramp((64, 64))[::-1]])
    write_png(tmp_path / "c.png", rgb)
    return [
        Sample(id="a", image=tmp_path / "a.png", mask=tmp_path / "a_mask.png", label="x", patient="1"),
        Sample(id="b", image=tmp_path / "b.png", label="y"),
        Sample(id="c", image=tmp_path / "c.png"),
    ]


def test_shapes_and_ranges_in_chans_1_and_3(samples: list[Sample]) -> None:
    for in_chans in (1, 3):
        ds = MIMDataset(samples, img_size=(192, 256), in_chans=in_chans)
        assert len(ds) == 3 and ds.classes == ["x", "y"]
        for i in range(3):
            item = ds[i]
            assert item["image"].shape == (in_chans, 192, 256) and item["image"].dtype == torch.float32
            assert 0 <= item["image"].min() and item["image"].max() <= 1
            assert item["region"].shape == (192, 256) and item["region"].dtype == torch.float32
            assert item["index"] == i
        a, b, c = ds[0], ds[1], ds[2]
        assert a["has_region"] is True and set(a["region"].unique().tolist()) == {0.0, 1.0}
        assert b["has_region"] is False and b["region"].sum() == 0
        assert (a["label"], b["label"], c["label"]) == (0, 1, -1)
        if in_chans == 3:
            assert torch.equal(b["image"][0], b["image"][2])  # grey repeated
            assert not torch.equal(c["image"][0], c["image"][2])  # colour kept
    batch = next(iter(torch.utils.data.DataLoader(MIMDataset(samples, img_size=64), batch_size=3)))
    assert batch["image"].shape == (3, 1, 64, 64) and batch["has_region"].tolist() == [True, False, False]


def test_region_aligned_with_image(samples: list[Sample]) -> None:
    item = MIMDataset(samples, img_size=(192, 256))[0]
    bright = item["image"][0] > 0.5
    region = item["region"] > 0.5
    assert (bright ^ region).float().mean() < 0.01


def test_fine_is_letterboxed_from_source(samples: list[Sample]) -> None:
    ds = MIMDataset(samples, img_size=(96, 128), fine_scale=2)
    for i in range(2):
        item = ds[i]
        source = read_image(samples[i].image).data
        expected, _ = letterbox(source, (192, 256))
        assert item["fine"].shape == (1, 192, 256)
        np.testing.assert_allclose(item["fine"][0].numpy(), expected, atol=1e-6)
        upsampled = torch.nn.functional.interpolate(item["image"][None], scale_factor=2, mode="bilinear")[0]
        assert not torch.allclose(item["fine"], upsampled, atol=1e-3)


def test_augmentation_reproducible_and_same_geometry(samples: list[Sample]) -> None:
    ds = MIMDataset(samples, img_size=(96, 128), augment=True, seed=5, fine_scale=2)
    first = ds[0]
    again = MIMDataset(samples, img_size=(96, 128), augment=True, seed=5, fine_scale=2)[0]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["region"], again["region"])
    plain = MIMDataset(samples, img_size=(96, 128))[0]
    assert not torch.equal(first["image"], plain["image"])
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["image"], first["image"])
    ds.set_epoch(0)
    assert torch.equal(ds[0]["image"], first["image"])
    for epoch in range(4):
        ds.set_epoch(epoch)
        item = ds[0]
        assert set(item["region"].unique().tolist()) <= {0.0, 1.0}
        image, region = item["image"][0], item["region"] > 0.5
        bright = image > image[region].min() * 0.5 + image[~region & (image > 0)].max() * 0.5
        assert (bright ^ region).float().mean() < 0.02, epoch
        fine_small = torch.nn.functional.avg_pool2d(item["fine"][None], 2)[0, 0]
        assert (fine_small - image).abs().mean() < 0.02
    # No augmentation -> deterministic across epochs.
    still = MIMDataset(samples, img_size=64)
    a = still[1]["image"]
    still.set_epoch(3)
    assert torch.equal(a, still[1]["image"])


def test_padding_stays_zero_under_augmentation(samples: list[Sample]) -> None:
    ds = MIMDataset(samples, img_size=(64, 64), augment=True)
    for epoch in range(3):
        ds.set_epoch(epoch)
        item = ds[0]  # 150 x 300 source -> content 32 x 64, rows 32.. are padding
        assert torch.all(item["image"][:, 32:] == 0) and torch.all(item["region"][32:] == 0)


def test_config_errors(samples: list[Sample]) -> None:
    with pytest.raises(ConfigError):
        MIMDataset(samples, in_chans=2)
    with pytest.raises(ConfigError):
        MIMDataset(samples, img_size=(0, 5))
    with pytest.raises(ConfigError):
        MIMDataset(samples, fine_scale=1.5)


def test_cache_hit_identical_and_modified_file_misses(samples: list[Sample], tmp_path: Path) -> None:
    cache = DecodeCache(tmp_path / "cache")
    ds = MIMDataset(samples, img_size=(48, 64), fine_scale=2, cache=cache)
    miss = ds[0]
    assert len(cache) == 1 and cache.size_bytes() > 0
    hit = ds[0]
    for key in ("image", "region", "fine"):
        assert torch.equal(miss[key], hit[key])
    assert torch.equal(MIMDataset(samples, img_size=(48, 64), fine_scale=2)[0]["image"], miss["image"])
    # Different settings -> a separate entry.
    MIMDataset(samples, img_size=(32, 32), cache=cache)[0]
    assert len(cache) == 2
    # Rewrite the image: the key changes, the stale entry is never used.
    path = samples[0].image
    write_png(path, np.full((150, 300), 7, np.uint8))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fresh = ds[0]
    assert len(cache) == 3
    assert torch.allclose(fresh["image"][0, :10, :10], torch.tensor(7 / 255))
    freed = cache.clear()
    assert freed > 0 and len(cache) == 0


def test_cache_lru_eviction(tmp_path: Path) -> None:
    cache = DecodeCache(tmp_path / "c", max_bytes=3 * 4096 + 2000)
    keys = [DecodeCache.key([], {"n": i}) for i in range(4)]
    noise = np.random.default_rng(0).random(1024).astype(np.float32)  # incompressible
    for k in keys[:3]:
        cache.put(k, {"image": noise})
    old = os.path.getatime(cache._entry(keys[1]) / cache_mod._MARKER)
    for age, k in zip((300, 200, 100), keys[:3]):  # keys[0] oldest, then keys[1], keys[2]
        os.utime(cache._entry(k) / cache_mod._MARKER, (old - age, old - age))
    assert cache.get(keys[0]) is not None  # touch: now most recently used
    cache.put(keys[3], {"image": noise})
    assert cache.size_bytes() <= cache.max_bytes
    assert cache.get(keys[0]) is not None and cache.get(keys[3]) is not None
    assert cache.get(keys[1]) is None  # least recently used went first
    assert cache.get(keys[2]) is not None


def test_cache_returns_the_stored_arrays_as_fresh_copies(tmp_path: Path) -> None:
    """Same dtypes, shapes and values as stored; writable, and editing one hit never changes the next."""
    cache = DecodeCache(tmp_path / "c")
    rng = np.random.default_rng(1)
    arrays = {"image": rng.random((48, 64), dtype=np.float32), "region": (rng.random((48, 64)) > 0.5).astype(np.uint8),
              "fine": rng.random((96, 128, 3), dtype=np.float32), "geometry": np.arange(6, dtype=np.int64)}
    key = DecodeCache.key([], {"t": 1})
    assert cache.get(key) is None
    cache.put(key, arrays)
    hit = cache.get(key)
    assert hit is not None and set(hit) == set(arrays)
    for name, a in arrays.items():
        assert hit[name].dtype == a.dtype and hit[name].shape == a.shape and np.array_equal(hit[name], a)
        assert hit[name].flags.writeable
    hit["image"][:] = 0
    assert np.array_equal(cache.get(key)["image"], arrays["image"])


def test_cache_damaged_entry_misses_and_old_layout_is_evicted(tmp_path: Path) -> None:
    cache = DecodeCache(tmp_path / "c")
    key = DecodeCache.key([], {"t": 2})
    cache.put(key, {"image": np.ones((4, 4), np.float32)})
    (cache._entry(key) / "image.npy").write_bytes(b"not an array")   # damaged under us
    assert cache.get(key) is None
    (cache._entry(key) / "image.npy").unlink()
    assert cache.get(key) is None
    # A format-1 (zarr) entry left by an older version: counted and evicted, never read.
    old = tmp_path / "c" / "ab" / ("ab" + "0" * 62 + ".zarr")
    old.mkdir(parents=True)
    (old / "zarr.json").write_text("{}")
    (old / "blob").write_bytes(b"x" * 5000)
    assert len(cache) == 2
    cache.evict(target_bytes=100)
    assert not old.exists()


def test_mim_dataset_cached_items_equal_uncached(samples: list[Sample], tmp_path: Path) -> None:
    """Through MIMDataset, with augmentation: the cached pipeline gives the decoding pipeline's tensors."""
    cache = DecodeCache(tmp_path / "cache")
    plain = MIMDataset(samples, img_size=(48, 64), fine_scale=2, augment=True, seed=3)
    cached = MIMDataset(samples, img_size=(48, 64), fine_scale=2, augment=True, seed=3, cache=cache)
    for i in range(len(samples)):
        cached[i]                      # fill
    for i in range(len(samples)):
        a, b = plain[i], cached[i]
        for key in ("image", "region", "fine"):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (i, key)


def test_default_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MIM_WORKBENCH_CACHE", str(tmp_path / "here"))
    assert DecodeCache().root == tmp_path / "here" / "decoded"  # same base as the sample-data cache
    monkeypatch.delenv("MIM_WORKBENCH_CACHE")
    assert DecodeCache().root == Path.home() / ".cache" / "mim-workbench" / "decoded"


def test_dicom_samples_and_shared_set(tmp_path: Path) -> None:
    write_dicom(tmp_path / "d", ramp((40, 30), np.uint16, top=3000), photometric="MONOCHROME1", window=(1500, 3000))
    item = MIMDataset([Sample(id="d", image=tmp_path / "d")], img_size=32)[0]
    assert item["image"].shape == (1, 32, 32) and item["image"][0, 0, 0] > 0.9  # inverted
    from mim_workbench.io.datasets import discover

    idx = discover(shared_dir("cxr_covid_v7labs"))
    with_mask = [s for s in idx.samples if s.mask is not None][:2]
    ds = MIMDataset(with_mask, img_size=(224, 224), in_chans=3, classes=idx.classes, augment=True)
    for i in range(2):
        item = ds[i]
        assert item["image"].shape == (3, 224, 224) and item["has_region"] and item["region"].sum() > 100
        assert item["label"] == idx.classes.index(with_mask[i].label)
