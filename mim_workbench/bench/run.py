"""The whole bench run: the JSON records ``mim-workbench bench`` prints, section by section.

Sections, in order: the machine record, the fp32 GEMM rate, per input-channel count
the interleaved step timing of every contender (ours per method and strategy, our
MAE in the extra precisions and compiled, lightly's MAE) with the peer comparisons,
masking, the data pipeline, reconstruction inference, and the end record.
``benchmarks/README.md`` explains every field.
"""

from __future__ import annotations

import gc
import json
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..training.runtime import prepare_device
from .config import (
    METHODS,
    REFERENCE_CONFIG,
    REFERENCE_PEER_STEP_S,
    STRATEGIES,
    check_choice,
    example_batch,
    img_hw,
    make_fine,
)
from .flops import count_flops, reference_useful_flops
from .machine import bf16_supported, cpu_idle_fraction, loadavg, machine_record
from .peer import lightly_version, make_lightly_step
from .step import make_step
from .timing import (
    _ratio_ci,
    default_data_root,
    gemm_rate,
    summarise,
    time_data_pipeline,
    time_inference,
    time_interleaved,
    time_masking,
)

_OURS = "mim_workbench"
_PEER = "lightly"


@dataclass
class BenchOptions:
    """What ``run_bench`` measures; the CLI fills it from its flags."""

    methods: Sequence[str] = METHODS
    strategies: Sequence[str] = ("random", "region")
    channels: Sequence[int] = (1, 3)
    config: Mapping[str, Any] | None = None          # overrides of REFERENCE_CONFIG
    reps: int = 20
    warmup: int = 3
    gemm_n: int = 2048
    gemm_reps: int = 7
    peer: bool = True
    device: str = "cpu"
    amp: str | None = None
    extra_amp: Sequence[str] = ("bf16",)          # also time mae/random (ours and lightly) in these
    compile: bool = False                         # also time our mae/random with torch.compile, in each precision
    threads: int | None = None
    data: str | None = None
    masks: str | None = None
    data_workers: Sequence[int] = (0, 2)
    data_max_images: int | None = None
    mask_batch: int = 256
    mask_reps: int = 30
    inference_reps: int = 5
    sections: Sequence[str] = ("gemm", "step", "masking", "data", "inference")

    @classmethod
    def quick(cls, **overrides: Any) -> BenchOptions:
        """Few repetitions everywhere (for tests and smoke runs); ``overrides`` win."""
        values: dict[str, Any] = dict(reps=3, warmup=1, gemm_n=512, gemm_reps=3, data_workers=(0,),
                                      data_max_images=8, mask_reps=3, inference_reps=1)
        values.update(overrides)
        return cls(**values)


@dataclass
class _Contender:
    impl: str
    method: str
    strategy: str
    amp: str
    fn: Any
    compiled: bool = False

    @staticmethod
    def make_key(impl: str, method: str, strategy: str, amp: str, compiled: bool = False) -> str:
        """``impl:method/strategy@amp`` (``+compile`` when compiled): a contender's name in timings."""
        return f"{impl}:{method}/{strategy}@{amp}" + ("+compile" if compiled else "")

    @property
    def key(self) -> str:
        """This contender's :meth:`make_key`."""
        return self.make_key(self.impl, self.method, self.strategy, self.amp, self.compiled)


@dataclass
class _Run:
    """What the sections of one run share: options, device, base config, and the rows measured so far."""

    opt: BenchOptions
    device: torch.device
    base: dict[str, Any]
    main_amp: str
    extra_amps: list[str]
    gemm_samples: list[float] = field(default_factory=list)
    step_rows: dict[tuple[str, str, str, int, str], dict[str, Any]] = field(default_factory=dict)
    compiled_rows: dict[tuple[int, str], dict[str, Any]] = field(default_factory=dict)

    @property
    def amps(self) -> list[str]:
        """The main precision first, then the extra ones measured."""
        return [self.main_amp, *self.extra_amps]

    def measure_gemm(self, when: str) -> dict[str, Any]:
        """A ``gemm`` record; its samples also feed the run's GEMM rate (the median of all samples)."""
        rates = gemm_rate(self.opt.gemm_n, reps=self.opt.gemm_reps, device=self.device)
        self.gemm_samples.extend(rates)
        return {"record": "gemm", "when": when, "n": self.opt.gemm_n, "dtype": "float32",
                "gflops": statistics.median(rates), "gflops_max": max(rates), "samples": rates}


def _loss_ok(v: torch.Tensor) -> bool:
    return bool(torch.isfinite(v).item())


