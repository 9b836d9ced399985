"""Fuzzing (hypothesis, bounded): corrupted files never crash the readers with anything
but a one-line ReaderError, and hostile arguments never crash the masking code with
anything but a ConfigError.  (Valid-input invariants of masking: test_masking.py.)"""

from __future__ import annotations

import io
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mim_workbench.errors import ConfigError, ReaderError
from mim_workbench.io import read_image, read_mask

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _seeds() -> dict[str, bytes]:
    """One small valid file per format: the material the mutations start from."""
    import tifffile
    from PIL import Image

    rng = np.random.default_rng(0)
    img8 = rng.integers(0, 255, (24, 20), dtype=np.uint8)
    out = {}
    for fmt, ext in (("PNG", ".png"), ("JPEG", ".jpg")):
        buf = io.BytesIO()
        Image.fromarray(img8).save(buf, format=fmt)
        out[ext] = buf.getvalue()
    buf = io.BytesIO()
    tifffile.imwrite(buf, (img8.astype(np.uint16) * 200), photometric="minisblack")
    out[".tif"] = buf.getvalue()
    buf = io.BytesIO()
    np.save(buf, img8.astype(np.float32) / 255)
    out[".npy"] = buf.getvalue()
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("make_corpus", Path(__file__).parent / "data" / "bad" / "make_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_corpus", mod)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    out[".dcm"] = mod.dicom_bytes((img8.astype(np.uint16) * 16))
    return out


SEEDS = _seeds()
_DIR = Path(tempfile.mkdtemp(prefix="mim-fuzz-"))


@st.composite
def mutated(draw) -> tuple[str, bytes]:
    ext = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[ext])
    for _ in range(draw(st.integers(0, 6))):     # flip bytes anywhere (headers included)
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):                       # truncate
        data = data[: draw(st.integers(0, len(data)))]
    if draw(st.booleans()):                       # trailing junk
        data += draw(st.binary(max_size=64))
    # Sometimes the name lies about the content.
    name_ext = draw(st.sampled_from([ext, ext, ".png", ".dcm", ".tif", ".npy", ""]))
    return name_ext, bytes(data)


def _check_loaded_or_reader_error(fn, path: Path) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fn(path)
    except ReaderError as exc:
        assert exc.path == str(path) and "\n" not in str(exc)
        return
    is_image = hasattr(out, "meta")   # LoadedImage; read_mask returns a bare array
    data = np.asarray(out.data if is_image else out)
    assert data.ndim in (2, 3) and min(data.shape[:2]) >= 1
    if is_image:  # float32 in [0, 1]
        assert data.dtype == np.float32 and np.isfinite(data).all()
        assert 0.0 <= data.min() and data.max() <= 1.0
    else:  # a mask: {0, 1}
        assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1}


@FUZZ
@given(case=mutated(), n=st.integers(0, 10**9))
def test_corrupted_files_give_an_image_or_a_reader_error(case, n):
    ext, data = case
    path = _DIR / f"f{n}{ext}"
    path.write_bytes(data)
    try:
        _check_loaded_or_reader_error(read_image, path)
        _check_loaded_or_reader_error(lambda p: read_mask(p, shape=(24, 20)), path)
    finally:
        path.unlink(missing_ok=True)


@FUZZ
@given(data=st.binary(max_size=400), ext=st.sampled_from([".png", ".dcm", ".tif", ".npy", ".jpg", ""]),
       magic=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"II*\x00", b"\x93NUMPY", b"\xff\xd8\xff",
                              b"\0" * 128 + b"DICM"]), n=st.integers(0, 10**9))
def test_random_bytes_behind_a_real_magic_number(data, ext, magic, n):
    path = _DIR / f"r{n}{ext}"
    path.write_bytes(magic + data)
    try:
        _check_loaded_or_reader_error(read_image, path)
    finally:
        path.unlink(missing_ok=True)


# ====================================================================== masking
anything = st.one_of(st.none(), st.booleans(), st.integers(-3, 12), st.floats(allow_nan=True, allow_infinity=True),
                     st.text(max_size=3), st.tuples(st.integers(-2, 6), st.integers(-2, 6)))


@settings(max_examples=150, deadline=None)
@given(strategy=st.sampled_from(["random", "block", "region", "regoin", None]),
       batch=st.one_of(st.integers(-1, 4), anything), grid=st.one_of(st.tuples(st.integers(-1, 6), st.integers(-1, 6)),
                                                                    anything),
       ratio=st.one_of(st.floats(-0.5, 1.5), anything), region_kind=st.sampled_from(["none", "ok", "nan", "wrong", "empty"]),
       opts=st.dictionaries(st.sampled_from(["min_overlap", "ratio_of", "patch_size", "mask_patch_size", "colour"]),
                            anything, max_size=2),
       seed=st.integers(0, 1000))
def test_masking_with_hostile_arguments_returns_a_mask_or_config_error(strategy, batch, grid, ratio, region_kind,
                                                                        opts, seed):
    from mim_workbench.masking import make_mask

    region = None
    ok_shape = isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1 and \
        isinstance(grid, tuple) and len(grid) == 2 and all(isinstance(g, int) and g >= 1 for g in grid)
    if ok_shape and region_kind != "none":
        g = torch.Generator().manual_seed(seed)
        region = torch.rand(batch, *grid, generator=g)
        if region_kind == "nan":
            region[0, 0, 0] = float("nan")
        elif region_kind == "wrong":
            region = region[:, :1]
        elif region_kind == "empty":
            region = torch.zeros_like(region)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mask = make_mask(strategy, batch, grid, ratio, region=region, generator=torch.Generator().manual_seed(seed),
                             **opts)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    # Accepted: a rectangular bool mask with the same count in every row.
    gh, gw = (int(g) for g in grid)
    assert mask.dtype == torch.bool and tuple(mask.shape) == (int(batch), gh * gw)
    counts = mask.sum(dim=1)
    assert bool((counts == counts[0]).all())
    assert isinstance(ratio, (int, float)) and math.isfinite(float(ratio)) and 0.0 <= float(ratio) <= 1.0


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 70), w=st.integers(1, 70), patch=st.one_of(st.integers(-2, 40), st.floats(), st.none()),
       fill=st.sampled_from(["zeros", "ones", "random", "nan"]), seed=st.integers(0, 99))
def test_patch_coverage_of_odd_masks(h, w, patch, fill, seed):
    """Masks of any size (not multiples of the patch, smaller than one patch) and values."""
    from mim_workbench.masking import patch_coverage

    g = torch.Generator().manual_seed(seed)
    mask = {"zeros": torch.zeros(1, h, w), "ones": torch.ones(1, h, w),
            "random": (torch.rand(1, h, w, generator=g) > 0.5).float(),
            "nan": torch.full((1, h, w), float("nan"))}[fill]
    try:
        cov = patch_coverage(mask, patch)
    except ConfigError:
        return
    assert cov.ndim == 3 and cov.shape[0] == 1
    if fill != "nan":
        assert bool(((cov >= 0) & (cov <= 1)).all())
