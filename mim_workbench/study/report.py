"""A study's numbers in words, tables and a plot.

Per (variant, fraction): mean ± sd over seeds of each metric and the AUC's bootstrap
interval.  Comparisons: every pretrained variant against ``scratch``, ``rgmim`` against
``mae`` and a continued ``init:NAME+mae`` against ``init:NAME`` - each a paired AUC
difference with its interval (:mod:`.stats`) - and a verdict that says them in plain words.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .cells import Cell
from .stats import Interval, auc_interval, paired_auc_difference

_TITLES = {"auc": "AUC", "ap": "AP", "accuracy": "Accuracy", "balanced_accuracy": "Balanced accuracy",
           "knn_auc": "k-NN AUC (frozen features)"}


def comparisons(variants: list[str]) -> list[tuple[str, str]]:
    """(variant, reference) pairs worth a paired difference, in the order the verdict says them."""
    pairs = [(v, "scratch") for v in variants if v != "scratch" and not v.startswith("init:")
             and "scratch" in variants]
    if "mae" in variants:   # every other pretraining method against MAE's, region guidance first
        pairs += [(v, "mae") for v in sorted(variants, key=lambda v: v != "rgmim")
                  if v not in ("mae", "scratch") and not v.startswith("init:")]
    pairs += [(v, v[: -len("+mae")]) for v in variants if v.startswith("init:") and v.endswith("+mae")
              and v[: -len("+mae")] in variants]
    pairs += [(v, "scratch") for v in variants if v.startswith("init:") and "scratch" in variants]
    return pairs


def _matrix(cells: list[Cell], variant: str, fraction: float, external: bool) -> tuple[np.ndarray, list[int]]:
    chosen = sorted((c for c in cells if c.variant == variant and c.fraction == fraction), key=lambda c: c.seed)
    rows = [c.external_scores if external else c.test_scores for c in chosen]
    return (np.stack(rows) if rows else np.zeros((0, 0))), [c.seed for c in chosen]


def intervals(cells: list[Cell], labels: np.ndarray, variants: list[str], fractions: tuple[float, ...], *,
              external: bool = False, n_boot: int = 2000) -> dict[str, Any]:
    """{"auc": {(variant, fraction): Interval}, "diff": {(a, b, fraction): Interval}} on one test set."""
    out: dict[str, Any] = {"auc": {}, "diff": {}}
    if labels.size == 0 or not 0 < labels.sum() < labels.size:
        return out
    for v in variants:
        for f in fractions:
            m, _ = _matrix(cells, v, f, external)
            if len(m):
                out["auc"][(v, f)] = auc_interval(labels, m, n_boot=n_boot)
    for a, b in comparisons(variants):
        for f in fractions:
            ma, sa = _matrix(cells, a, f, external)
            mb, sb = _matrix(cells, b, f, external)
            common = sorted(set(sa) & set(sb))
            if common:
                out["diff"][(a, b, f)] = paired_auc_difference(
                    labels, ma[[sa.index(s) for s in common]], mb[[sb.index(s) for s in common]], n_boot=n_boot)
    return out


def aggregate(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """Mean, sd (ddof=1) and count over seeds of each metric in ``keys``, per (variant, fraction)."""
    out = []
    for v, f in dict.fromkeys((r["variant"], r["fraction"]) for r in rows):
        sel = [r for r in rows if r["variant"] == v and r["fraction"] == f]
        row: dict[str, Any] = {"variant": v, "fraction": f, "seeds": len(sel),
                               "n_train": int(np.mean([r["n_train"] for r in sel]))}
        for k in keys:
            vals = [float(r[k]) for r in sel if r.get(k) is not None]
            row[f"{k}_mean"] = float(np.mean(vals)) if vals else None
            row[f"{k}_sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else (0.0 if vals else None)
        out.append(row)
    return out


def _pct(f: float) -> str:
    return f"{f * 100:g} %"


def verdict(diffs: dict[tuple[str, str, float], Interval], fractions: tuple[float, ...], where: str = "") -> str:
    """One paragraph: each comparison's AUC change with its interval, and what it means."""
    names = {"scratch": "no pretraining", "mae": "MAE pretraining", "rgmim": "region-guided masking",
             "simmim": "SimMIM pretraining", "miram": "multi-scale (MIRAM) pretraining",
             "beit": "visual-token (BEiT) pretraining", "feature": "teacher-feature (data2vec) pretraining"}
    parts = []
    for a, b in dict.fromkeys((a, b) for a, b, _ in diffs):
        cells = [(f, diffs[(a, b, f)]) for f in fractions if (a, b, f) in diffs]
        said = ", ".join(f"{iv.text(signed=True)} at {_pct(f)} labels" for f, iv in cells)
        up = [_pct(f) for f, iv in cells if iv.low > 0]
        down = [_pct(f) for f, iv in cells if iv.high < 0]
        if up and not down:
            meaning = f"a real gain at {', '.join(up)}"
        elif down and not up:
            meaning = f"a real loss at {', '.join(down)}"
        elif up and down:
            meaning = f"a gain at {', '.join(up)} but a loss at {', '.join(down)}"
        else:
            meaning = "no difference the intervals can tell from zero"
        parts.append(f"Against {names.get(b, b)}, {names.get(a, a)} changed {where}AUC by {said}: {meaning}.")
    if not parts:
        return "No comparison could be made (a study needs scratch and at least one other variant)."
    return " ".join(parts) + " (Paired differences, 95 % bootstrap intervals over test images and seeds.)"


