"""Markdown tables from a ``mim-workbench bench`` JSONL file.

    python benchmarks/table.py benchmarks/results/bench-2026-11-22.jsonl
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def load(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def tables(records: list[dict]) -> str:
    out: list[str] = []
    machine = next((r for r in records if r["record"] == "machine"), {})
    end = next((r for r in records if r["record"] == "end"), {})
    gemm = [s for r in records if r["record"] == "gemm" for s in r["samples"]]
    out.append(f"Machine: {machine.get('cpu')} — {machine.get('cores')} cores, torch {machine.get('torch')}, "
               f"timm {machine.get('timm')}, lightly {machine.get('lightly')}, {machine.get('threads')} threads, "
               f"OMP_WAIT_POLICY={machine.get('omp_wait_policy')}; CPU idle before/after: "
               f"{_pct(machine.get('cpu_idle'))} / {_pct(end.get('cpu_idle'))}; "
               f"load average {_f(machine.get('loadavg', [None])[0])} → {_f(end.get('loadavg', [None])[0])}.")
    if gemm:
        out.append(f"fp32 GEMM (torch.mm 2048²): median {statistics.median(gemm):.0f} GFLOP/s "
                   f"(min {min(gemm):.0f}, max {max(gemm):.0f}, {len(gemm)} samples).")
    out.append("")
    out.append("| impl | method | strategy | C | amp | step s (median) | q1–q3 | images/s | model GFLOP | "
               "useful GFLOP | efficiency | loss |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    # Step rows are printed as they are measured, with the GEMM median *so far*; a load spike
    # in the first GEMM samples then inflates the first group's efficiency.  The table uses
    # the median of all of the run's GEMM samples (the end record's), as documented.
    overall = end.get("gemm_gflops")
    for r in records:
        if r["record"] != "step":
            continue
        eff = r["useful_flops"] / r["step_s"] / (overall * 1e9) if overall else r["efficiency"]
        amp = r["amp"] + (" + compile" if r.get("compile") else "")
        out.append(f"| {r['impl']} | {r['method']} | {r['strategy']} | {r['in_chans']} | {amp} | "
                   f"{r['step_s']:.3f} | {r['step_s_q1']:.3f}–{r['step_s_q3']:.3f} | {r['images_per_s']:.1f} | "
                   f"{r['model_flops'] / 1e9:.1f} | {r['useful_flops'] / 1e9:.1f} | {100 * eff:.0f} % | "
                   f"{r['loss']:.3f} |")
    comp = [r for r in records if r["record"] == "compare"]
    if comp:
        out.append("")
        out.append("| C | ours (mae/random) | s | peer | s | speed-up | per-block speed-ups |")
        out.append("|---|---|---|---|---|---|---|")
        for r in comp:
            ours = f"{r.get('ours_amp', 'off')}".replace("off", "fp32") + (" + compile" if r.get("ours_compile") else "")
            peer_amp = f"{r.get('peer_amp', 'off')}".replace("off", "fp32")
            if r.get("measured", True):
                blocks = ", ".join(f"{b:.2f}" for b in r["speedup_blocks"])
                out.append(f"| {r['in_chans']} | {ours} | {r['ours_step_s']:.3f} | {r['peer']} "
                           f"{r.get('peer_version') or ''} {peer_amp} | {r['peer_step_s']:.3f} | "
                           f"**{r['speedup']:.2f}×** | {blocks} |")
            else:
                lo, hi = r["peer_step_s"]
                out.append(f"| {r['in_chans']} | {ours} | {r['ours_step_s']:.3f} | {r['peer']} fp32 (quoted figure, "
                           f"not measured) | {lo:.2f}–{hi:.2f} | {r['speedup'][0]:.2f}–{r['speedup'][1]:.2f}× | |")
    mask = [r for r in records if r["record"] == "masking"]
    if mask:
        out.append("")
        out.append("| masking | batch | strategy ms | coverage ms | total ms | at step batch ms | share of step |")
        out.append("|---|---|---|---|---|---|---|")
        for r in mask:
            share = f"{100 * r['share_of_step']:.2f} %" if "share_of_step" in r else ""
            cov = f"{r['coverage_ms']:.2f}" if "coverage_ms" in r else "–"
            out.append(f"| {r['strategy']} | {r['batch_size']} | {r['mask_ms']:.2f} | {cov} | {r['total_ms']:.2f} | "
                       f"{r['step_batch_ms']:.2f} | {share} |")
    data = [r for r in records if r["record"] == "data"]
    if data:
        out.append("")
        out.append("| data pipeline | workers | images/s | × model images/s (fp32) | × fastest model images/s |")
        out.append("|---|---|---|---|---|")
        for r in data:
            if "error" in r:
                out.append(f"| error: {r['error']} | | | | |")
                continue
            ratio = f"{r['ratio_to_model']:.1f}×" if r.get("ratio_to_model") else ""
            fast = (f"{r['ratio_to_fastest_model']:.1f}× ({r['fastest_model_images_per_s']:.0f} img/s)"
                    if r.get("ratio_to_fastest_model") else "")
            out.append(f"| {r['mode']} | {r['workers']} | {r['images_per_s']:.0f} | {ratio} | {fast} |")
    inf = [r for r in records if r["record"] == "inference"]
    if inf:
        out.append("")
        out.append("| inference (forward + render) | batch | s/batch | images/s |")
        out.append("|---|---|---|---|")
        for r in inf:
            out.append(f"| {r['method']} | {r['batch_size']} | {r['batch_s']:.3f} | {r['images_per_s']:.0f} |")
    return "\n".join(out) + "\n"


def _pct(v) -> str:
    return "?" if v is None else f"{100 * v:.0f} %"


def _f(v) -> str:
    return "?" if v is None else f"{v:.2f}"


if __name__ == "__main__":
    sys.stdout.write(tables(load(sys.argv[1])))
