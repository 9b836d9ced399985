"""``mim-workbench pretrain | reconstruct | export | cache`` end to end on a tiny model."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from _mim_tiny import SAMPLE_IMAGES, SAMPLE_MASKS, tiny_cli_flags
from PIL import Image

from mim_workbench.cli import main
from mim_workbench.cli.control import StopOnSignal
from mim_workbench.cli.pretrain import pretrain_config_from_args
from mim_workbench.training import events as ev
from mim_workbench.training.progress import ProgressPrinter


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    rc = main(["pretrain", "--data", str(SAMPLE_IMAGES), "--masks", str(SAMPLE_MASKS), "--strategy", "region",
               "--max-steps", "2", "--epochs", "1", "--out", str(out), *tiny_cli_flags()])
    assert rc == 0
    return out


def test_pretrain_writes_a_run(run_dir, capsys):
    assert (run_dir / "latest").read_text().strip() == "ckpt-2"
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["strategy"] == "region" and cfg["encoder"]["img_size"] == [64, 64] and cfg["max_steps"] == 2


def test_reconstruct_writes_pictures_and_metrics(run_dir, tmp_path, capsys):
    out = tmp_path / "recon"
    image = SAMPLE_IMAGES / "cxr0058.png"
    rc = main(["reconstruct", "--checkpoint", str(run_dir / "ckpt-2" / "model.safetensors"), "--image", str(image),
               "--mask", str(SAMPLE_MASKS / "cxr0058.png"), "--ratio", "0.5", "--seed", "1", "--out", str(out)])
    assert rc == 0
    for name in ("masked", "reconstruction", "recon_plus_visible", "image"):
        im = Image.open(out / f"{name}.png")
        assert im.mode == "L" and im.size == (64, 64)
    assert Image.open(out / "error.png").mode == "RGB"
    m = json.loads((out / "metrics.json").read_text())
    assert {"mse", "psnr", "mse_baseline", "psnr_baseline", "ratio", "strategy", "checkpoint", "image"} <= set(m)
    assert m["ratio"] == 0.5 and m["strategy"] == "region" and m["checkpoint"].endswith("ckpt-2")
    assert m["mse"] > 0 and m["mse_baseline"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mse"] == m["mse"]


def test_export_is_timm_loadable(run_dir, tmp_path, capsys):
    import safetensors.torch
    import timm

    out = tmp_path / "encoder.safetensors"
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    from mim_workbench.models import read_export_metadata

    meta = read_export_metadata(out)
    enc = timm.create_model(meta["model"], pretrained=False, **json.loads(meta["timm_kwargs"]))
    enc.load_state_dict(safetensors.torch.load_file(str(out)), strict=True)


def test_resume_continues_the_run(run_dir, capsys):
    assert main(["pretrain", "--resume", str(run_dir), "--max-steps", "3", "--quiet"]) == 0
    assert (run_dir / "latest").read_text().strip() == "ckpt-3"


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["reconstruct", "--checkpoint", str(tmp_path / "none"), "--image", "x.png", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mim-workbench reconstruct:") and "no such checkpoint" in err[0]
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"batchsize": 3}))
    assert main(["pretrain", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "batchsize" in capsys.readouterr().err


def test_config_file_then_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('data = "a"\nepochs = 3\nmethod = "simmim"\n', encoding="utf-8")
    from mim_workbench.cli import build_parser

    parser, _ = build_parser()
    args = parser.parse_args(["pretrain", "--config", str(f), "--epochs", "7", "--img-size", "96x128",
                              "--time-budget", "5", "--checkpoint-every", "10", "--no-augment", "--out", "o"])
    cfg = pretrain_config_from_args(args)
    assert (cfg.data, cfg.epochs, cfg.method, cfg.encoder.img_size) == ("a", 7, "simmim", (96, 128))
    assert (cfg.time_budget_s, cfg.checkpoint_every, cfg.augment, cfg.out) == (5.0, 10, False, "o")


def test_cache_info_and_clear(tmp_path, capsys):
    root = tmp_path / "cache"
    (root / "ab" / "abcd.zarr").mkdir(parents=True)
    (root / "ab" / "abcd.zarr" / "zarr.json").write_text("{}")
    assert main(["cache", "info", "--dir", str(root)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["entries"] == 1 and info["root"] == str(root)
    assert main(["cache", "clear", "--dir", str(root)]) == 0
    assert json.loads(capsys.readouterr().out)["freed_bytes"] > 0
    assert not (root / "ab").exists()


def _events():
    return [
        ev.Started(run_dir="r", config={"method": "mae", "strategy": "random",
                                        "encoder": {"model": "vit_tiny_patch16_224", "img_size": [64, 64]}},
                   total_steps=40, device="cpu", steps_per_epoch=20, n_train=10, n_val=2, lr=1e-4, stop_at=40,
                   notes=("hello",)),
        *[ev.Progress(step=s, total=40, epoch=0, loss=0.5, lr=1e-4, images_per_s=10.0, eta_s=3.0,
                      val_loss=0.4 if s == 20 else None) for s in range(1, 41)],
        ev.CheckpointSaved(path="r/ckpt-40", step=40),
        ev.Finished(run_dir="r", step=40, last_checkpoint="r/ckpt-40"),
    ]


def test_progress_printer_plain_lines_when_not_a_tty():
    buf = io.StringIO()
    p = ProgressPrinter(buf, tty=False)
    for e in _events():
        p(e)
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("pretrain: mae/random vit_tiny_patch16_224 64x64,") and "note: hello" in lines[1]
    steps = [ln for ln in lines if ln.startswith("step ")]
    assert 15 <= len(steps) <= 25 and "\r" not in buf.getvalue()
    assert any("val 0.4000" in ln for ln in steps) and "ETA 0:03" in steps[-1]
    assert lines[-1].startswith("finished (completed) at step 40")


def test_progress_printer_redraws_one_line_on_a_tty():
    buf = io.StringIO()
    p = ProgressPrinter(buf, tty=True)
    for e in _events():
        p(e)
    text = buf.getvalue()
    assert "\rstep 1/40" in text and text.rstrip().splitlines()[-1].startswith("finished")


def test_first_ctrl_c_requests_a_stop_second_interrupts():
    ctl = StopOnSignal()
    assert not ctl.stop_requested()
    ctl._handle(2, None)
    assert ctl.stop_requested()
    with pytest.raises(KeyboardInterrupt):
        ctl._handle(2, None)


def test_error_png_uses_heat_colours():
    from mim_workbench.inference.reconstruct import heat

    rgb = heat(np.array([[0.0, 0.5, 1.0]]))
    assert rgb.shape == (1, 3, 3) and (rgb[0, 0] == 0).all() and rgb[0, 2].min() > 0.8
