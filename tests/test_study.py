"""The pretraining study end to end on the sample data: the three sets kept apart, encoders
reused, an interrupted study resumed, the user's own weights, and clear refusals."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from _mim_tiny import SAMPLE, SAMPLE_MASKS, TINY_MODEL, split_collection

from mim_workbench.cli import main
from mim_workbench.errors import ConfigError
from mim_workbench.study import StudyConfig, StudyFinished, StudyProgress, run_study

PRE = {**TINY_MODEL, "batch_size": 4}
FT = {"epochs": 4, "batch_size": 4}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """A labelled set, an external set (other patients) and a pool holding renamed copies of
    every labelled image plus the masks of the pool's images."""
    root = tmp_path_factory.mktemp("sets")
    labelled, external = split_collection(root)
    pool = root / "pool"
    (pool / "images").mkdir(parents=True)
    (pool / "masks").mkdir()
    for img in (labelled / "images").glob("*.png"):
        shutil.copy(img, pool / "images" / f"u_{img.name}")
        shutil.copy(SAMPLE_MASKS / img.name, pool / "masks" / f"u_{img.name}")
    return {"labelled": labelled, "external": external, "pool": pool}


def _config(sets, out: Path, **kw) -> StudyConfig:
    values = dict(data=str(sets["labelled"]), unlabeled=str(sets["pool"] / "images"), masks=str(sets["pool"] / "masks"),
                  test_data=str(sets["external"]), out=str(out), variants=("scratch", "mae", "rgmim"),
                  fractions=(0.5, 1.0), seeds=2, budget_steps=3, pretrain=PRE, finetune=FT, threads=1,
                  bootstrap=200, test_fraction=0.3)
    values.update(kw)
    return StudyConfig(**values)


@pytest.fixture(scope="module")
def study(sets, tmp_path_factory):
    torch.set_num_threads(1)
    events: list = []
    out = tmp_path_factory.mktemp("study")
    res = run_study(_config(sets, out), on_event=events.append)
    return res, events, out


def test_the_three_sets_stay_apart(study, sets):
    res, _, out = study
    summary = json.loads((out / "summary.json").read_text())
    test_ids = set(summary["data"]["test_ids"])
    # The pool's renamed copies of the labelled test images were found by content and left out.
    assert set(summary["data"]["pool_excluded"]) == {f"u_{i}" for i in test_ids}
    for enc in ("mae", "rgmim"):
        cfg = json.loads((Path(summary["pretraining"][enc]["run_dir"]) / "config.json").read_text())
        assert set(cfg["exclude_ids"]) == {f"u_{i}" for i in test_ids}
        assert cfg["data"] == str(sets["pool"] / "images")
    assert json.loads((Path(summary["pretraining"]["rgmim"]["run_dir"]) / "config.json").read_text())[
        "strategy"] == "region"
    # Every cell trained on labelled train images only and scored the same test split and external set.
    ext_ids = {p.stem for p in (sets["external"] / "images").glob("*.png")}
    for run in (out / "runs").glob("*/*"):
        meta = json.loads(next(run.glob("ckpt-*/meta.json")).read_text())
        assert set(meta["splits"]["test"]) == test_ids
        assert not (set(meta["splits"]["train"]) | set(meta["splits"]["val"])) & (test_ids | ext_ids)
    assert {r["variant"] for r in res.rows} == {"scratch", "mae", "rgmim"} and len(res.rows) == 3 * 2 * 2
    assert all(r["external_auc"] is not None and r["knn_auc"] is not None for r in res.rows)


