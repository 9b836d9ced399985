"""Every case of the bad-input corpus (tests/data/bad/make_corpus.py) gives a clear,
specific error or its documented recovery, through the API and the command line."""

from __future__ import annotations

import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _bad_corpus import load_corpus
from _mim_tiny import TINY_MODEL, tiny

from mim_workbench import errors
from mim_workbench.cli import main
from mim_workbench.io import info_records, read_image, read_mask, read_path
from mim_workbench.io.datasets import discover
from mim_workbench.training.config import PretrainConfig

corpus = load_corpus()

# Generated at collection (parametrisation needs the case list); removed after the module.
_ROOT = Path(tempfile.mkdtemp(prefix="mim-bad-corpus-"))
CASES = corpus.make_corpus(_ROOT)


@pytest.fixture(scope="module")
def bad_dir():
    yield _ROOT
    shutil.rmtree(_ROOT, ignore_errors=True)


def _by_kind(kind: str):
    return [pytest.param(c, id=c.name) for c in CASES if c.kind == kind]


def _check_error(info, case, path: Path | None) -> None:
    message = str(info.value)
    assert type(info.value).__name__ == case.error or isinstance(info.value, getattr(errors, case.error))
    assert case.expect.lower() in message.lower(), message
    assert "\n" not in message and "Traceback" not in message
    if path is not None:
        assert str(path) in message


@pytest.mark.parametrize("case", _by_kind("image"))
def test_images(bad_dir, case):
    path = bad_dir / case.name
    if case.outcome == "error":
        with pytest.raises(errors.MimError) as info:
            read_image(path)
        _check_error(info, case, path)
        assert info.value.path == str(path)
        # The CLI's `info` and the folder reader report the same thing instead of raising.
        (record,) = list(info_records(path))
        assert case.expect.lower() in record["error"].lower()
    else:
        img = read_image(path)
        data = np.asarray(img.data)
        assert data.dtype == np.float32 and data.ndim == 2
        assert np.isfinite(data).all() and 0.0 <= data.min() <= data.max() <= 1.0
        assert case.expect in " ".join(img.meta.notes)


@pytest.mark.parametrize("name", ["one_pixel.png", "smaller_than_patch.png"])
def test_images_smaller_than_a_patch_cannot_be_reconstructed(bad_dir, name):
    from mim_workbench.inference.reconstruct import reconstruct
    from mim_workbench.models import ModelConfig, build_model

    model = build_model(ModelConfig.from_dict(TINY_MODEL))
    with pytest.raises(errors.ReaderError, match=r"smaller than one 16 px patch; nothing to mask") as info:
        reconstruct(model, bad_dir / name)
    assert info.value.path == str(bad_dir / name)


@pytest.mark.parametrize("case", _by_kind("mask"))
def test_masks(bad_dir, case):
    path = bad_dir / case.name
    if case.outcome == "error":
        with pytest.raises(errors.MimError) as info:
            read_mask(path, shape=corpus.IMAGE_SHAPE)
        _check_error(info, case, path)
        return
    mask = read_mask(path, shape=corpus.IMAGE_SHAPE)
    assert mask.shape == corpus.IMAGE_SHAPE and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    if case.name == "mask_other_size.png":  # nearest resampling: the half-size disc, doubled
        small = read_mask(path)
        assert np.array_equal(mask[::2, ::2], small)
    if case.name == "mask_empty.png":  # documented recovery: random masking, with a warning
        from mim_workbench.masking import make_mask, patch_coverage

        cov = patch_coverage(torch.from_numpy(mask)[None, :64, :64].float(), 16)
        with pytest.warns(UserWarning, match="empty region and were masked at random") as caught:
            m = make_mask("region", 1, (4, 4), 0.5, region=cov, generator=torch.Generator().manual_seed(0))
        assert int(m.sum()) == 8 and caught