def run_bench(options: BenchOptions | None = None) -> Iterator[dict[str, Any]]:
    """Yield the bench's JSON-able records in order (see ``benchmarks/README.md``).

    The first record is ``machine``, the last ``end``.  An unknown method or strategy
    in ``options`` raises ConfigError before the first record.  ``options`` is not
    modified.
    """
    opt = options or BenchOptions()
    # As training does (threads, allocator), before anything is timed; the peer runs in
    # this process too, so it gets the same allocator.
    dev = prepare_device(opt.device, threads=int(opt.threads) if opt.threads else None)
    base = {**REFERENCE_CONFIG, **(opt.config or {})}
    for m in opt.methods:
        check_choice("method", m, METHODS)
    for s in opt.strategies:
        check_choice("strategy", s, STRATEGIES)
    yield machine_record(opt.device)
    run = _start_run(opt, dev, base)
    if "gemm" in opt.sections or "step" in opt.sections:
        yield run.measure_gemm("start")
    if "step" in opt.sections:
        for chans in opt.channels:
            yield from _step_section(run, chans)
    if "masking" in opt.sections:
        yield from _masking_section(run)
    if "data" in opt.sections:
        yield from _data_section(run)
    if "inference" in opt.sections:
        yield from _inference_section(run)
    yield {"record": "end", "loadavg": loadavg(), "cpu_idle": cpu_idle_fraction(),
           "gemm_gflops": statistics.median(run.gemm_samples) if run.gemm_samples else None}


def _start_run(opt: BenchOptions, dev: torch.device, base: dict[str, Any]) -> _Run:
    main_amp = opt.amp or "off"
    # Extra precisions only on a device with native bf16: elsewhere they would time an emulation.
    extra = [a for a in opt.extra_amp if a != main_amp and bf16_supported(dev)] if "step" in opt.sections else []
    return _Run(opt, dev, base, main_amp, extra)


# ====================================================================== step timing
def _step_section(run: _Run, chans: int) -> Iterator[dict[str, Any]]:
    """Step records at ``chans`` input channels: every contender timed interleaved, then the comparisons."""
    cfg_c = {**run.base, "in_chans": chans}
    contenders, peer_error = _contenders(run, cfg_c)
    x = example_batch(cfg_c)
    fine = make_fine(x)
    times, losses = _time_contenders(run, contenders, x, fine)
    gemm_rec = run.measure_gemm(f"after steps, {chans} channel(s)")
    yield from _step_records(run, cfg_c, contenders, times, losses, x, fine)
    if peer_error is not None:
        yield {"record": "peer", "impl": _PEER, "in_chans": chans, "error": peer_error}
    yield from _measured_compares(run, chans, times)
    yield from _quoted_compares(run, cfg_c, times)
    yield gemm_rec
    # The next channel count builds a fresh set of models: free these first.
    del contenders
    gc.collect()


def _contenders(run: _Run, cfg_c: dict[str, Any]) -> tuple[list[_Contender], str | None]:
    """Ours (every method x strategy; mae/random also in the extra precisions and compiled), then the peer's.

    The second value says why the peer could not be built (None if it could or was not asked for).
    """
    opt, dev = run.opt, run.device
    out = [_Contender(_OURS, m, s, run.main_amp, make_step({**cfg_c, "method": m, "strategy": s}, device=dev,
                                                           amp=opt.amp))
           for m in opt.methods for s in opt.strategies]
    has_mae = "mae" in opt.methods and "random" in opt.strategies
    mae = {**cfg_c, "method": "mae"}
    if has_mae:
        out += [_Contender(_OURS, "mae", "random", amp, make_step(mae, device=dev, amp=amp))
                for amp in run.extra_amps]
    if has_mae and opt.compile:
        # torch.compile (opt-in in training): compiled during the warm-up rounds, 40-60 s each on 2 cores
        out += [_Contender(_OURS, "mae", "random", amp, make_step({**mae, "compile": True}, device=dev,
                                                                  amp=None if amp == "off" else amp), compiled=True)
                for amp in run.amps]
    if not (opt.peer and "mae" in opt.methods):
        return out, None
    for amp in run.amps:
        try:
            out.append(_Contender(_PEER, "mae", "random", amp, make_lightly_step(
                {**cfg_c, "method": "mae", "strategy": "random"}, device=dev, amp=amp)))
        except ConfigError as exc:
            return out, str(exc)
    return out, None


def _time_contenders(run: _Run, contenders: Sequence[_Contender], x: torch.Tensor,
                     fine: torch.Tensor) -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
    """Seconds per step of every contender (round-robin) and each one's last loss, by contender key."""
    losses: dict[str, torch.Tensor] = {}

    def caller(c: _Contender) -> Callable[[], Any]:
        """A no-argument call of ``c``'s step on this batch that keeps its loss."""
        def call() -> None:
            """One step of ``c``."""
            losses[c.key] = c.fn(x, fine=fine)
        return call

    times = time_interleaved({c.key: caller(c) for c in contenders}, reps=run.opt.reps,
                             warmup=run.opt.warmup, device=run.device)
    return times, losses


