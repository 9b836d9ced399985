"""The pretraining loop on a tiny ViT: events, run directory, stop/pause, exact resume, failures."""

from __future__ import annotations

import pickle
import threading
import time

import numpy as np
import pytest
import torch
from _mim_tiny import tiny

from mim_workbench.errors import ConfigError, MimError
from mim_workbench.training import events as ev
from mim_workbench.models.checkpoint import list_checkpoints, load_checkpoint
from mim_workbench.training.config import PretrainConfig
from mim_workbench.training.control import NullControl, ProcessControl
from mim_workbench.training.metrics_log import read_metrics
from mim_workbench.training.pretrain_loop import pretrain


def _run(out, control=None, **overrides):
    seen: list = []
    result = pretrain(PretrainConfig.from_dict(tiny(out, **overrides)), on_event=seen.append, control=control)
    return result, seen


def test_events_run_dir_and_metrics(tmp_path):
    result, seen = _run(tmp_path / "run", epochs=1, preview_every=2, checkpoint_every=2)
    kinds = [type(e).__name__ for e in seen]
    assert kinds[0] == "Started" and kinds[-1] == "Finished"
    started, finished = seen[0], seen[-1]
    assert started.total_steps == started.steps_per_epoch == 3 and started.n_train + started.n_val == 12
    assert started.device == "cpu" and started.config["strategy"] == "random" and started.lr > 0
    progress = [e for e in seen if isinstance(e, ev.Progress)]
    assert [p.step for p in progress] == [1, 2, 3]
    assert all(np.isfinite(p.loss) and p.lr > 0 and p.images_per_s > 0 for p in progress)
    assert progress[-1].val_loss is not None and progress[0].val_loss is None
    saved = [e for e in seen if isinstance(e, ev.CheckpointSaved)]
    assert [e.step for e in saved] == [2, 3]
    previews = [e for e in seen if isinstance(e, ev.Preview)]
    assert [p.step for p in previews] == [0, 2, 3]
    for p in previews:
        for a in (p.image, p.masked, p.reconstruction, p.error, p.recon_plus_visible):
            assert a.dtype == np.float32 and a.shape == (64, 64)
    assert finished.reason == "completed" and finished.step == 3
    assert finished.last_checkpoint == saved[-1].path == result.last_checkpoint
    # Events cross a multiprocessing queue in the GUI: they must pickle.
    for e in seen:
        assert type(pickle.loads(pickle.dumps(e))) is type(e)

    run = tmp_path / "run"
    assert PretrainConfig.from_file(run / "config.json").lr == pytest.approx(started.lr)
    rows = read_metrics(run / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["val_loss"] is not None and rows[0]["val_loss"] is None
    assert {"step", "epoch", "loss", "val_loss", "lr", "images_per_s"} <= set(rows[0])
    assert (run / "latest").read_text().strip() == "ckpt-3"
    meta = load_checkpoint(run).meta
    assert meta["kind"] == "pretrain" and meta["sampler"] == {
        "epoch": 1, "position": 0, "seed": 0, "n_train": started.n_train, "steps_per_epoch": 3}
    assert {"torch", "numpy", "python", "mask_generator"} <= set(meta["rng"])
    assert meta["model_config"]["encoder"]["embed_dim"] == 64 and len(meta["dataset_signature"]) == 32


class _StopAfter:
    def __init__(self, n: int) -> None:
        self.n, self.seen = n, 0

    def on_event(self, e) -> None:
        if isinstance(e, ev.Progress):
            self.seen += 1

    def stop_requested(self) -> bool:
        return self.seen >= self.n

    def pause_requested(self) -> bool:
        return False


def test_stop_request_saves_a_checkpoint_then_finishes(tmp_path):
    ctl = _StopAfter(2)
    seen: list = []

    def handler(e):
        ctl.on_event(e)
        seen.append(e)

    result = pretrain(PretrainConfig.from_dict(tiny(tmp_path / "run", epochs=5)), on_event=handler, control=ctl)
    assert result.reason == "stopped" and result.step == 2
    assert isinstance(seen[-1], ev.Finished) and seen[-1].reason == "stopped"
    assert isinstance(seen[-2], ev.CheckpointSaved) and seen[-2].step == 2
    c = load_checkpoint(tmp_path / "run")
    assert c.step == 2 and c.meta["sampler"]["position"] == 2


def test_pause_holds_the_loop_until_resumed(tmp_path):
    ctl = ProcessControl()
    ctl.request_pause()
    done: dict = {}
    t = threading.Thread(target=lambda: done.setdefault("r", pretrain(
        PretrainConfig.from_dict(tiny(tmp_path / "run", epochs=1, max_steps=1)), control=ctl)))
    t.start()
    time.sleep(1.0)
    assert "r" not in done and not list_checkpoints(tmp_path / "run")
    ctl.resume()
    t.join(60)
    assert done["r"].step == 1 and done["r"].reason == "max_steps"
    assert ctl.pause_requested() is False and ctl.stop_requested() is False
    ctl.request_pause()
    ctl.request_stop()  # a stop also ends a pause
    assert ctl.stop_requested() and not ctl.pause_requested()
    assert not NullControl().stop_requested()


def test_exact_resume_matches_uninterrupted_run(tmp_path):
    common = dict(epochs=3, blr=5e-3, augment=True, strategy="region")
    straight, _ = _run(tmp_path / "a", max_steps=6, **common)
    first, _ = _run(tmp_path / "b", max_steps=4, **common)     # stops inside epoch 1
    assert first.reason == "max_steps" and load_checkpoint(tmp_path / "b").meta["sampler"]["position"] == 1
    second = pretrain(PretrainConfig(resume=str(tmp_path / "b"), max_steps=6))
    losses_a = [r["loss"] for r in straight.history]
    losses_b = [r["loss"] for r in first.history + second.history]
    assert len(losses_a) == 6 and losses_a == losses_b
    wa = load_checkpoint(tmp_path / "a").model_state()
    wb = load_checkpoint(tmp_path / "b").model_state()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # metrics.csv of the resumed run continues the interrupted one, no duplicated steps.
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.csv")] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_changed_settings(tmp_path):
    _run(tmp_path / "run", max_steps=1)
    with pytest.raises(ConfigError, match="batch_size"):
        pretrain(PretrainConfig(resume=str(tmp_path / "run"), batch_size=2))


def test_non_finite_loss_skips_the_step_and_reports_it(tmp_path, monkeypatch):
    from mim_workbench.models.mae import MAEModel

    original = MAEModel.forward
    calls = {"n": 0}

    def flaky(self, *a, **k):
        out = original(self, *a, **k)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 2:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MAEModel, "forward", flaky)
    result, seen = _run(tmp_path / "run", epochs=1)
    progress = [e for e in seen if isinstance(e, ev.Progress)]
    assert np.isnan(progress[1].loss) and "skipped" in progress[1].message
    assert progress[2].skipped_steps == 1 and np.isfinite(progress[2].loss)
    assert result.skipped_steps == 1 and result.step == 3
    for v in load_checkpoint(tmp_path / "run").model_state().values():
        assert torch.isfinite(v).all()


