"""Fine-tuning: label fractions, class weights, layer decay, the classifier, finetune() end to end."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from _mim_tiny import SAMPLE, split_collection, tiny

from mim_workbench.errors import CheckpointError, ConfigError
from mim_workbench.models import ModelConfig, build_model, export_encoder
from mim_workbench.models.classifier import Classifier
from mim_workbench.models.encoder import create_encoder
from mim_workbench.training import events as ev
from mim_workbench.models.checkpoint import load_checkpoint
from mim_workbench.training.config import PretrainConfig
from mim_workbench.training.finetune import FeatureCache, FinetuneConfig, finetune
from mim_workbench.training.labels import balanced_indices, class_weights, label_subset
from mim_workbench.training.lr_decay import layer_id, param_groups_lrd
from mim_workbench.training.class_metrics import classification_metrics
from mim_workbench.training.pretrain_loop import pretrain

TINY_ARCH = {"img_size": 64, "embed_dim": 64, "depth": 2, "num_heads": 2}


@dataclass
class _S:
    id: str
    label: str | None
    patient: str | None = None


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("pre")
    res = pretrain(PretrainConfig.from_dict(tiny(out, max_steps=4, threads=1)))
    return res.last_checkpoint


# ---------------------------------------------------------------- label fractions
def _samples(counts: dict[str, int]) -> list[_S]:
    return [_S(f"{c}{i:03d}", c) for c, n in counts.items() for i in range(n)]


def test_label_subset_is_stratified_nested_and_reproducible():
    samples = _samples({"a": 200, "b": 40, "c": 3}) + [_S("u1", None)]
    prev: set[str] = set()
    for frac in (0.01, 0.05, 0.1, 0.5, 1.0):
        sub = label_subset(samples, frac, seed=3)
        ids = {s.id for s in sub}
        counts = {c: sum(s.label == c for s in sub) for c in "abc"}
        assert counts == {c: (n if frac == 1.0 else max(1, round(frac * n))) for c, n in
                          {"a": 200, "b": 40, "c": 3}.items()}
        assert prev <= ids                      # nested for one seed
        prev = ids
        assert "u1" not in ids                  # unlabelled samples are dropped
    a = {s.id for s in label_subset(samples, 0.1, seed=3)}
    assert a == {s.id for s in label_subset(list(reversed(samples)), 0.1, seed=3)}   # order-free
    assert a != {s.id for s in label_subset(samples, 0.1, seed=4)}
    with pytest.raises(ConfigError):
        label_subset(samples, 0.0)


def test_class_weights_and_balanced_sampling():
    w = class_weights(np.array([90, 10, 0]))
    assert torch.allclose(w, torch.tensor([100 / (2 * 90), 100 / (2 * 10), 0.0]))
    labels = [0] * 90 + [1] * 10
    idx = balanced_indices(labels, 4000, torch.Generator().manual_seed(0))
    share = float((torch.tensor(labels)[idx] == 1).float().mean())
    assert 0.45 < share < 0.55


def test_layer_decay_groups():
    enc = create_encoder(ModelConfig.from_dict(TINY_ARCH))
    model = Classifier(enc, 3, "full")
    assert layer_id("pos_embed", 2) == 0 and layer_id("patch_embed.proj.weight", 2) == 0
    assert layer_id("blocks.1.mlp.fc1.weight", 2) == 2 and layer_id("norm.weight", 2) == 3
    groups = param_groups_lrd(model, weight_decay=0.05, layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = 0
    for g in groups:
        assert g["lr_scale"] == pytest.approx(0.5 ** (3 - g["layer"]))
        for p in g["params"]:
            n = names[id(p)]
            seen += 1
            if n == "head.weight":
                assert g["lr_scale"] == 1.0 and g["weight_decay"] == 0.05
            if n.endswith(".bias") or "pos_embed" in n or "cls_token" in n:
                assert g["weight_decay"] == 0.0
            if n.startswith("encoder.patch_embed"):
                assert g["lr_scale"] == pytest.approx(0.125)
    assert seen == sum(1 for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- metrics
def test_metrics_binary_multiclass_and_missing_classes():
    m = classification_metrics([0, 0, 1, 1], np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]]),
                               ["neg", "pos"])
    assert m["accuracy"] == 1.0 and m["auc"] == 1.0 and m["ap"] == 1.0 and m["positive_class"] == "pos"
    p3 = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.8, 0.1]])
    m = classification_metrics([0, 1, 0, 1], p3, ["a", "b", "c"])   # class c absent from the split
    assert m["auc"] == pytest.approx(1.0) and m["averaged_over"] == ["a", "b"]
    assert any("missing" in n for n in m["notes"]) and m["support"]["c"] == 0
    one = classification_metrics([1, 1], np.array([[0.2, 0.8], [0.6, 0.4]]), ["a", "b"])
    assert one["auc"] is None and one["ap"] is None and one["accuracy"] == 0.5 and one["notes"]


# ---------------------------------------------------------------- classifier
def test_classifier_modes():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 64, 64)
    full = Classifier(create_encoder(ModelConfig.from_dict(TINY_ARCH)), 3, "full").eval()
    torch.nn.init.normal_(full.head.weight)
    # Average pooling: the image logits are exactly the mean of the per-patch logits.
    assert torch.allclose(full(x), full.patch_logits(x).mean(dim=(2, 3)), atol=1e-5)
    probe = Classifier(create_encoder(ModelConfig.from_dict(TINY_ARCH)), 2, "probe")
    probe.train()
    assert not probe.encoder.training and probe.pool == "avg"   # DEFAULT_POOL
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    roll = probe.attention_rollout(x)
    assert roll.shape == (2, 4, 4) and float(roll.min()) >= 0 and float(roll.max()) == pytest.approx(1.0)


# ---------------------------------------------------------------- finetune end to end
def test_finetune_probe_from_pretrain_checkpoint(pretrained, tmp_path):
    events: list = []
    res = finetune(FinetuneConfig(data=str(SAMPLE), checkpoint=pretrained, mode="probe", out=str(tmp_path / "ft"),
                                  epochs=15, batch_size=4, threads=1, seed=1), on_event=events.append)
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "Started" and kinds[-1] == "Finished" and "CheckpointSaved" in kinds
    prog = [e for e in events if isinstance(e, ev.Progress)]
    assert prog and any(e.val_loss is not None for e in prog)
    assert res.classes == ["COVID-19", "Other pneumonia"] and res.eval_split == "test"
    assert res.n_test >= 1 and res.n_val >= 1 and res.n_train + res.n_val + res.n_test == 12
    for k in ("accuracy", "auc", "ap"):
        assert k in res.metrics
    saved = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert saved["accuracy"] == res.metrics["accuracy"] and saved["encoder"]["kind"] == "checkpoint"
    ck = load_checkpoint(tmp_path / "ft", kind="finetune")
    assert ck.meta["classes"] == res.classes and ck.meta["mode"] == "probe" and ck.model_config["encoder"]["embed_dim"] == 64
    assert (tmp_path / "ft" / "history.csv").is_file()
    # Patient-level splits: no patient in two splits.
    sp = ck.meta["splits"]
    assert not (set(sp["train"]) & set(sp["test"])) and not (set(sp["val"]) & set(sp["test"]))


def test_finetune_full_fraction_export_and_stop(pretrained, tmp_path):
    model = build_model(ModelConfig.from_dict(load_checkpoint(pretrained).model_config))
    exp = export_encoder(model, tmp_path / "enc.safetensors")
    res = finetune(FinetuneConfig(data=str(SAMPLE), checkpoint=str(exp), mode="full", fraction=0.05,
                                  out=str(tmp_path / "full"), epochs=2, batch_size=4, threads=1, balance="sampler"))
    assert res.n_train == 2                             # one per class
    ck = load_checkpoint(tmp_path / "full")
    assert ck.meta["mode"] == "full" and ck.meta["model_config"]["drop_path_rate"] == pytest.approx(0.1)

    class StopAfter:
        def __init__(self):
            self.n = 0

        def stop_requested(self):
            self.n += 1
            return self.n > 3

        def pause_requested(self):
            return False

    events: list = []
    res = finetune(FinetuneConfig.from_dict(dict(data=str(SAMPLE), checkpoint="scratch", mode="probe", out=str(tmp_path / "stop"),
                                  epochs=50, batch_size=4, threads=1, **TINY_ARCH)),
                   on_event=events.append, control=StopAfter())
    assert res.reason == "stopped" and res.checkpoint and isinstance(events[-1], ev.Finished)


def test_full_finetuning_can_start_from_a_head_fitted_on_the_frozen_features(pretrained, tmp_path):
    # lr ~ 0: the kept head is the one training started from
    kw = dict(data=str(SAMPLE), checkpoint=str(pretrained), mode="full", epochs=1, batch_size=4, threads=1,
              lr=1e-12, warmup_epochs=0.0, augment=False, drop_path=0.0)
    norms = {}
    for init in ("random", "probe"):
        res = finetune(FinetuneConfig(out=str(tmp_path / init), head_init=init, **kw))
        norms[init] = float(load_checkpoint(res.checkpoint).model_state()["head.weight"].norm())
        assert any("head_init=probe" in n for n in res.notes) == (init == "probe")
        if init == "probe":   # a logistic regression separates the handful of training images
            assert res.history and res.history[0]["loss"] < 0.69
    assert norms["probe"] > 100 * norms["random"]
    with pytest.raises(ConfigError, match="head_init='lpft'"):
        FinetuneConfig(head_init="lpft")


def test_finetune_early_stopping_and_feature_cache(tmp_path):
    cache = FeatureCache()
    kw = dict(data=str(SAMPLE), checkpoint=None, mode="probe", epochs=200, batch_size=4, threads=1, patience=2,
              lr=0.5, **TINY_ARCH)
    a = finetune(FinetuneConfig.from_dict(dict(out=str(tmp_path / "a"), **kw)), feature_cache=cache)
    assert a.reason == "early_stopped" and a.epochs_run < 200
    assert len(cache.features) == 12 - 0 and cache.key is not None
    b = finetune(FinetuneConfig.from_dict(dict(out=str(tmp_path / "b"), **kw)), feature_cache=cache)
    assert b.metrics["accuracy"] == a.metrics["accuracy"]   # same seed, same cached features


def test_finetune_errors(tmp_path, pretrained):
    with pytest.raises(ConfigError, match="two classes"):
        finetune(FinetuneConfig.from_dict(dict(data=str(SAMPLE / "images"), checkpoint=None, out=str(tmp_path / "x"), **TINY_ARCH)))
    with pytest.raises(CheckpointError):
        finetune(FinetuneConfig(data=str(SAMPLE), checkpoint=str(tmp_path / "nope"), out=str(tmp_path / "y")))
    with pytest.raises(ConfigError):
        FinetuneConfig(mode="linear")
    with pytest.raises(ConfigError):
        FinetuneConfig(fraction=0)
    failed: list = []
    with pytest.raises(ConfigError):
        finetune(FinetuneConfig.from_dict(dict(data=str(SAMPLE), checkpoint=None, out=str(tmp_path / "z"), batch_size=1,
                                **TINY_ARCH)), on_event=failed.append)
    assert isinstance(failed[-1], ev.Failed)


def test_full_finetuning_caches_decoded_images_without_changing_the_result(tmp_path, monkeypatch):
    monkeypatch.setenv("MIM_WORKBENCH_CACHE", str(tmp_path / "cache"))
    kw = dict(data=str(SAMPLE), checkpoint="scratch", mode="full", epochs=2, batch_size=4, threads=1, **TINY_ARCH)
    plain = finetune(FinetuneConfig.from_dict(dict(out=str(tmp_path / "plain"), cache=False, **kw)))
    assert not (tmp_path / "cache").exists()
    cached = finetune(FinetuneConfig.from_dict(dict(out=str(tmp_path / "cached"), **kw)))        # cache=None: the data fit
    assert len(list((tmp_path / "cache" / "decoded").rglob("entry.json"))) >= plain.n_train
    assert [h["loss"] for h in cached.history] == [h["loss"] for h in plain.history]
    a, b = load_checkpoint(tmp_path / "plain").model_state(), load_checkpoint(tmp_path / "cached").model_state()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- external test set
def test_external_test_set_is_scored_never_trained_on(tmp_path):
    labelled, external = split_collection(tmp_path)
    res = finetune(FinetuneConfig.from_dict(dict(data=str(labelled), test_data=str(external), checkpoint=None, mode="probe",
                                  out=str(tmp_path / "ft"), epochs=5, batch_size=4, threads=1, **TINY_ARCH)))
    ext_ids = {p.stem for p in (external / "images").glob("*.png")}
    assert res.external_metrics is not None and res.external_metrics["n"] == len(ext_ids)
    assert set(res.predictions["external"]["ids"]) == ext_ids
    ck = load_checkpoint(tmp_path / "ft", kind="finetune")
    trained_on = set(ck.meta["splits"]["train"]) | set(ck.meta["splits"]["val"])
    assert not trained_on & ext_ids
    saved = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert saved["external"]["auc"] == res.external_metrics["auc"] and saved["n_external"] == len(ext_ids)
    rows = list(csv.DictReader(open(tmp_path / "ft" / "predictions.csv")))
    assert {r["split"] for r in rows} >= {"test", "external"}
    assert {"p_COVID-19", "p_Other pneumonia"} <= set(rows[0])


def test_an_external_set_with_other_classes_is_refused(tmp_path):
    labelled, external = split_collection(tmp_path)
    text = (external / "labels.csv").read_text().replace("Other pneumonia", "Tuberculosis")
    (external / "labels.csv").write_text(text)
    with pytest.raises(ConfigError, match="Tuberculosis.*not among the training classes"):
        finetune(FinetuneConfig.from_dict(dict(data=str(labelled), test_data=str(external), checkpoint=None, mode="probe",
                                out=str(tmp_path / "ft"), epochs=1, batch_size=4, threads=1, **TINY_ARCH)))