def _step_records(run: _Run, cfg_c: dict[str, Any], contenders: Sequence[_Contender],
                  times: Mapping[str, list[float]], losses: Mapping[str, torch.Tensor], x: torch.Tensor,
                  fine: torch.Tensor) -> Iterator[dict[str, Any]]:
    """One ``step`` record per contender (FLOPs counted on one more step); remembered in ``run`` for later sections."""
    gemm = statistics.median(run.gemm_samples)
    chans = cfg_c["in_chans"]
    flops_of: dict[str, int] = {}
    for c in contenders:
        twin = _Contender.make_key(c.impl, c.method, c.strategy, c.amp)
        # A compiled step computes what its eager twin does; counting inside compiled
        # graphs would only risk a recompile under the counter's dispatch mode.
        flops = flops_of[twin] if c.compiled and twin in flops_of else count_flops(lambda c=c: c.fn(x, fine=fine))
        flops_of.setdefault(c.key, flops)
        row = _step_row(c, cfg_c, summarise(times[c.key]), flops, gemm, losses[c.key])
        if c.compiled:
            row["compile_active"] = bool(getattr(c.fn.train_forward, "active", False))
            run.compiled_rows[(chans, c.amp)] = row
        else:
            run.step_rows[(c.impl, c.method, c.strategy, chans, c.amp)] = row
        yield row


def _step_row(c: _Contender, cfg_c: Mapping[str, Any], st: Mapping[str, float], flops: int, gemm: float,
              loss: torch.Tensor) -> dict[str, Any]:
    useful, source = reference_useful_flops({**cfg_c, "method": c.method, "strategy": c.strategy})
    return {
        "record": "step", "impl": c.impl, "method": c.method, "strategy": c.strategy, "in_chans": cfg_c["in_chans"],
        "batch_size": int(cfg_c["batch_size"]), "amp": c.amp, "compile": c.compiled,
        "step_s": st["median"], "step_s_min": st["min"], "step_s_q1": st["q1"], "step_s_q3": st["q3"],
        "reps": st["n"], "images_per_s": cfg_c["batch_size"] / st["median"],
        "model_flops": flops, "useful_flops": useful, "useful_flops_source": source,
        "achieved_gflops": useful / st["median"] / 1e9, "gemm_gflops": gemm,
        "efficiency": useful / st["median"] / (gemm * 1e9),
        "loss": float(loss), "loss_finite": _loss_ok(loss),
    }


# ====================================================================== peer comparison
def _measured_compares(run: _Run, chans: int, times: Mapping[str, list[float]]) -> Iterator[dict[str, Any]]:
    """Our mae/random against lightly's from the same rounds: each precision against itself, and our
    extra precisions against its main one (eager, then compiled when asked for)."""
    pairs = [(a, a) for a in run.amps] + [(a, run.main_amp) for a in run.extra_amps]
    for ours_compiled in (False, True) if run.opt.compile else (False,):
        for ours_amp, peer_amp in pairs:
            ours_t = times.get(_Contender.make_key(_OURS, "mae", "random", ours_amp, ours_compiled))
            peer_t = times.get(_Contender.make_key(_PEER, "mae", "random", peer_amp))
            if ours_t is None or peer_t is None:
                continue
            r = _ratio_ci(ours_t, peer_t)
            yield {"record": "compare", "in_chans": chans, "ours": "mae/random", "ours_amp": ours_amp,
                   "ours_compile": ours_compiled,
                   "peer": _PEER, "peer_version": lightly_version(), "peer_amp": peer_amp, "measured": True,
                   "speedup": r["ratio"], "speedup_blocks": r["blocks"],
                   "speedup_min": r["ratio_min"], "speedup_max": r["ratio_max"],
                   "ours_step_s": statistics.median(ours_t), "peer_step_s": statistics.median(peer_t)}