def test_failures_emit_failed_and_raise_mim_errors(tmp_path):
    seen: list = []
    with pytest.raises(MimError):
        pretrain(PretrainConfig.from_dict(tiny(tmp_path / "run", data=str(tmp_path / "nothing"))), on_event=seen.append)
    assert isinstance(seen[-1], ev.Failed) and seen[-1].message
    with pytest.raises(ConfigError, match="region masks"):
        pretrain(PretrainConfig.from_dict(tiny(tmp_path / "r2", masks=None, strategy="region")))
    with pytest.raises(ConfigError, match="--data"):
        pretrain(PretrainConfig(out=str(tmp_path / "r3")))


def test_refuses_to_overwrite_an_existing_run(tmp_path):
    _run(tmp_path / "run", max_steps=1)
    with pytest.raises(ConfigError, match="already holds a run"):
        _run(tmp_path / "run", max_steps=1)


def test_time_budget_stops_with_a_checkpoint(tmp_path):
    result, seen = _run(tmp_path / "run", epochs=50, time_budget_s=1.0)
    assert result.reason == "time_budget" and 0 < result.step < 150
    assert load_checkpoint(tmp_path / "run").step == result.step


class _StepClock:
    """The loop's clock, advancing 50 ms a reading: steps take the same time however busy the machine."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 0.05
        return self.now

    monotonic = staticmethod(time.monotonic)


def test_time_budget_plans_the_schedule_to_end_with_it(tmp_path, monkeypatch):
    from mim_workbench.training import pretrain_loop

    monkeypatch.setattr(pretrain_loop, "time", _StepClock())
    result, seen = _run(tmp_path / "run", epochs=200, time_budget_s=3.0, warmup_epochs=2.0, min_lr=0.0)
    started = seen[0]
    lrs = [e.lr for e in seen if isinstance(e, ev.Progress)]
    assert result.reason == "time_budget" and result.step < started.total_steps == 600
    # The cosine ran to its end within the budget instead of being cut near its peak.
    assert max(lrs) > 0.5 * started.lr and lrs[-1] < 0.1 * started.lr
    schedule = load_checkpoint(tmp_path / "run").meta["schedule"]
    assert schedule["total_steps"] == result.step and 0 < schedule["warmup_steps"] < result.step


@pytest.mark.parametrize("method", ["simmim", "miram"])
def test_other_methods_train(tmp_path, method):
    result, seen = _run(tmp_path / "run", method=method, max_steps=2, epochs=1)
    assert result.step == 2 and np.isfinite(result.final_loss)
    assert seen[0].config["strategy"] == ("block" if method == "simmim" else "random")


def test_exclude_ids_keeps_samples_out_of_both_splits(tmp_path):
    from _mim_tiny import SAMPLE_IMAGES

    ids = sorted(p.stem for p in SAMPLE_IMAGES.glob("*.png"))
    result, seen = _run(tmp_path / "run", max_steps=1, epochs=1, exclude_ids=ids[:3] + ["nope"])
    started = seen[0]
    assert started.n_train + started.n_val == len(ids) - 3
    assert any("nope" in n for n in started.notes)


def test_epoch_checkpoints_are_rate_limited_in_time(tmp_path):
    _run(tmp_path / "every", epochs=2, checkpoint_interval_s=0, keep_checkpoints=0)
    assert [p.name for p in list_checkpoints(tmp_path / "every")] == ["ckpt-3", "ckpt-6"]
    _run(tmp_path / "limited", epochs=2, checkpoint_interval_s=3600)
    assert [p.name for p in list_checkpoints(tmp_path / "limited")] == ["ckpt-6"]   # only the final one


def test_decoded_image_cache_is_on_when_the_data_fit_its_cap(tmp_path, monkeypatch):
    """cache=None (the default): on for data that fit the cache, off with a note for data that would
    only cycle through it; cache=False never writes; the CLI's --no-cache says False."""
    from mim_workbench.cli.pretrain import pretrain_config_from_args
    from mim_workbench.cli import build_parser
    from mim_workbench.io import cache as cache_mod

    def entries(root):
        return list(root.rglob("entry.json")) if root.exists() else []

    for name, cache, cap in (("auto", None, None), ("small-cap", None, 10_000), ("off", False, None)):
        root = tmp_path / f"cache-{name}"
        monkeypatch.setenv("MIM_WORKBENCH_CACHE", str(root))
        if cap is not None:
            monkeypatch.setattr(cache_mod, "DEFAULT_MAX_BYTES", cap)
        seen: list = []
        pretrain(PretrainConfig.from_dict(tiny(tmp_path / name, max_steps=2, cache=cache)), on_event=seen.append)
        notes = " ".join(next(e for e in seen if isinstance(e, ev.Started)).notes)
        if name == "auto":
            assert len(entries(root / "decoded")) >= 8, "every decoded sample was kept"
            assert "cache off" not in notes
        elif name == "small-cap":
            assert not entries(root / "decoded") and "decoded-image cache off" in notes and "GB cap" in notes
        else:
            assert not entries(root / "decoded") and "cache off" not in notes
        monkeypatch.undo()
    parser, _ = build_parser()
    args = parser.parse_args(["pretrain", "--data", "d", "--out", "o", "--no-cache"])
    assert pretrain_config_from_args(args).cache is False
    assert pretrain_config_from_args(parser.parse_args(["pretrain", "--data", "d", "--out", "o"])).cache is None
