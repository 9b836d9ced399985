"""Side by side: what a pretrained and a random encoder look at on the same chest X-rays.

For each encoder and image: the image, the class token's attention in the last block (mean
over heads), the attention rollout and the feature colours (PCA fitted on ``--fit`` images of
the folder, the same for both rows of an encoder).  Writes one PNG::

    PYTHONPATH=. python benchmarks/explain_figure.py --pretrained CKPT --random CKPT \\
        --images IMG IMG --fit-folder DIR --out docs/explain-pretrained-vs-random.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mim_workbench.inference.explain import Explainer, fit_patch_pca
from mim_workbench.io.datasets import discover
from mim_workbench.io.model_input import as_unit_array

COLUMNS = ("image", "attention (last block)", "rollout", "feature colours (PCA)")


def main() -> None:
    """Compute the maps and draw the grid of panels."""
    from matplotlib.figure import Figure

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrained", required=True)
    ap.add_argument("--random", required=True)
    ap.add_argument("--images", nargs="+", required=True)
    ap.add_argument("--fit-folder", required=True)
    ap.add_argument("--fit", type=int, default=15)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    samples = list(discover(args.fit_folder).samples)
    fit = [s.image for s in samples[:: max(1, len(samples) // args.fit)][: args.fit]]
    rows = []
    for name, ckpt in (("pretrained", args.pretrained), ("random", args.random)):
        explainer = Explainer(ckpt)
        pca = fit_patch_pca(explainer, fit)
        for image in args.images:
            exp = explainer.explain(image, pca=pca)
            rows.append((f"{name}: {Path(image).stem}", [as_unit_array(image), exp.attn_mean, exp.rollout, exp.pca_rgb]))
    fig = Figure(figsize=(2.2 * len(COLUMNS), 2.2 * len(rows)), dpi=110, layout="constrained")
    axes = fig.subplots(len(rows), len(COLUMNS))
    for r, (title, panels) in enumerate(rows):
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(panel, cmap="gray" if c == 0 else "inferno", interpolation="nearest" if c == 3 else "bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(COLUMNS[c], fontsize=8)
            if c == 0:
                ax.set_ylabel(title, fontsize=8)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