def _quoted_compares(run: _Run, cfg_c: Mapping[str, Any],
                     times: Mapping[str, list[float]]) -> Iterator[dict[str, Any]]:
    """Our eager mae/random against the quoted peer times; only at the reference configuration they apply to."""
    if reference_useful_flops({**cfg_c, "method": "mae"})[1] != "quoted":
        return
    for amp in run.amps:
        ours_t = times.get(_Contender.make_key(_OURS, "mae", "random", amp))
        if ours_t is None:
            continue
        ours_s = statistics.median(ours_t)
        for peer, (lo, hi) in REFERENCE_PEER_STEP_S.items():
            yield {"record": "compare", "in_chans": cfg_c["in_chans"], "ours": "mae/random", "ours_amp": amp,
                   "peer": peer, "peer_amp": "off", "measured": False, "peer_step_s": [lo, hi],
                   "ours_step_s": ours_s, "speedup": [lo / ours_s, hi / ours_s],
                   "note": f"peer time as quoted by {peer} for an idle 2-core machine, not measured here"}


# ====================================================================== masking, data, inference
def _masking_section(run: _Run) -> Iterator[dict[str, Any]]:
    """A ``masking`` record per strategy: at ``mask_batch``, and at the step's batch as a share of our MAE step."""
    opt, base = run.opt, run.base
    geometry: dict[str, Any] = dict(img_size=img_hw(base)[0], patch_size=int(base["patch_size"]),
                                    ratio=float(base["mask_ratio"]), reps=opt.mask_reps)
    chans = opt.channels[0] if opt.channels else 1
    for strategy in opt.strategies:
        ms = time_masking(strategy, batch_size=opt.mask_batch, **geometry)
        rec = {"record": "masking", "strategy": strategy, "batch_size": opt.mask_batch, **ms}
        # share of a training step: masking the step's own batch
        small = time_masking(strategy, batch_size=int(base["batch_size"]), **geometry)
        row = run.step_rows.get((_OURS, "mae", strategy, chans, run.main_amp))
        rec["step_batch_ms"] = small["total_ms"]
        if row is not None:
            rec["share_of_step"] = small["total_ms"] / 1e3 / row["step_s"]
        yield rec


def _model_rates(run: _Run) -> tuple[float | None, dict[str, Any] | None]:
    """(images/s of our default MAE step, the fastest of our MAE step rows) at the first channel count."""
    c0 = run.opt.channels[0] if run.opt.channels else 1
    first = run.step_rows.get((_OURS, "mae", "random", c0, run.main_amp))
    # The pipeline must keep up with the fastest way we train, not only the default one.
    ours_mae = [r for k, r in run.step_rows.items() if k[:4] == (_OURS, "mae", "random", c0)]
    ours_mae += [r for (ch, _), r in run.compiled_rows.items() if ch == c0]
    fastest = max(ours_mae, key=lambda r: r["images_per_s"], default=None)
    return (first["images_per_s"] if first is not None else None), fastest


def _data_section(run: _Run) -> Iterator[dict[str, Any]]:
    """A ``data`` record per (mode, workers), with the ratio to the model's rates; one ``error`` record on failure."""
    opt, base = run.opt, run.base
    model_ips, fastest = _model_rates(run)
    try:
        recs = time_data_pipeline(opt.data, opt.masks, img_size=img_hw(base)[0],
                                  in_chans=int(opt.channels[0] if opt.channels else base["in_chans"]),
                                  batch_size=int(base["batch_size"]), workers=opt.data_workers,
                                  max_images=opt.data_max_images)
        src = opt.data or str(default_data_root()[0])
        for r in recs:
            r = {"record": "data", "source": src, **r, "model_images_per_s": model_ips}
            if model_ips:
                r["ratio_to_model"] = r["images_per_s"] / model_ips
            if fastest is not None:
                r["fastest_model"] = {"amp": fastest["amp"], "compile": fastest.get("compile", False)}
                r["fastest_model_images_per_s"] = fastest["images_per_s"]
                r["ratio_to_fastest_model"] = r["images_per_s"] / fastest["images_per_s"]
            yield r
    except Exception as exc:  # the bench goes on; the record says why
        yield {"record": "data", "error": f"{type(exc).__name__}: {exc}"}


def _inference_section(run: _Run) -> Iterator[dict[str, Any]]:
    """An ``inference`` record per method: reconstruction of one batch with random masking."""
    opt, base = run.opt, run.base
    chans = opt.channels[0] if opt.channels else int(base["in_chans"])
    for method in opt.methods:
        cfg_m = {**base, "in_chans": chans, "method": method, "strategy": "random"}
        step = make_step(cfg_m, device=run.device, amp=opt.amp)
        x = example_batch(cfg_m)
        fine = make_fine(x) if method == "miram" else None
        s = summarise(time_inference(step, x, reps=opt.inference_reps, fine=fine))
        yield {"record": "inference", "method": method, "in_chans": chans, "batch_size": x.shape[0],
               "batch_s": s["median"], "images_per_s": x.shape[0] / s["median"]}


def write_jsonl(records: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Write ``records`` to ``path`` (overwritten), one JSON object per line."""
    with open(path, "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
