"""CLI: finetune, predict, evaluate, dense-train, dense-predict (through cli.finetune's commands)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from _mim_tiny import SAMPLE, SAMPLE_IMAGES, SAMPLE_MASKS

from mim_workbench.cli import main
from mim_workbench.cli.finetune import COMMANDS as FINETUNE_COMMANDS

ARCH = ["--img-size", "64", "--embed-dim", "64", "--depth", "2", "--num-heads", "2"]


def test_commands_are_add_functions():
    assert [f.__name__ for f in FINETUNE_COMMANDS] == ["_add_finetune", "_add_predict", "_add_dense_train",
                                                     "_add_dense_predict"]


def test_registers_beside_the_existing_commands():
    from mim_workbench import cli

    assert all(add in cli.COMMANDS for add in FINETUNE_COMMANDS)
    parser, runners = cli.build_parser()  # argparse raises on a duplicate name
    assert {"finetune", "predict", "evaluate", "dense-train", "dense-predict", "pretrain"} <= set(runners)


def test_finetune_then_predict(tmp_path, capsys):
    torch.set_num_threads(1)
    rc = main(["finetune", "--checkpoint", "scratch", "--data", str(SAMPLE), "--out", str(tmp_path / "ft"),
               "--mode", "full", "--pool", "token", "--epochs", "2", "--batch-size", "4", "--threads", "1", "--quiet",
               *ARCH])
    assert rc == 0
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["pool"] == "token"
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    m = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert out["accuracy"] == m["accuracy"] and {"auc", "ap"} <= set(m) and m["split"] == "test"
    assert main(["predict", "--checkpoint", str(tmp_path / "ft"), "--image", str(SAMPLE_IMAGES / "cxr0000.png"),
                 "--out", str(tmp_path / "p1")]) == 0
    rec = json.loads((tmp_path / "p1" / "predictions.json").read_text())
    assert set(rec["probs"]) == {"COVID-19", "Other pneumonia"}
    assert (tmp_path / "p1" / "cxr0000_map.tif").is_file() and (tmp_path / "p1" / "cxr0000_map.png").is_file()
    assert main(["predict", "--checkpoint", str(tmp_path / "ft"), "--data", str(SAMPLE_IMAGES),
                 "--out", str(tmp_path / "p2"), "--no-maps"]) == 0
    assert len(list(csv.DictReader(open(tmp_path / "p2" / "predictions.csv")))) == 12


def test_dense_train_and_predict(tmp_path, capsys):
    from mim_workbench.io import read_image
    from mim_workbench.training.strokes import simulate_strokes

    (tmp_path / "strokes").mkdir()
    for i, stem in enumerate(("cxr0000", "cxr0058")):
        lungs = read_image(SAMPLE_MASKS / f"{stem}.png").data > 0.5
        np.save(tmp_path / "strokes" / f"{stem}.npy", simulate_strokes({"lung": lungs}, fraction=0.02, seed=i))
    rc = main(["dense-train", "--checkpoint", "random", "--images", str(SAMPLE_IMAGES), "--strokes",
               str(tmp_path / "strokes"), "--out", str(tmp_path / "dense"), "--classes", "lung,outside",
               "--steps", "3", "--crop", "32", "--batch-size", "2", "--threads", "1", "--quiet", *ARCH])
    assert rc == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["images"] == 2 and rec["classes"] == ["lung", "outside"]
    assert main(["dense-predict", "--checkpoint", str(tmp_path / "dense"), "--image",
                 str(SAMPLE_IMAGES / "cxr0124.png"), "--out", str(tmp_path / "dp")]) == 0
    names = {p.name for p in (tmp_path / "dp").iterdir()}
    assert {"predictions.json", "cxr0124_probs.tif", "cxr0124_labels.png", "cxr0124_lung.png"} <= names
    assert main(["dense-predict", "--checkpoint", str(tmp_path / "dense"), "--data", str(SAMPLE_IMAGES),
                 "--out", str(tmp_path / "dpf")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "dpf" / "predictions.csv")))
    assert len(rows) == 12 and "fraction_lung" in rows[0]


@pytest.mark.parametrize("argv, needle", [
    (["finetune", "--checkpoint", "/no/such/ckpt", "--data", str(SAMPLE), "--out", "x"], "no such checkpoint"),
    (["dense-predict", "--checkpoint", "/no/such", "--image", "x.png", "--out", "y"], "no such checkpoint"),
    (["evaluate", "--data", str(SAMPLE), "--out", "z", "--fractions", "0,abc"], "--fractions"),
])
def test_user_errors_are_one_line_exit_2(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
