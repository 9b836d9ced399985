"""Does a search box find the image it was cut from?  Region search over an embedding index.

For ``--queries`` images of an index (``mim-workbench embed`` output), a box of 30-50 % of
each side is drawn at a random place, and the image is searched for in three forms:

* ``same``: the indexed image itself with the box (the user draws on an image of the folder);
* ``reacquired``: the image shifted by up to 6 % of its size, with another gamma (0.7-1.4) and
  noise (sd 0.03): the same patient and finding on another exposure;
* ``cut out``: only the box's pixels, on a mid-grey canvas of the image's size.

Reported per form: the share of queries whose source image is the first hit (top-1) or among
the first five (top-5), and the seconds per query.  Run it for a pretrained and for a random
encoder's index to see what pretraining adds::

    PYTHONPATH=. python benchmarks/bench_region_search.py --index DIR [--queries 100] [--seed 0]

Prints one JSON line per form.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from mim_workbench.inference.embed import EmbeddingIndex
from mim_workbench.inference.region_search import similar_region
from mim_workbench.io.model_input import as_unit_array

FORMS = ("same", "reacquired", "cut out")


def query_image(image: np.ndarray, box: tuple[int, int, int, int], form: str,
                rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The query pixels of ``form`` and the box on them."""
    if form == "same":
        return image, box
    if form == "cut out":
        t, l, b, r = box
        canvas = np.full_like(image, 0.5)
        canvas[t:b, l:r] = image[t:b, l:r]
        return canvas, box
    h, w = image.shape[:2]
    dy, dx = (rng.integers(-int(0.06 * s), int(0.06 * s) + 1) for s in (h, w))
    moved = np.roll(image, (dy, dx), axis=(0, 1)) ** rng.uniform(0.7, 1.4)
    moved = np.clip(moved + rng.normal(0, 0.03, moved.shape), 0, 1).astype(np.float32)
    t, l, b, r = box
    return moved, (int(np.clip(t + dy, 0, h - 2)), int(np.clip(l + dx, 0, w - 2)),
                   int(np.clip(b + dy, 2, h)), int(np.clip(r + dx, 2, w)))


def main() -> None:
    """Run the three forms over ``--queries`` random images of the index."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", required=True)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    index = EmbeddingIndex.load(args.index)
    rng = np.random.default_rng(args.seed)
    picks = rng.choice(len(index.rows), size=min(args.queries, len(index.rows)), replace=False)
    ranks: dict[str, list[int]] = {f: [] for f in FORMS}
    seconds: dict[str, float] = {f: 0.0 for f in FORMS}
    for i in picks:
        path = index.rows[i]["path"]
        image = as_unit_array(path)
        if image.ndim == 3:
            image = image.mean(-1)
        h, w = image.shape
        bh, bw = int(h * rng.uniform(0.3, 0.5)), int(w * rng.uniform(0.3, 0.5))
        top, left = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
        for form in FORMS:
            pixels, box = query_image(image, (top, left, top + bh, left + bw), form, rng)
            started = time.perf_counter()
            hits = similar_region(index, pixels, box, k=len(index.rows))
            seconds[form] += time.perf_counter() - started
            ranks[form].append(next(r for r, h in enumerate(hits) if h["path"] == path))
    for form in FORMS:
        r = np.array(ranks[form])
        print(json.dumps({"index": args.index, "checkpoint": index.checkpoint, "form": form, "queries": len(r),
                          "top1": float((r == 0).mean()), "top5": float((r < 5).mean()),
                          "median_rank": float(np.median(r) + 1),
                          "seconds_per_query": seconds[form] / len(r)}))


if __name__ == "__main__":
    main()