@pytest.mark.parametrize("case", _by_kind("dataset"))
def test_datasets_and_labels(bad_dir, case):
    path = bad_dir / case.name
    if case.outcome == "error":
        with pytest.raises(errors.MimError) as info:
            discover(path)
        _check_error(info, case, None)
        assert str(path) in str(info.value)
        return
    index = discover(path)
    assert len(index.samples) == 3
    assert any(case.expect in n for n in index.notes), index.notes
    if case.name == "ds_labels_unknown_ids":
        assert {s.id: s.label for s in index.samples} == {"img0": "a", "img1": "b", "img2": "a"}
    if case.name == "ds_labels_duplicate_same":
        assert {s.id: s.label for s in index.samples} == {"img0": "a", "img1": "b", "img2": None}


def test_region_strategy_refuses_masks_that_match_no_image(bad_dir, tmp_path):
    from mim_workbench.training.pretrain_loop import pretrain

    cfg = PretrainConfig.from_dict(tiny(tmp_path / "run", data=str(bad_dir / "ds_mask_no_overlap"), masks=None,
                                strategy="region"))
    with pytest.raises(errors.ConfigError, match="needs region masks"):
        pretrain(cfg)


def test_pretrain_on_a_folder_with_broken_files(bad_dir, tmp_path):
    """Files whose header already fails are skipped with a note; when the only image fails
    once its pixels are decoded, the run stops with an error naming it."""
    from mim_workbench.training import events as ev
    from mim_workbench.training.pretrain_loop import pretrain

    data = tmp_path / "data"
    data.mkdir()
    for name in ("zero_byte.png", "text.png", "text.dcm", "png_named.tif"):
        (data / name).write_bytes((bad_dir / name).read_bytes())
    for i in range(3):
        (data / f"good{i}.png").write_bytes((bad_dir / "png_named.tif").read_bytes())
    seen: list = []
    result = pretrain(PretrainConfig.from_dict(tiny(tmp_path / "run", data=str(data), masks=None, max_steps=1)),
                      on_event=seen.append)
    assert result.step == 1
    notes = " ".join(next(e for e in seen if isinstance(e, ev.Started)).notes)
    for name in ("zero_byte.png", "text.png", "text.dcm"):
        assert name in notes, notes
    (data / "no_pixels.dcm").write_bytes((bad_dir / "no_pixels.dcm").read_bytes())
    for f in data.glob("good*.png"):
        f.unlink()
    (data / "png_named.tif").unlink()
    with pytest.raises(errors.ReaderError, match=r"no_pixels\.dcm: image header .* but no pixel data"):
        pretrain(PretrainConfig.from_dict(tiny(tmp_path / "run2", data=str(data), masks=None, max_steps=1,
                                        val_fraction=0.0)))


def test_pretraining_goes_on_past_a_file_that_fails_to_decode(bad_dir, tmp_path):
    """A header that promises pixels it lacks passes the dataset scan; training swaps in the
    next readable image (batches keep their size), says which file, once, and keeps a record."""
    from mim_workbench.training import events as ev
    from mim_workbench.training.pretrain_loop import pretrain

    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"good{i}.png").write_bytes((bad_dir / "png_named.tif").read_bytes())
    (data / "no_pixels.dcm").write_bytes((bad_dir / "no_pixels.dcm").read_bytes())
    seen: list = []
    cfg = PretrainConfig.from_dict(tiny(tmp_path / "run", data=str(data), masks=None, strategy="random", epochs=3,
                                batch_size=2, val_fraction=0.0, preview_every=2))
    result = pretrain(cfg, on_event=seen.append)
    progress = [e for e in seen if isinstance(e, ev.Progress)]
    assert result.step == len(progress) == 6, "every planned step ran"
    reported = [u for e in progress for u in e.unreadable]
    assert len(reported) == 1 and "no_pixels.dcm" in reported[0] and "no pixel data" in reported[0]
    assert any("no_pixels.dcm" in (e.message or "") for e in progress)
    assert any(isinstance(e, ev.Preview) for e in seen)
    record = (tmp_path / "run" / "unreadable.txt").read_text().splitlines()
    assert len(record) == 1 and "no_pixels.dcm" in record[0]