def markdown(table: list[dict[str, Any]], keys: tuple[str, ...], ivs: dict[str, Any], fractions: tuple[float, ...],
             variants: list[str], *, title: str, header: str, verdict_text: str, notes: list[str]) -> str:
    """``table.md``: the verdict, AUC with intervals, paired differences, then each metric's mean ± sd."""
    cols = [_pct(f) for f in fractions]
    head = ["| Variant | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines = [f"# {title}", "", header, "", verdict_text, "", "## AUC with 95 % interval", ""] + head
    for v in variants:
        lines.append(f"| {v} | " + " | ".join(ivs["auc"][(v, f)].text() if (v, f) in ivs["auc"] else "n/a"
                                              for f in fractions) + " |")
    if ivs["diff"]:
        lines += ["", "## Paired AUC differences", "", "| Comparison | " + " | ".join(cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for a, b in dict.fromkeys((a, b) for a, b, _ in ivs["diff"]):
            lines.append(f"| {a} − {b} | " + " | ".join(
                ivs["diff"][(a, b, f)].text(signed=True) if (a, b, f) in ivs["diff"] else "n/a"
                for f in fractions) + " |")
    for k in keys:
        lines += ["", f"## {_TITLES.get(k.replace('external_', ''), k)} (mean ± sd over seeds)", ""] + head
        for v in variants:
            cells = []
            for f in fractions:
                r = next((t for t in table if t["variant"] == v and t["fraction"] == f), None)
                cells.append("n/a" if r is None or r.get(f"{k}_mean") is None
                             else f"{r[f'{k}_mean']:.3f} ± {r[f'{k}_sd']:.3f}")
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot(panels: list[tuple[str, dict[tuple[str, float], Interval]]], variants: list[str], path: Path) -> Path:
    """AUC against the label fraction, a line per variant with its interval shaded; a panel per test set."""
    from matplotlib.figure import Figure  # no pyplot: no backend or GUI state is touched

    fig = Figure(figsize=(6.5 * len(panels), 4.2), dpi=100)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (title, auc) in zip(axes, panels):
        for v in variants:
            pts = sorted((f, iv) for (vv, f), iv in auc.items() if vv == v)
            if not pts:
                continue
            x = [f for f, _ in pts]
            ax.plot(x, [iv.value for _, iv in pts], marker="o", label=v)
            ax.fill_between(x, [iv.low for _, iv in pts], [iv.high for _, iv in pts], alpha=0.15)
        ax.set_xscale("log")
        ticks = sorted({f for (_, f) in auc})
        ax.set_xticks(ticks, [_pct(f) for f in ticks])
        ax.minorticks_off()
        ax.set_xlabel("share of the training labels")
        ax.set_ylabel("AUC")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


__all__ = ["aggregate", "comparisons", "intervals", "markdown", "plot", "verdict"]
