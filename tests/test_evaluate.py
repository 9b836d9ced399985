"""evaluate(): scratch / MAE / region-guided pretraining x fractions x seeds -> CSV, Markdown, plot."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from _mim_tiny import SAMPLE, TINY_MODEL

from mim_workbench.errors import ConfigError
from mim_workbench.training.evaluate import EvaluateConfig, aggregate, evaluate, markdown_table, pixel_auc


def test_evaluate_end_to_end_on_sample_data(tmp_path):
    torch.set_num_threads(1)
    lines: list[str] = []
    pre = {**TINY_MODEL, "batch_size": 4}
    res = evaluate(EvaluateConfig(data=str(SAMPLE), out=str(tmp_path), fractions=(0.1, 1.0), seeds=2,
                                  budget_minutes=0.03, threads=1, pretrain=pre,
                                  finetune={"epochs": 10, "batch_size": 4}), log=lines.append)
    assert len(res.rows) == 3 * 2 * 2
    assert {r["variant"] for r in res.rows} == {"scratch", "mae", "rgmim"}
    for name in ("results", "table_csv", "table_md", "plot", "summary"):
        assert (tmp_path / res.files[name].split("/")[-1]).is_file()
    table = list(csv.DictReader(open(res.files["table_csv"])))
    assert len(table) == 6 and {"accuracy_mean", "accuracy_std", "auc_mean", "ap_mean", "runs"} <= set(table[0])
    md = open(res.files["table_md"]).read()
    assert "## Accuracy" in md and "## Macro AUC" in md and "| rgmim |" in md and "±" in md and "10 %" in md
    summary = json.loads(open(res.files["summary"]).read())
    test_ids = set(summary["test_ids"])
    assert test_ids and summary["pretraining"]["mae"]["steps"] >= 1
    # The test images were never pretrained on, and every run scored the same test split.
    cfg = json.loads((tmp_path / "pretrain-mae" / "config.json").read_text())
    assert set(cfg["exclude_ids"]) == test_ids and cfg["strategy"] == "random"
    assert json.loads((tmp_path / "pretrain-rgmim" / "config.json").read_text())["strategy"] == "region"
    assert {r["n_test"] for r in res.rows} == {len(test_ids)}
    with open(tmp_path / "plot.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert any("pretrained mae" in line for line in lines)
    with pytest.raises(ConfigError, match="already holds"):
        evaluate(EvaluateConfig(data=str(SAMPLE), out=str(tmp_path)))


def test_aggregate_markdown_and_pixel_auc():
    rows = [{"variant": "mae", "fraction": 0.1, "seed": s, "accuracy": a, "auc": u, "ap": 0.5, "n_train": 3}
            for s, (a, u) in enumerate([(0.6, 0.7), (0.8, None)])]
    t = aggregate(rows)
    assert t[0]["accuracy_mean"] == pytest.approx(0.7) and t[0]["accuracy_std"] == pytest.approx(np.std([0.6, 0.8],
                                                                                                     ddof=1))
    assert t[0]["auc_mean"] == pytest.approx(0.7) and t[0]["n_auc"] == 1 and t[0]["auc_std"] == 0.0
    md = markdown_table(t, (0.1, 1.0), ["mae"])
    assert "| mae | 0.700 ± 0.141 | n/a |" in md
    assert pixel_auc([np.array([[0.1, 0.9]])], [np.array([[False, True]])]) == 1.0
    assert pixel_auc([np.zeros((2, 2))], [np.zeros((2, 2), bool)]) is None
    with pytest.raises(ConfigError):
        EvaluateConfig(fractions=(0.0,))
    with pytest.raises(ConfigError):
        EvaluateConfig(variants=("beit",))