def test_dataset_substitutes_an_undecodable_sample_only_when_asked(bad_dir, tmp_path):
    from mim_workbench.training.mim_dataset import MIMDataset

    (tmp_path / "a.png").write_bytes((bad_dir / "png_named.tif").read_bytes())
    (tmp_path / "b.dcm").write_bytes((bad_dir / "no_pixels.dcm").read_bytes())
    samples = sorted(discover(str(tmp_path)).samples, key=lambda s: s.image)   # a.png, b.dcm
    strict = MIMDataset(samples, img_size=32)
    with pytest.raises(errors.ReaderError, match=r"b\.dcm"):
        strict[1]
    lenient = MIMDataset(samples, img_size=32, substitute_unreadable=True)
    item = lenient[1]
    assert item["index"] == 0 and "b.dcm" in item["unreadable"]
    assert torch.equal(item["image"], lenient[0]["image"]) and lenient[0]["unreadable"] == ""
    only_bad = MIMDataset([samples[1]], img_size=32, substitute_unreadable=True)
    with pytest.raises(errors.ReaderError, match=r"b\.dcm"):
        only_bad[0]


@pytest.mark.parametrize("case", _by_kind("config"))
def test_config_files(bad_dir, case):
    path = bad_dir / case.name
    with pytest.raises(errors.ConfigError) as info:
        PretrainConfig.from_file(path)
    _check_error(info, case, None)


@pytest.mark.parametrize("values, named", [
    ({"batch_size": "16"}, "batch_size='16': expected int"), ({"augment": "no"}, "augment='no'"),
    ({"fraction": "all"}, "fraction='all'"), ({"checkpoint": 3}, "checkpoint=3"), ({"epohcs": 3}, "epohcs"),
])
def test_finetune_settings_are_type_checked(values, named):
    from mim_workbench.training.finetune import FinetuneConfig

    with pytest.raises(errors.ConfigError, match=re.escape(named)):
        FinetuneConfig.from_dict(values)


def test_cli_errors_are_one_line_exit_2(bad_dir, capsys):
    assert main(["info", str(bad_dir / "truncated.dcm")]) == 2
    assert main(["pretrain", "--config", str(bad_dir / "config_wrong_type.json"), "--data", "x", "--out", "y"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "truncated.dcm" in err[0] and "batch_size='16'" in err[1]


def test_folder_of_bad_files_reads_what_it_can(bad_dir, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("truncated.png", "text.dcm", "nan.tif", "rgba.png"):
        (folder / name).write_bytes((bad_dir / name).read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # nothing noisy on the way
        loaded = read_path(folder)
    assert [Path(li.meta.source).name for li in loaded] == ["rgba.png"]
    skipped = " ".join(loaded[0].meta.notes)
    assert "skipped truncated.png" in skipped and "skipped text.dcm" in skipped and "skipped nan.tif" in skipped


def test_corpus_covers_every_required_case():
    names = {c.name for c in CASES}
    for needed in ("zero_byte.png", "truncated.png", "truncated.dcm", "no_pixels.dcm", "unsupported_codec.dcm",
                   "png_named.tif", "text.dcm", "stack3d.tif", "rgba.png", "one_pixel.png",
                   "smaller_than_patch.png", "nan.tif", "inf.npy", "mask_other_size.png", "mask_other_aspect.png",
                   "mask_empty.png", "ds_mask_no_overlap", "ds_labels_unknown_ids", "ds_labels_duplicate_conflict",
                   "ds_labels_no_id_column", "config_wrong_type.json", "config_unknown_key.json"):
        assert needed in names
    assert len(CASES) >= 35
