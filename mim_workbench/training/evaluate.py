"""RGMIM-style evaluation: pretraining variants x label fractions x seeds -> a table.

    result = evaluate(EvaluateConfig(data="cxr", fractions=(0.01, 0.1, 1.0), seeds=3,
                                     budget_minutes=10, mode="probe", out="eval"))

For each *variant* an encoder is obtained, with the same pretraining budget:

Variants whose encoder is given in ``checkpoints`` are not pretrained again
(e.g. to re-run the downstream part with other fractions or settings).

``scratch``  no pretraining (a randomly initialised encoder; in ``probe`` mode a
             linear probe of random features, in ``full`` mode training from scratch);
``mae``      MAE with random masking;
``rgmim``    MAE with region-guided masking (needs region masks; skipped with a
             note when the data have none).

Then, for every label fraction and seed, :func:`~mim_workbench.training.finetune.finetune`
trains a linear probe or fine-tunes (``mode``) and scores the test split.

Fairness rules (all recorded in ``summary.json``):

* one patient split (``split_seed``) for everything; the test images are kept
  out of pretraining too (``exclude_ids``), so no variant has seen them;
* the pretraining budget is wall-clock ``budget_minutes`` of training per
  variant (the loop's ``time_budget_s``); so that the learning-rate schedule
  ends near the budget instead of being cut at its peak, the number of epochs
  is set from the step time of a short calibration run (3 steps, not counted);
* a seed changes the label subset and the head's initialisation and sample
  order; pretraining is done once per variant (``pretrain_seed``), as in the
  paper's protocol where one pretrained model is fine-tuned on several subsets.

Outputs in ``out``: ``results.csv`` (one row per run), ``table.csv`` (mean, std
and count per variant and fraction), ``table.md`` (accuracy, macro AUC and AP as
"mean ± std" per fraction, like RGMIM's Table 2), ``plot.png`` (the three
metrics against the label fraction), ``summary.json`` and the runs themselves
under ``pretrain-<variant>/`` and ``runs/<variant>/``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from .control import Control, NullControl

VARIANTS: dict[str, dict[str, Any] | None] = {
    "scratch": None,
    "mae": {"method": "mae", "strategy": "random"},
    "rgmim": {"method": "mae", "strategy": "region"},
}
METRICS = ("accuracy", "auc", "ap")
_METRIC_TITLES = {"accuracy": "Accuracy", "auc": "Macro AUC", "ap": "AP"}
_ARCH_KEYS = ("model", "img_size", "in_chans", "patch_size", "embed_dim", "depth", "num_heads")


@dataclass
class EvaluateConfig:
    data: str | None = None
    masks: str | None = None
    out: str | None = None
    fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    seeds: int = 3                           # seeds 0 .. seeds-1
    budget_minutes: float = 10.0             # pretraining budget per variant
    mode: str = "probe"                      # "probe" | "full"
    variants: tuple[str, ...] = ("scratch", "mae", "rgmim")
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    split_seed: int = 0
    pretrain_seed: int = 0
    pretrain: dict[str, Any] = field(default_factory=dict)   # PretrainConfig fields (architecture, batch, ...)
    checkpoints: dict[str, str] = field(default_factory=dict)  # variant -> existing checkpoint: not pretrained
    finetune: dict[str, Any] = field(default_factory=dict)   # FinetuneConfig fields (epochs, batch_size, ...)
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        self.fractions = tuple(float(f) for f in self.fractions)
        self.variants = tuple(str(v) for v in self.variants)
        if not self.fractions or any(not 0.0 < f <= 1.0 for f in self.fractions):
            raise ConfigError(f"fractions={self.fractions!r}: each must be in (0, 1]")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ConfigError(f"seeds={self.seeds!r}: must be a positive number of seeds")
        if not self.budget_minutes > 0:
            raise ConfigError(f"budget_minutes={self.budget_minutes!r}: must be positive")
        if self.mode not in ("probe", "full"):
            raise ConfigError(f"mode={self.mode!r}: choose probe or full")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ConfigError(f"variants: unknown {', '.join(unknown) or '(none given)'}; "
                              f"choose from {', '.join(VARIANTS)}")
        bad = [k for k in self.checkpoints if VARIANTS.get(k) is None]
        if bad:
            raise ConfigError(f"checkpoints: only pretrained variants take one ({', '.join(bad)} given)")
        for name in ("pretrain", "finetune", "checkpoints"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{name}: must be a mapping of settings")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["fractions"], d["variants"] = list(self.fractions), list(self.variants)
        return d


@dataclass
class EvaluationResult:
    out: str
    rows: list[dict[str, Any]]               # one per (variant, fraction, seed)
    table: list[dict[str, Any]]              # one per (variant, fraction): mean/std/n of each metric
    files: dict[str, str]
    notes: list[str]


@dataclass
class _Setup:
    """What every stage of an evaluation shares: the output folder, the held-out test images,
    the variants that can run on these data and the fine-tuning settings common to all runs."""

    out: Path
    test_ids: list[str]
    variants: list[str]
    arch: dict[str, Any]
    ft_common: dict[str, Any]
    notes: list[str]


def evaluate(config: EvaluateConfig, *, log: Callable[[str], None] | None = None,
             control: Control | None = None) -> EvaluationResult:
    """Run the evaluation (see the module docstring); ``log`` receives one line per stage.

    Raises ConfigError when data or out is missing, ``out`` already holds an evaluation, or
    ``control`` asks to stop; errors of the runs themselves propagate.
    """
    say = log or (lambda _m: None)
    control = control or NullControl()
    t_start = time.perf_counter()
    setup = _prepare(config)
    encoders, pre_info, epochs = _pretrain_variants(config, setup, say, control)
    rows = _downstream_runs(config, setup, encoders, say, control)
    setup.notes += _run_notes(rows)
    table = aggregate(rows)
    files = _write_outputs(config, setup, rows, table, epochs)
    summary = {"config": config.to_dict(), "pretraining": pre_info, "variants": setup.variants,
               "notes": setup.notes, "test_ids": setup.test_ids,
               "machine": {"platform": platform.platform(), "processor": platform.processor()},
               "wall_s": time.perf_counter() - t_start, "table": table}
    from ..io.meta import json_safe

    Path(files["summary"]).write_text(json.dumps(json_safe(summary), indent=2) + "\n", encoding="utf-8")
    return EvaluationResult(out=str(setup.out), rows=rows, table=table, files=files, notes=setup.notes)


def _prepare(cfg: EvaluateConfig) -> _Setup:
    """Check and create ``out``, split the patients once and drop variants the data cannot serve."""
    from ..io.datasets import discover, patient_split

    if not cfg.data or not cfg.out:
        raise ConfigError("evaluate needs data (--data PATH) and an output folder (--out DIR)")
    out = Path(cfg.out).expanduser()
    if (out / "runs").exists() or any(out.glob("pretrain-*")):
        raise ConfigError(f"out={str(out)!r} already holds an evaluation; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    index = discover(cfg.data, masks=cfg.masks)
    labelled = [s for s in index.samples if s.label is not None]
    splits = patient_split(labelled, val=cfg.val_fraction, test=cfg.test_fraction, seed=cfg.split_seed)
    test_ids = [s.id for s in splits["test"]]
    has_masks = any(s.mask is not None for s in index.samples if s.id not in set(test_ids))
    variants = list(cfg.variants)
    if "rgmim" in variants and not has_masks:
        variants.remove("rgmim")
        notes.append("rgmim skipped: the data have no region masks (give --masks DIR)")
    arch = {k: cfg.pretrain[k] for k in _ARCH_KEYS if cfg.pretrain.get(k) is not None}
    ft_common = {"data": cfg.data, "masks": cfg.masks, "mode": cfg.mode, "val_fraction": cfg.val_fraction,
                 "test_fraction": cfg.test_fraction, "split_seed": cfg.split_seed, "device": cfg.device,
                 "threads": cfg.threads, **cfg.finetune}
    return _Setup(out=out, test_ids=test_ids, variants=variants, arch=arch, ft_common=ft_common, notes=notes)


def _pretrain_variants(cfg: EvaluateConfig, setup: _Setup, say: Callable[[str], None],
                       control: Control) -> tuple[dict[str, str | None], dict[str, Any], int | None]:
    """The encoder checkpoint of every variant (None: scratch), what pretraining did, and the
    calibrated number of pretraining epochs (None when nothing was pretrained here)."""
    from .config import PretrainConfig

    encoders: dict[str, str | None] = {}
    pre_info: dict[str, Any] = {}
    for v, path in cfg.checkpoints.items():
        if v in setup.variants:
            encoders[v] = str(path)
            pre_info[v] = {"checkpoint": str(path), "given": True}
            say(f"evaluate: {v}: using the given checkpoint {path} (not pretrained here)")
    pretrained = [v for v in setup.variants if VARIANTS[v] is not None and v not in encoders]
    epochs = None
    if pretrained:
        base = {"data": cfg.data, "masks": cfg.masks, "val_fraction": 0.0, "val_every": 0, "preview_every": 0,
                "keep_checkpoints": 1, "seed": cfg.pretrain_seed, "device": cfg.device, "threads": cfg.threads,
                "exclude_ids": setup.test_ids, **cfg.pretrain}
        budget_s = cfg.budget_minutes * 60.0
        epochs, cal = _calibrate(PretrainConfig, base, VARIANTS[pretrained[0]] or {}, setup.out / ".calibration",
                                 budget_s)
        pre_info["calibration"] = cal
        say(f"evaluate: pretraining budget {cfg.budget_minutes:g} min per variant -> {epochs} epoch(s) "
            f"(step {cal['step_s']:.3f} s, {cal['steps_per_epoch']} steps/epoch)")
        for v in pretrained:
            if control.stop_requested():
                raise ConfigError("evaluation stopped")
            from .pretrain_loop import pretrain

            pc = PretrainConfig.from_dict({**base, **(VARIANTS[v] or {}), "epochs": epochs,
                                           "time_budget_s": budget_s, "out": str(setup.out / f"pretrain-{v}")})
            t0 = time.perf_counter()
            res = pretrain(pc, control=control)
            encoders[v] = res.last_checkpoint
            pre_info[v] = {"checkpoint": res.last_checkpoint, "steps": res.step, "reason": res.reason,
                           "final_loss": res.final_loss, "wall_s": time.perf_counter() - t0,
                           "train_s": res.history[-1]["elapsed_s"] if res.history else 0.0}
            say(f"evaluate: pretrained {v}: {res.step} steps ({res.reason}), loss {res.final_loss}")
    if "scratch" in setup.variants:
        encoders["scratch"] = None
    return encoders, pre_info, epochs


def _downstream_runs(cfg: EvaluateConfig, setup: _Setup, encoders: dict[str, str | None],
                     say: Callable[[str], None], control: Control) -> list[dict[str, Any]]:
    """Fine-tune every (variant, fraction, seed); one result row each, in that order."""
    from .finetune import FeatureCache, FinetuneConfig, finetune

    rows: list[dict[str, Any]] = []
    for v in setup.variants:
        cache = FeatureCache()
        for frac in cfg.fractions:
            for seed in range(cfg.seeds):
                if control.stop_requested():
                    raise ConfigError("evaluation stopped")
                run_dir = setup.out / "runs" / v / f"f{frac:g}-s{seed}"
                values = {**setup.ft_common, "checkpoint": encoders[v], "fraction": frac, "seed": seed,
                          "out": str(run_dir)}
                if v == "scratch":  # the same architecture as the pretrained variants
                    values.update(setup.arch)
                t0 = time.perf_counter()
                res = finetune(FinetuneConfig.from_dict(values), control=control, feature_cache=cache)
                m = res.metrics
                row = {"variant": v, "fraction": frac, "seed": seed, "accuracy": m.get("accuracy"),
                       "auc": m.get("auc"), "ap": m.get("ap"), "balanced_accuracy": m.get("balanced_accuracy"),
                       "split": res.eval_split, "n_train": res.n_train, "n_test": m.get("n"),
                       "best_epoch": res.best_epoch, "epochs_run": res.epochs_run, "reason": res.reason,
                       "seconds": round(time.perf_counter() - t0, 2), "notes": "; ".join(m.get("notes") or [])}
                rows.append(row)
                say(f"evaluate: {v} fraction {frac:g} seed {seed}: acc {_fmt(row['accuracy'])} "
                    f"auc {_fmt(row['auc'])} ap {_fmt(row['ap'])} ({res.n_train} labels)")
    return rows


def _run_notes(rows: list[dict[str, Any]]) -> list[str]:
    """The runs' notes, each once, with how many runs gave it."""
    seen: dict[str, int] = {}
    for r in rows:
        for n in filter(None, r["notes"].split("; ")):
            seen[n] = seen.get(n, 0) + 1
    return [f"{n} ({k} of {len(rows)} runs)" for n, k in seen.items()]


