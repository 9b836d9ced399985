"""``run_study``: does pretraining on my images make my few labels go further?

    result = run_study(StudyConfig(unlabeled="pool/", data="labelled/", test_data="other_hospital/",
                                   variants=("scratch", "mae", "rgmim"), region_preset="lungs",
                                   fractions=(0.01, 0.1, 1.0), seeds=3, out="study/"))

Steps: the sets are separated (:mod:`.data`); each variant's encoder is pretrained on the
pool with the same budget, or reused (:mod:`.encoders`); every (variant, fraction, seed)
cell is probed or fine-tuned and scored on the labelled test split and the external set,
with a k-NN score of frozen features (:mod:`.cells`); then means, intervals, paired
differences and a verdict are written (:mod:`.report`).  Outputs in ``out``:
``results.csv`` (a row per cell), ``table.md``, ``plot.png``, ``summary.json`` (settings,
versions, data digests, machine, every number) and the runs themselves.
Re-running the same study in the same ``out`` resumes it: finished cells are read back.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError
from ..models.config import DEFAULT_POOL, EncoderConfig
from ..training.control import Control, NullControl
from .cells import METRICS, Cell, positive_index, run_cell
from .config import StudyConfig, Variant
from .data import StudyData, prepare_data
from .encoders import Encoder, architecture, obtain_encoder
from .events import StudyFinished, StudyProgress

if TYPE_CHECKING:
    from ..training.events import Event

#: settings whose change makes a study's finished cells meaningless (not resumable)
_FIXED = ("data", "test_data", "mode", "val_fraction", "test_fraction", "split_seed", "finetune", "knn_k")


@dataclass
class StudyResult:
    out: str
    rows: list[dict[str, Any]]
    table: list[dict[str, Any]]
    files: dict[str, str]
    verdict: str
    notes: list[str]


class _Clock:
    """Progress and time left over the study's tasks (pretraining runs and cells)."""

    def __init__(self, emit: Callable[[StudyProgress], None], n_pretrain: int, n_cells: int, budget_s: float) -> None:
        self.emit, self.n_pretrain, self.n_cells, self.budget_s = emit, n_pretrain, n_cells, budget_s
        self.done_pretrain, self.done_cells, self.cell_s = 0, 0, 10.0

    def total(self) -> int:
        """Work units of the study: pretraining runs plus cells."""
        return self.n_pretrain + self.n_cells

    def eta(self, inner_s: float = 0.0) -> float:
        """Seconds left: ``inner_s`` of the running pretraining (0: none running), a budget per pretraining
        run still to start, and the mean cell time per cell left."""
        left_pre = max(0, self.n_pretrain - self.done_pretrain - (1 if inner_s else 0))
        return inner_s + left_pre * self.budget_s + (self.n_cells - self.done_cells) * self.cell_s

    def say(self, stage: str, message: str | None = None, inner_s: float = 0.0) -> None:
        """Emit a StudyProgress for ``stage``: units done so far, the total and :meth:`eta`."""
        self.emit(StudyProgress(stage=stage, done=self.done_pretrain + self.done_cells, total=self.total(),
                                eta_s=self.eta(inner_s), message=message))


def run_study(config: StudyConfig, on_event: Callable[[StudyProgress | StudyFinished], None] | None = None,
              control: Control | None = None) -> StudyResult:
    """Run (or resume) the study ``config`` describes; see the module docstring."""
    emit = on_event or (lambda _e: None)
    control = control or NullControl()
    t0 = time.perf_counter()
    _check_sources(config)
    out = _claim_out(config)
    data = prepare_data(config)
    variants, notes = _usable_variants(config, data)
    notes = data.notes + notes
    arch = architecture(config)
    n_cells = len(variants) * len(config.fractions) * config.seeds
    budget_s = float(config.budget_minutes or 0) * 60.0 if config.budget_steps is None else 60.0
    clock = _Clock(emit, sum(v.pretrained for v in variants), n_cells, budget_s)
    encoders = _encoders(config, data, variants, out, clock, control)
    cells = _cells(config, data, variants, encoders, arch, out, clock, control)
    result = _report(config, data, variants, encoders, cells, out, notes, time.perf_counter() - t0)
    emit(StudyFinished(out=result.out, files=result.files, verdict=result.verdict, notes=tuple(result.notes),
                       table=tuple(result.table)))
    return result


