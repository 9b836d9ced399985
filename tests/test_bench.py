"""Benchmark harness: make_step for every method x strategy x channels, FLOP
counting, useful-FLOP convention, the lightly peer, and the structure of the bench
records.  Tests check behaviour and structure, never speed."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from mim_workbench import bench
from mim_workbench.bench import (
    REFERENCE_CONFIG,
    BenchOptions,
    check_config,
    count_flops,
    default_region,
    example_batch,
    make_fine,
    make_step,
    reference_useful_flops,
    run_bench,
    useful_flops,
)
from mim_workbench.errors import ConfigError

# A ViT small enough for a step in milliseconds: 32x48 px, patch 8 (4x6 grid).
TINY = {**REFERENCE_CONFIG, "img_size": (32, 48), "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3,
        "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2, "batch_size": 3}


pytestmark = pytest.mark.usefixtures("one_thread")


def _params(step) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in step.model.named_parameters()}


# ---------------------------------------------------------------------------- make_step
@pytest.mark.parametrize("chans", [1, 3])
@pytest.mark.parametrize("strategy", ["random", "block", "region"])
@pytest.mark.parametrize("method", ["mae", "simmim", "miram"])
def test_make_step_every_combination(method, strategy, chans):
    cfg = {**TINY, "in_chans": chans, "method": method, "strategy": strategy}
    step = make_step(cfg)
    x = example_batch(cfg)
    assert x.shape == (3, chans, 32, 48) and x.dtype == torch.float32
    before = _params(step)
    loss = step(x)
    assert loss.dim() == 0 and not loss.requires_grad and math.isfinite(float(loss))
    after = _params(step)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed, "the AdamW step did not update any parameter"
    assert all(p.grad is None for p in step.model.parameters()), "zero_grad(set_to_none) not applied"
    # a second step works too (optimizer state exists now)
    assert math.isfinite(float(step(x)))


@pytest.mark.parametrize("width,depth,heads,patch,img", [(24, 1, 2, 4, 16), (96, 3, 4, 16, (32, 64))])
def test_make_step_any_vit_size(width, depth, heads, patch, img):
    cfg = {**TINY, "embed_dim": width, "depth": depth, "num_heads": heads, "patch_size": patch, "img_size": img,
           "decoder_embed_dim": 16, "decoder_num_heads": 2, "mlp_ratio": 2.0, "norm_pix_loss": False}
    for method in ("mae", "simmim", "miram"):
        step = make_step({**cfg, "method": method})
        assert math.isfinite(float(step(example_batch(cfg))))
        assert step.model.encoder.embed_dim == width and len(step.model.encoder.blocks) == depth


def test_step_is_the_plain_production_path():
    """A bench step equals forward/backward/AdamW written out by hand with the same pieces."""
    from mim_workbench.models import build_model
    from mim_workbench.training.optim import build_optimizer

    cfg = {**TINY, "method": "mae", "strategy": "region"}
    step = make_step(cfg, seed=3)
    x = example_batch(cfg, seed=1)
    region = bench.random_regions(3, (32, 48), seed=2)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = build_model(bench.model_config(cfg))
    model.load_state_dict(step.model.state_dict())
    model.train()
    opt = build_optimizer(model, lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(4)
    from mim_workbench.masking import patch_coverage

    mask = model.make_mask("region", 3, 0.75, region=patch_coverage(region, 8), generator=gen)
    out = model(x, mask)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

    loss = step(x, region)
    torch.testing.assert_close(loss, out.loss.detach())
    for (n, p), (_, q) in zip(step.model.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p, q, msg=f"parameter {n} differs after one step")


def test_step_uses_the_training_optimizer(monkeypatch):
    from mim_workbench.training import optim

    calls = []
    real = optim.build_optimizer

    def spy(model, **kw):
        calls.append(kw)
        return real(model, **kw)

    monkeypatch.setattr(optim, "build_optimizer", spy)
    step = make_step({**TINY, "lr": 1e-3, "weight_decay": 0.1})
    assert calls == [{"lr": 1e-3, "weight_decay": 0.1, "betas": (0.9, 0.95)}]
    assert isinstance(step.optimizer, torch.optim.AdamW)
    assert [g["lr"] for g in step.optimizer.param_groups] == [1e-3, 1e-3]
    step(example_batch(TINY))
    assert [g["lr"] for g in step.optimizer.param_groups] == [1e-3, 1e-3], "lr must stay constant"


def test_region_inputs_pixel_mask_coverage_and_default():
    cfg = {**TINY, "strategy": "region"}
    step = make_step(cfg)
    x = example_batch(cfg)
    px = bench.random_regions(3, (32, 48))
    from mim_workbench.masking import patch_coverage

    cov = patch_coverage(px, 8)
    g_state = step.generator.get_state()
    m_px = step.mask(3, px)
    step.generator.set_state(g_state)
    m_cov = step.mask(3, cov)
    assert torch.equal(m_px, m_cov)
    # the default region is a central ellipse: masked patches come from inside it first
    m_def = step.mask(3)
    inside = patch_coverage(default_region((32, 48))[None], 8).reshape(-1) > 0      # [L]
    n_mask = round(0.75 * inside.numel())
    if int(inside.sum()) >= n_mask:
        assert not m_def[:, ~inside].any()          # region patches only
    else:
        assert m_def[:, inside].all()               # every region patch, then random others
    for r in (None, px, cov, px[0]):
        assert math.isfinite(float(step(x, r)))
    with pytest.raises(ConfigError):
        step(x, torch.zeros(3, 5, 5))


def test_default_region_is_a_central_ellipse():
    r = default_region(224)
    assert r.shape == (224, 224) and r.dtype == torch.float32
    assert r[112, 112] == 1 and r[0, 0] == 0 and r[223, 223] == 0
    assert 0.40 < float(r.mean()) < 0.48  # pi * 0.40 * 0.35 = 0.44


def test_miram_fine_given_or_synthesised():
    cfg = {**TINY, "method": "miram"}
    x = example_batch(cfg)
    fine = make_fine(x)
    assert fine.shape == (3, 1, 64, 96)
    a, b = make_step(cfg, seed=5), make_step(cfg, seed=5)
    torch.testing.assert_close(a(x), b(x, fine=fine))           # default = the documented stand-in
    c = make_step(cfg, seed=5)
    other = torch.rand_like(fine)
    assert not torch.equal(c(x, fine=other), a.model(x, a.mask(3), fine=fine).loss.detach())


def test_config_keys_are_checked():
    with pytest.raises(ConfigError, match="unknown"):
        make_step({**TINY, "learning_rate": 1.0})
    missing = dict(TINY)
    del missing["mask_ratio"]
    with pytest.raises(ConfigError, match="missing"):
        make_step(missing)
    with pytest.raises(ConfigError):
        make_step({**TINY, "method": "dino"})
    with pytest.raises(ConfigError):
        make_step({**TINY, "strategy": "grid"})
    with pytest.raises(ConfigError):
        make_step({**TINY, "in_chans": 2})
    assert check_config(TINY)["method"] == "mae" and check_config(TINY)["strategy"] == "random"
    assert set(bench.REQUIRED_KEYS) == set(REFERENCE_CONFIG)


def test_bf16_autocast_step_is_finite():
    cfg = {**TINY, "method": "mae"}
    step = make_step(cfg, amp="bf16")
    loss = step(example_batch(cfg))
    assert loss.dtype == torch.float32 and math.isfinite(float(loss))
    with pytest.raises(ConfigError):
        make_step(cfg, amp="fp16")  # CPU


# ---------------------------------------------------------------------------- FLOPs
def test_cpu_attention_flops_are_counted():
    q, k, v = (torch.randn(2, 3, 10, 8, requires_grad=True) for _ in range(3))

    def run():
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as plain:
        run()
    fwd = 4 * 2 * 3 * 10 * 10 * 8
    counted = count_flops(run)
    assert counted - plain.get_total_flops() == fwd + int(2.5 * fwd)


def test_step_flops_close_to_the_useful_count():
    for method in ("mae", "simmim", "miram"):
        cfg = {**TINY, "method": method}
        step = make_step(cfg)
        x = example_batch(cfg)
        flops = count_flops(lambda: step(x))
        useful = useful_flops(cfg)
        # ours embeds only visible patches, counts attention backward as 2.5x and adds
        # statistics heads: within 15 % of the convention on this tiny model
        assert 0.85 < flops / useful < 1.15, (method, flops, useful)


def test_useful_flops_reproduce_the_reference_figures():
    for chans, ref in bench.REFERENCE_USEFUL_FLOPS.items():
        cfg = {**REFERENCE_CONFIG, "in_chans": chans}
        assert abs(useful_flops(cfg) / ref - 1) < 0.002
        assert reference_useful_flops(cfg) == (ref, "quoted")
    assert reference_useful_flops({**REFERENCE_CONFIG, "img_size": [224, 224]})[1] == "quoted"
    assert reference_useful_flops({**REFERENCE_CONFIG, "method": "miram"})[1] == "analytic"
    assert reference_useful_flops({**REFERENCE_CONFIG, "depth": 2})[1] == "analytic"


# ---------------------------------------------------------------------------- peer
def test_lightly_peer_step():
    pytest.importorskip("lightly")
    for chans in (1, 3):
        cfg = {**TINY, "in_chans": chans, "img_size": 32}
        step = bench.make_lightly_step(cfg)
        loss = step(example_batch(cfg))
        assert loss.dim() == 0 and not loss.requires_grad and math.isfinite(float(loss))
    with pytest.raises(ConfigError):
        bench.make_lightly_step({**TINY, "img_size": 32, "method": "simmim"})
    with pytest.raises(ConfigError, match="square"):
        bench.make_lightly_step(TINY)


# ---------------------------------------------------------------------------- the run
_STEP_FIELDS = {"impl", "method", "strategy", "in_chans", "batch_size", "amp", "step_s", "step_s_min", "reps",
                "images_per_s", "model_flops", "useful_flops", "useful_flops_source", "efficiency", "gemm_gflops",
                "loss", "loss_finite"}


def _check_records(records: list[dict], *, methods, strategies, channels, peer: bool, amps=("off",)) -> None:
    kinds = [r["record"] for r in records]
    assert kinds[0] == "machine" and kinds[-1] == "end"
    machine = records[0]
    assert {"cpu", "cores", "threads", "torch", "timm", "loadavg"} <= set(machine)
    gemm = [r for r in records if r["record"] == "gemm"]
    assert gemm and all(r["gflops"] > 0 and r["samples"] for r in gemm)
    steps = [r for r in records if r["record"] == "step"]
    ours = [r for r in steps if r["impl"] == "mim_workbench"]
    assert {(r["method"], r["strategy"], r["in_chans"]) for r in ours if r["amp"] == amps[0]} == {
        (m, s, c) for m in methods for s in strategies for c in channels}
    extra = {(r["method"], r["strategy"], r["in_chans"], r["amp"]) for r in ours if r["amp"] != amps[0]}
    if "mae" in methods and "random" in strategies:
        assert extra == {("mae", "random", c, a) for c in channels for a in amps[1:]}
    else:
        assert not extra
    for r in steps:
        assert _STEP_FIELDS <= set(r), _STEP_FIELDS - set(r)
        assert r["step_s"] > 0 and r["model_flops"] > 0 and r["useful_flops"] > 0 and r["loss_finite"]
        assert r["efficiency"] == pytest.approx(r["useful_flops"] / r["step_s"] / (r["gemm_gflops"] * 1e9))
    lightly = [r for r in steps if r["impl"] == "lightly"]
    compare = [r for r in records if r["record"] == "compare"]
    if peer and "mae" in methods:
        assert {(r["in_chans"], r["amp"]) for r in lightly} == {(c, a) for c in channels for a in amps}
    if peer and "mae" in methods and "random" in strategies:
        measured = [r for r in compare if r["peer"] == "lightly"]
        pairs = [(a, a) for a in amps] + [(a, amps[0]) for a in amps[1:]]
        assert sorted((r["in_chans"], r["ours_amp"], r["peer_amp"]) for r in measured) == sorted(
            (c, a, b) for c in channels for a, b in pairs)
        assert all(r["speedup"] > 0 and r["measured"] for r in measured)
    if not (peer and "mae" in methods):
        assert not lightly
    # the quoted facebookresearch/mae times only apply at the reference configuration
    assert not any(r["peer"] == "facebookresearch/mae" for r in compare)
    masking = [r for r in records if r["record"] == "masking"]
    assert {r["strategy"] for r in masking} == set(strategies)
    assert all(r["batch_size"] == 256 and r["total_ms"] > 0 for r in masking)
    data = [r for r in records if r["record"] == "data"]
    assert data and all("error" not in r for r in data), data
    assert {r["mode"] for r in data} == {"cold", "cached"} and all(r["images_per_s"] > 0 for r in data)
    inference = [r for r in records if r["record"] == "inference"]
    assert {r["method"] for r in inference} == set(methods) and all(r["images_per_s"] > 0 for r in inference)
    json.dumps(records)  # everything is JSON-able


def _tiny_options(sample_root, **kw) -> BenchOptions:
    tiny = {k: v for k, v in TINY.items() if k != "img_size"}
    values = dict(config={**tiny, "img_size": 32}, data=str(sample_root / "images"),
                  masks=str(sample_root / "masks"), data_max_images=4, mask_batch=256, threads=1)
    values.update(kw)
    return BenchOptions.quick(**values)


def test_run_bench_quick_structure(sample_root):
    peer = bench.lightly_version() is not None
    opts = _tiny_options(sample_root, methods=("mae", "miram"), strategies=("random", "region"), channels=(1, 3))
    records = list(run_bench(opts))
    amps = ("off", "bf16") if bench.bf16_supported() else ("off",)
    _check_records(records, methods=("mae", "miram"), strategies=("random", "region"), channels=(1, 3), peer=peer,
                   amps=amps)


def test_bench_cli_quick_writes_jsonl(sample_root, tmp_path, capsys):
    import argparse

    from mim_workbench.cli.bench import _add_bench

    parser = argparse.ArgumentParser()
    runner = _add_bench(parser.add_subparsers(dest="command"))
    tiny = {k: v for k, v in TINY.items() if k not in ("img_size",)}
    out = tmp_path / "bench.jsonl"
    args = parser.parse_args([
        "bench", "--quick", "--methods", "simmim", "--strategies", "block", "--channels", "1", "--no-peer",
        "--config", json.dumps({**tiny, "img_size": 32}), "--data", str(sample_root / "images"),
        "--masks", str(sample_root / "masks"), "--threads", "1", "--extra-amp", "none", "--out", str(out),
    ])
    assert runner(args) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert printed == written
    _check_records(written, methods=("simmim",), strategies=("block",), channels=(1,), peer=False)


def test_bench_cli_is_registered_or_pending():
    """Once cli.py registers _add_bench, ``mim-workbench bench --help`` must work."""
    from mim_workbench import cli

    parser, runners = cli.build_parser()
    if "bench" not in runners:
        pytest.skip("bench is not registered in cli.py yet")
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["bench", "--help"])
    assert exc.value.code == 0


def test_bad_method_or_strategy_in_options():
    with pytest.raises(ConfigError):
        list(run_bench(BenchOptions.quick(methods=("dino",), sections=("step",))))
    with pytest.raises(ConfigError):
        list(run_bench(BenchOptions.quick(strategies=("grid",), sections=("step",))))


def test_masking_timer_fields():
    for strategy in ("random", "block", "region"):
        out = bench.time_masking(strategy, batch_size=8, img_size=64, patch_size=16, reps=2)
        assert out["mask_ms"] >= 0 and out["total_ms"] >= out["mask_ms"]
        assert ("coverage_ms" in out) == (strategy == "region")


def test_summarise_and_interleaving_order():
    order = []
    times = bench.time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                                   reps=3, warmup=1)
    assert order == ["a", "b"] * 4 and len(times["a"]) == len(times["b"]) == 3
    s = bench.summarise([3.0, 1.0, 2.0])
    assert s["median"] == 2.0 and s["min"] == 1.0 and s["n"] == 3
    r = bench._ratio_ci([1.0] * 10, [2.0] * 10)
    assert r["ratio"] == 2.0 and r["ratio_min"] == r["ratio_max"] == 2.0


def test_options_are_not_mutated():
    opts = BenchOptions.quick()
    snapshot = copy.deepcopy(opts)
    assert BenchOptions.quick(reps=5).reps == 5 and opts == snapshot


def test_gpu_target_script_runs_and_measures_against_the_bf16_rate():
    """benchmarks/gpu_target.py (the GPU target, judged on a GPU) works end to end on a tiny model."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_target.py"
    out = subprocess.run([sys.executable, str(script), "--device", "cpu", "--quick"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    recs = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["record"] for r in recs] == ["machine", "gemm", "gemm", "step"]
    bf16 = next(r for r in recs if r["record"] == "gemm" and r["dtype"] == "bf16")
    step = recs[-1]
    assert step["config"]["strategy"] == "region" and step["step_s"] > 0 and step["target_met"] is None
    assert step["efficiency"] == pytest.approx(step["useful_gflop"] / step["step_s"] / bf16["gflops"])