def _write_outputs(cfg: EvaluateConfig, setup: _Setup, rows: list[dict[str, Any]], table: list[dict[str, Any]],
                   epochs: int | None) -> dict[str, str]:
    """Write results.csv, table.csv, table.md and plot.png; returns every output's path by name
    (``summary`` included, written by the caller; ``plot`` left out without matplotlib)."""
    out = setup.out
    files = {"results": str(out / "results.csv"), "table_csv": str(out / "table.csv"),
             "table_md": str(out / "table.md"), "plot": str(out / "plot.png"), "summary": str(out / "summary.json")}
    _write_csv(Path(files["results"]), rows)
    _write_csv(Path(files["table_csv"]), table)
    header = (f"Mode: {cfg.mode}; pretraining budget {cfg.budget_minutes:g} min per variant"
              + (f" ({epochs} epochs)" if epochs else "") + f"; {cfg.seeds} seed(s); test split: "
              f"{len(setup.test_ids)} images ({cfg.test_fraction:g} of the patients, split seed {cfg.split_seed}); "
              f"data: {cfg.data}")
    Path(files["table_md"]).write_text(markdown_table(table, cfg.fractions, setup.variants, header=header,
                                                      notes=setup.notes), encoding="utf-8")
    try:
        plot_table(table, Path(files["plot"]), title=f"{Path(str(cfg.data)).name}: {cfg.mode}")
    except ImportError:
        setup.notes.append("plot.png not written: matplotlib is not installed")
        files.pop("plot")
    return files