def _check_sources(cfg: StudyConfig) -> None:
    """Name a data folder that does not exist before anything else is judged (a study resumed with
    a mistyped path must not be told that its results belong to other data)."""
    for name in ("data", "unlabeled", "test_data", "masks"):
        value = getattr(cfg, name)
        if value and not Path(value).expanduser().exists():
            raise ConfigError(f"{name}={value!r}: no such folder or file")


def _claim_out(cfg: StudyConfig) -> Path:
    """Create ``out``, or check that the study already there is this one (then it resumes)."""
    if not cfg.out:
        raise ConfigError("a study needs an output folder (--out DIR)")
    out = Path(cfg.out).expanduser()
    stored = out / "study.json"
    if stored.is_file():
        before = json.loads(stored.read_text(encoding="utf-8"))
        changed = [k for k in _FIXED if before.get(k) != json.loads(json.dumps(cfg.to_dict()))[k]]
        if changed:
            raise ConfigError(f"out={str(out)!r} holds a study with other {', '.join(changed)}; its results "
                              "cannot be reused: choose another --out")
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"out={str(out)!r} is not empty and holds no study; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    stored.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
    return out


def _usable_variants(cfg: StudyConfig, data: StudyData) -> tuple[list[Variant], list[str]]:
    """The variants these data can serve; rgmim needs a source of region masks."""
    variants, notes = cfg.variant_list(), []
    region = [v for v in variants if v.pretrain and v.pretrain.get("strategy") == "region"]
    if region and not (cfg.region_preset or cfg.region_model or data.pool_masks):
        variants = [v for v in variants if v not in region]
        notes.append("rgmim left out: the pool has no region masks; give --masks DIR, --region-preset or "
                     "--region-model")
    return variants, notes


def _encoders(cfg: StudyConfig, data: StudyData, variants: list[Variant], out: Path, clock: _Clock,
              control: Control) -> dict[str, Encoder]:
    from ..training.events import Progress

    root = Path(cfg.encoders).expanduser() if cfg.encoders else out / "encoders"
    found: dict[str, Encoder] = {}
    for v in variants:
        stage = f"pretraining {v.name}"

        def relay(event: Event, stage: str = stage) -> None:
            """Report a pretraining Progress event as this stage's StudyProgress; other events are dropped."""
            if isinstance(event, Progress):
                clock.say(stage, inner_s=event.eta_s or 0.0)

        if v.pretrained:
            clock.say(stage, f"study: {stage}")
        found[v.name] = obtain_encoder(cfg, data, v, root, on_event=relay, control=control)
        if v.pretrained:
            clock.done_pretrain += 1
            info = found[v.name].info
            clock.say(stage, f"study: {v.name}: " + ("reused " if info.get("reused") else "")
                      + f"{info.get('steps')} steps ({info.get('reason')}), loss {info.get('final_loss')}")
    return found


def _cells(cfg: StudyConfig, data: StudyData, variants: list[Variant], encoders: dict[str, Encoder],
           arch: EncoderConfig, out: Path, clock: _Clock, control: Control) -> list[Cell]:
    from ..training.finetune import FeatureCache

    cells: list[Cell] = []
    spent: list[float] = []
    for v in variants:
        cache, features = FeatureCache(), _feature_table(cfg, data, encoders[v.name], arch)
        for f in cfg.fractions:
            for seed in range(cfg.seeds):
                if control.stop_requested():
                    raise ConfigError("study stopped")
                t0 = time.perf_counter()
                cell = run_cell(cfg, data, encoders[v.name], arch, f, seed, out, features=features,
                                control=control, cache=cache)
                cells.append(cell)
                clock.done_cells += 1
                if not cell.reused:
                    spent.append(time.perf_counter() - t0)
                    clock.cell_s = float(np.mean(spent))
                clock.say(f"{cfg.mode} {v.name}", f"study: {v.name} {f * 100:g} % seed {seed}: "
                          f"AUC {_fmt(cell.metrics.get('auc'))}, k-NN {_fmt(cell.knn.get('auc'))}"
                          + (" (done before)" if cell.reused else ""))
    return cells