def test_outputs_intervals_and_verdict(study):
    res, events, out = study
    for name in ("results", "table_md", "plot", "summary"):
        assert Path(res.files[name]).is_file()
    assert Path(res.files["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(Path(res.files["summary"]).read_text())
    diffs = {(d["variant"], d["reference"], d["fraction"]) for d in summary["intervals"]["differences"]}
    assert {("mae", "scratch", 0.5), ("rgmim", "scratch", 1.0), ("rgmim", "mae", 0.5)} <= diffs
    assert summary["external_intervals"]["differences"]
    assert {"torch", "timm", "scikit-learn"} <= set(summary["versions"]) and summary["machine"]["cpu"]
    assert set(summary["data"]["digests"]) == {"labelled", "pool", "external"}
    table_md = Path(res.files["table_md"]).read_text()
    assert res.verdict in table_md and "Against no pretraining, MAE pretraining changed AUC by" in res.verdict
    assert "## Paired AUC differences" in table_md and "| rgmim − mae |" in table_md
    rows = list(csv.DictReader(open(res.files["results"])))
    by_cell = {(r["variant"], float(r["fraction"]), int(r["seed"])): r for r in rows}
    mae = [t for t in res.table if t["variant"] == "mae" and t["fraction"] == 1.0][0]
    assert mae["auc_mean"] == pytest.approx(sum(float(by_cell[("mae", 1.0, s)]["auc"]) for s in (0, 1)) / 2)
    assert isinstance(events[-1], StudyFinished) and events[-1].verdict == res.verdict
    progress = [e for e in events if isinstance(e, StudyProgress)]
    assert progress[-1].done == progress[-1].total == 2 + 12 and all(e.eta_s is not None for e in progress)


def test_an_interrupted_study_resumes_and_encoders_are_reused(study, sets):
    res, _, out = study
    # Lose one cell, as a crash would; everything else is read back.
    shutil.rmtree(out / "runs" / "mae" / "f0.5-s1")
    first_s = json.loads((out / "summary.json").read_text())["wall_s_total"]
    again = run_study(_config(sets, out))
    assert [r["reused"] for r in again.rows].count(False) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["wall_s_total"] == pytest.approx(first_s + summary["wall_s"], abs=0.2), "both runs' time"
    assert summary["pretraining"]["mae"]["reused"] and summary["pretraining"]["rgmim"]["reused"]
    assert [r["auc"] for r in again.rows if r["reused"]] == [r["auc"] for r in res.rows if
                                                             (r["variant"], r["fraction"], r["seed"]) != ("mae", 0.5, 1)]
    with pytest.raises(ConfigError, match="other mode"):
        run_study(_config(sets, out, mode="full"))


def test_a_second_study_reuses_the_first_ones_encoders(study, sets, tmp_path):
    _, _, out = study
    res = run_study(_config(sets, tmp_path / "second", variants=("scratch", "mae"), fractions=(1.0,), seeds=1,
                            encoders=str(out / "encoders")))
    summary = json.loads(Path(res.files["summary"]).read_text())
    assert summary["pretraining"]["mae"]["reused"]
    # another split puts images in the test set that the first study's encoders were pretrained on
    other = run_study(_config(sets, tmp_path / "third", variants=("scratch", "mae"), fractions=(1.0,), seeds=1,
                              encoders=str(out / "encoders"), test_fraction=0.45))
    mae = json.loads(Path(other.files["summary"]).read_text())["pretraining"]["mae"]
    assert not mae["reused"] and Path(mae["run_dir"]).parent == out / "encoders"
    assert Path(mae["run_dir"]).name.startswith(Path(summary["pretraining"]["mae"]["run_dir"]).name + "-x")


def test_the_users_own_weights_are_probed_as_they_are_and_continued(study, sets, tmp_path):
    _, _, out = study
    summary = json.loads((out / "summary.json").read_text())
    weights = tmp_path / "hospital.safetensors"
    assert main(["export", "--checkpoint", summary["pretraining"]["mae"]["checkpoint"], "--out", str(weights)]) == 0
    res = run_study(_config(sets, tmp_path / "init", variants=("scratch", f"init={weights}"), fractions=(1.0,),
                            seeds=1, test_data=None))
    assert [r["variant"] for r in res.rows] == ["scratch", "init:hospital", "init:hospital+mae"]
    runs = json.loads(Path(res.files["summary"]).read_text())["pretraining"]
    cfg = json.loads((Path(runs["init:hospital+mae"]["run_dir"]) / "config.json").read_text())
    assert cfg["init"] == str(weights) and runs["init:hospital"] == {"pretrained": False, "init": str(weights)}
    assert "init:hospital+mae" in res.verdict or "Against init:hospital" in res.verdict


def test_bad_input_is_refused_naming_what(sets, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="pretraining pool.*empty: no images found"):
        run_study(_config(sets, tmp_path / "a", unlabeled=str(empty), masks=None))
    with pytest.raises(ConfigError, match=r"fraction 0.01: class .* training image"):
        run_study(_config(sets, tmp_path / "b", fractions=(0.01,)))
    text = (sets["external"] / "labels.csv").read_text()
    other = tmp_path / "other"
    shutil.copytree(sets["external"], other)
    (other / "labels.csv").write_text(text.replace("COVID-19", "Tuberculosis"))
    with pytest.raises(ConfigError, match="Tuberculosis"):
        run_study(_config(sets, tmp_path / "c", test_data=str(other)))
    with pytest.raises(ConfigError, match="variant 'dino'"):
        StudyConfig(variants=("dino",))
    run_study(_config(sets, tmp_path / "d", variants=("scratch",), fractions=(1.0,), seeds=1))
    with pytest.raises(ConfigError, match="data='/nowhere/labelled': no such folder"):   # before 'other data'
        run_study(_config(sets, tmp_path / "d", variants=("scratch",), fractions=(1.0,), seeds=1,
                          data="/nowhere/labelled"))


def test_evaluate_command(sets, tmp_path, capsys):
    torch.set_num_threads(1)
    flags = ["--data", str(SAMPLE), "--seeds", "1", "--budget-steps", "2", "--variants", "scratch,mae",
             "--epochs", "3", "--batch-size", "4", "--threads", "1", "--img-size", "64", "--embed-dim", "64",
             "--depth", "2", "--num-heads", "2", "--decoder-dim", "32", "--decoder-depth", "1",
             "--decoder-heads", "2", "--quiet"]
    rc = main(["evaluate", "--out", str(tmp_path / "ev"), "--fractions", "0.5,1", *flags])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "## AUC with 95 % interval" in printed and "| mae − scratch |" in printed
    assert (tmp_path / "ev" / "plot.png").is_file()
    # another pretraining seed pretrains the encoders again, beside the first ones
    assert main(["evaluate", "--out", str(tmp_path / "ev1"), "--fractions", "1", "--pretrain-seed", "1",
                 "--encoders", str(tmp_path / "ev" / "encoders"), *flags]) == 0
    mae = json.loads((tmp_path / "ev1" / "summary.json").read_text())["pretraining"]["mae"]
    assert not mae["reused"] and json.loads((Path(mae["run_dir"]) / "config.json").read_text())["seed"] == 1
    assert len(list((tmp_path / "ev" / "encoders").glob("mae-*"))) == 2