def _calibrate(config_cls: Any, base: dict[str, Any], variant: dict[str, Any], where: Path,
               budget_s: float) -> tuple[int, dict[str, Any]]:
    """Epochs that fit ``budget_s`` of training, from a 3-step run's step time."""
    import shutil

    from .pretrain_loop import pretrain

    shutil.rmtree(where, ignore_errors=True)
    pc = config_cls.from_dict({**base, **variant, "epochs": 1000, "max_steps": 3, "out": str(where)})
    res = pretrain(pc)
    el = [r["elapsed_s"] for r in res.history]
    step_s = (el[-1] - el[0]) / max(1, len(el) - 1) if len(el) > 1 else (el[0] if el else 1.0)
    started = pc.resolved()
    from ..io.datasets import discover

    n = len([s for s in discover(started.data, masks=started.masks).samples if s.id not in set(started.exclude_ids)])
    spe = max(1, math.ceil(n / (started.batch_size * started.accum_steps)))
    epochs = max(1, int(budget_s / max(step_s, 1e-6) / spe))
    shutil.rmtree(where, ignore_errors=True)
    return epochs, {"step_s": step_s, "steps_per_epoch": spe, "n_images": n}


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, standard deviation (ddof=1; 0 for one seed) and count per variant and fraction.

    Runs whose metric is undefined (e.g. AUC with one class in the test split)
    are left out of that metric's mean; ``n_<metric>`` says how many counted.
    """
    out = []
    keys: list[tuple[str, float]] = []
    for r in rows:
        k = (r["variant"], r["fraction"])
        if k not in keys:
            keys.append(k)
    for v, f in keys:
        sel = [r for r in rows if r["variant"] == v and r["fraction"] == f]
        row: dict[str, Any] = {"variant": v, "fraction": f, "runs": len(sel),
                               "n_train_mean": float(np.mean([r["n_train"] for r in sel]))}
        for m in METRICS:
            vals = [float(r[m]) for r in sel if r.get(m) is not None]
            row[f"{m}_mean"] = float(np.mean(vals)) if vals else None
            row[f"{m}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else (0.0 if vals else None)
            row[f"n_{m}"] = len(vals)
        out.append(row)
    return out


def markdown_table(table: list[dict[str, Any]], fractions: tuple[float, ...], variants: list[str], *,
                   header: str = "", notes: list[str] | None = None) -> str:
    """Accuracy, macro AUC and AP, mean ± std, variants as rows and label fractions as columns."""
    lines = ["# Evaluation", ""]
    if header:
        lines += [header, ""]
    cols = [f"{f * 100:g} %" for f in fractions]
    for m in METRICS:
        lines += [f"## {_METRIC_TITLES[m]}", "", "| Pretraining | " + " | ".join(cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for v in variants:
            cells = []
            for f in fractions:
                r = next((t for t in table if t["variant"] == v and t["fraction"] == f), None)
                if r is None or r[f"{m}_mean"] is None:
                    cells.append("n/a")
                else:
                    cells.append(f"{r[f'{m}_mean']:.3f} ± {r[f'{m}_std']:.3f}")
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def plot_table(table: list[dict[str, Any]], path: Path, *, title: str = "") -> Path:
    """Three panels (accuracy, AUC, AP) against the label fraction, one line per variant, ±1 std."""
    from matplotlib.figure import Figure  # no pyplot: no backend or GUI state is touched

    fig = Figure(figsize=(12, 3.8), dpi=100)
    axes = fig.subplots(1, 3)
    variants = list(dict.fromkeys(t["variant"] for t in table))
    for ax, m in zip(axes, METRICS):
        for v in variants:
            pts = [(t["fraction"], t[f"{m}_mean"], t[f"{m}_std"]) for t in table
                   if t["variant"] == v and t[f"{m}_mean"] is not None]
            if not pts:
                continue
            pts.sort()
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=v)
        ax.set_xscale("log")
        ax.set_xlabel("label fraction")
        ax.set_title(_METRIC_TITLES[m])
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols or ["variant"])
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})


# ====================================================================== dense-head scoring
def pixel_auc(scores: list[np.ndarray], truths: list[np.ndarray]) -> float | None:
    """ROC AUC over all pixels of several images (score maps vs bool masks); None if one class only."""
    from sklearn.metrics import roc_auc_score

    y = np.concatenate([np.asarray(t, dtype=bool).ravel() for t in truths])
    s = np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in scores])
    if y.all() or not y.any():
        return None
    return float(roc_auc_score(y, s))


__all__ = ["METRICS", "VARIANTS", "EvaluateConfig", "EvaluationResult", "aggregate", "evaluate", "markdown_table",
           "pixel_auc", "plot_table"]