def _feature_table(cfg: StudyConfig, data: StudyData, enc: Encoder,
                   arch: EncoderConfig) -> Callable[[int], dict[str, np.ndarray]]:
    """``features(seed)`` -> {image path: feature} of every labelled and external image, computed
    once (per seed for a random encoder, whose draw the seed decides)."""
    from .knn import encoder_features

    samples = data.splits["train"] + data.splits["val"] + data.test + data.external
    pool = cfg.finetune.get("pool") or DEFAULT_POOL
    made: dict[int, dict[str, np.ndarray]] = {}

    def features(seed: int) -> dict[str, np.ndarray]:
        """{image path: feature [D]} for ``seed`` (one per seed only for a random encoder), made on first use."""
        key = seed if enc.source is None else 0
        if key not in made:
            device = "cpu" if cfg.device == "auto" else cfg.device
            x = encoder_features(enc.source, arch, samples, pool=pool, seed=key, device=device)
            made[key] = {str(s.image): row for s, row in zip(samples, x)}
        return made[key]

    return features


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _report(cfg: StudyConfig, data: StudyData, variants: list[Variant], encoders: dict[str, Encoder],
            cells: list[Cell], out: Path, notes: list[str], wall_s: float) -> StudyResult:
    from . import report as rep
    from .summary import summary

    names = [v.name for v in variants]
    rows = [c.row() for c in cells]
    keys = (*METRICS, "knn_auc") + ((*(f"external_{m}" for m in METRICS), "external_knn_auc") if data.external else ())
    table = rep.aggregate(rows, keys)
    pos = positive_index(data.classes, cfg.finetune.get("positive_class"))
    test_y = np.array([data.classes.index(str(s.label)) == pos for s in data.test])
    ivs = rep.intervals(cells, test_y, names, cfg.fractions, n_boot=cfg.bootstrap)
    text = rep.verdict(ivs["diff"], cfg.fractions)
    panels = [(f"labelled test split ({len(data.test)} images)", ivs["auc"])]
    ext_ivs = None
    if data.external:
        ext_y = np.array([data.classes.index(str(s.label)) == pos for s in data.external])
        ext_ivs = rep.intervals(cells, ext_y, names, cfg.fractions, external=True, n_boot=cfg.bootstrap)
        text += " On the external set: " + rep.verdict(ext_ivs["diff"], cfg.fractions)
        panels.append((f"external set ({len(data.external)} images)", ext_ivs["auc"]))
    files = {k: str(out / n) for k, n in (("results", "results.csv"), ("table_md", "table.md"),
                                          ("plot", "plot.png"), ("summary", "summary.json"))}
    _write_csv(Path(files["results"]), rows)
    header = _header(cfg, data, encoders)
    Path(files["table_md"]).write_text(rep.markdown(table, keys, ivs, cfg.fractions, names, title="Pretraining study",
                                                    header=header, verdict_text=text, notes=notes), encoding="utf-8")
    rep.plot(panels, names, Path(files["plot"]))
    record = summary(cfg, data, encoders, table, ivs, ext_ivs, text, notes, wall_s)
    record["wall_s_total"] = round(wall_s + _earlier_wall_s(Path(files["summary"])), 1)
    Path(files["summary"]).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return StudyResult(out=str(out), rows=rows, table=table, files=files, verdict=text, notes=notes)


def _earlier_wall_s(path: Path) -> float:
    """Seconds the runs of this study before this one took (from their ``summary.json``; a run that
    stopped before its report is not counted), so a resumed study reports more than its last part."""
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
        return float(before.get("wall_s_total", before.get("wall_s", 0.0)))
    except (OSError, ValueError, TypeError):
        return 0.0


def _header(cfg: StudyConfig, data: StudyData, encoders: dict[str, Encoder]) -> str:
    budget = (f"{cfg.budget_steps} steps" if cfg.budget_steps is not None else f"{cfg.budget_minutes:g} min")
    ext = f"; external set {cfg.test_data} ({len(data.external)} images)" if data.external else ""
    # reused encoders were pretrained without the images their own study held out
    sizes = sorted({len(data.pool_ids) - len(e.info.get("excluded", data.pool_excluded))
                    for e in encoders.values() if e.info.get("pretrained")})
    seen = " or ".join(str(n) for n in sizes) or str(len(data.pool_ids) - len(data.pool_excluded))
    reused = sum(bool(e.info.get("reused")) for e in encoders.values())
    return (f"Mode: {cfg.mode}; pretraining {budget} per variant on {cfg.unlabeled or cfg.data} ({seen} images"
            + (f"; {reused} encoder(s) reused" if reused else "") + f"); labelled: {cfg.data}, test split "
            f"{len(data.test)} images (by patient, split seed {cfg.split_seed}){ext}; {cfg.seeds} seed(s).")


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r)) or ["variant"]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})


__all__ = ["StudyResult", "run_study"]
