"""CLI subcommands ``explain``, ``embed`` and ``similar``: what an encoder learned.

``explain`` writes attention, rollout, patch-feature colour and class-activation maps of one
image; ``embed`` writes an embedding per image of a data set (and, with labels, the k-NN
label agreement as a JSON line); ``similar`` prints an image's nearest neighbours in such an
index, one JSON line each.  COMMANDS holds their ``_add_<name>(sub) -> runner``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .args import AddCommand, Runner, add_checkpoint, add_data, add_device, add_image, add_out, add_quiet


def _add_explain(sub: argparse._SubParsersAction) -> Runner:
    p = sub.add_parser("explain", help="attention, rollout, feature-colour and class maps of an image",
                       description="Maps of what the encoder looks at in --image: the class token's attention "
                                   "in the last block (per head and averaged), attention rollout, the first three "
                                   "principal components of the patch features as RGB, and for a fine-tuned "
                                   "classifier its class-activation maps. PNGs plus the raw maps as TIFF.")
    add_checkpoint(p, "pretraining or fine-tuning checkpoint, or an exported encoder")
    add_image(p, "the image to explain")
    add_out(p, "folder for the maps")
    p.add_argument("--pca-images", nargs="*", default=None,
                   help="images to fit the feature colours on (default: the image itself); the same set "
                        "gives the same colours to every image")
    p.add_argument("--cam-class", action="append", default=None,
                   help="class of a fine-tuned classifier to map (repeatable; default the predicted one)")
    p.add_argument("--tiled", action="store_true",
                   help="one encoder pass per tile of the image, maps pieced together (large images; "
                        "images over 2048 px are reduced to it first, tiled or not)")
    p.add_argument("--tile", type=int, default=512, help="tile side in pixels of the (reduced) image (default 512)")
    add_device(p)
    return _run_explain


def _run_explain(args: argparse.Namespace) -> int:
    from ..inference.explain import Explainer, fit_patch_pca
    from ..training.runtime import select_device

    explainer = Explainer(args.checkpoint, device=select_device(args.device))
    pca = fit_patch_pca(explainer, args.pca_images) if args.pca_images else None
    if args.tiled:
        exp = explainer.explain_tiled(args.image, tile=args.tile, pca=pca, classes=args.cam_class)
    else:
        exp = explainer.explain(args.image, pca=pca or fit_patch_pca(explainer, [args.image]), classes=args.cam_class)
    paths = exp.save(args.out)
    print(json.dumps({"out": str(args.out), "files": sorted(p.name for p in paths), "heads": len(exp.attn_heads),
                      "cams": sorted(exp.cams), "tiles": exp.tiles, "scale": exp.scale,
                      "shape": list(exp.attn_mean.shape)}))
    return 0


def _add_embed(sub: argparse._SubParsersAction) -> Runner:
    p = sub.add_parser("embed", help="one embedding per image of a data set (for similar cases and maps)",
                       description="Embed every image of --data with the checkpoint's encoder into --out "
                                   "(embeddings.npy, index.json); re-running keeps unchanged images. With labels, "
                                   "the last stdout line is the leave-one-out k-NN label agreement.")
    add_checkpoint(p, "pretraining or fine-tuning checkpoint, or an exported encoder")
    add_data(p, "image folder, class folders or CSV manifest", required=True)
    add_out(p, "index folder")
    p.add_argument("--pool", choices=("token", "avg"), default="avg",
                   help="the mean of the patch tokens (default) or the class token")
    p.add_argument("-k", type=int, default=20, help="neighbours of the label agreement (default 20)")
    p.add_argument("--batch-size", type=int, default=32)
    add_device(p)
    add_quiet(p, "no progress on stderr")
    return _run_embed


def _run_embed(args: argparse.Namespace) -> int:
    from ..inference.embed import embed_dataset, knn_agreement
    from ..training.runtime import select_device

    def progress(done: int, total: int) -> None:
        """One line on stderr per batch."""
        if not args.quiet:
            print(f"mim-workbench embed: {done}/{total} images", file=sys.stderr, flush=True)

    index = embed_dataset(args.checkpoint, args.data, args.out, pool=args.pool, batch_size=args.batch_size,
                          device=select_device(args.device), on_progress=progress)
    labels = index.labels()
    agreement = knn_agreement(index.vectors, labels, k=args.k)
    record = {"index": str(Path(args.out)), "images": len(labels), "dim": int(index.vectors.shape[1])}
    if agreement is not None:
        record.update(knn_agreement=agreement, k=min(args.k, sum(lab is not None for lab in labels) - 1))
    print(json.dumps(record))
    return 0


def _add_similar(sub: argparse._SubParsersAction) -> Runner:
    p = sub.add_parser("similar", help="the images of an embedding index nearest to an image",
                       description="One JSON line per neighbour, nearest first: path, cosine distance, label.")
    p.add_argument("--index", required=True, help="a folder written by mim-workbench embed")
    add_image(p, "the query image (an image of the index comes first, at distance 0)")
    p.add_argument("--box", default=None, metavar="TOP,LEFT,BOTTOM,RIGHT",
                   help="search by this region of the image (pixels): images holding something like it, "
                        "each with the box where it matches best")
    p.add_argument("-k", type=int, default=8, help="neighbours (default 8)")
    p.add_argument("--exclude-same-patient", action="store_true",
                   help="leave out the query's other images (where the data set names patients)")
    add_device(p)
    return _run_similar


def _run_similar(args: argparse.Namespace) -> int:
    from ..inference.embed import EmbeddingIndex, similar
    from ..training.runtime import select_device

    index = EmbeddingIndex.load(args.index)
    options = {"k": args.k, "exclude_same_patient": args.exclude_same_patient, "device": select_device(args.device)}
    if args.box is None:
        hits = similar(index, args.image, **options)
    else:
        from ..inference.region_search import similar_region

        hits = similar_region(index, args.image, _box(args.box), **options)
    for row in hits:
        print(json.dumps(row))
    return 0


def _box(text: str) -> tuple[float, ...]:
    """``--box TOP,LEFT,BOTTOM,RIGHT`` as numbers; ConfigError naming the value otherwise."""
    from ..errors import ConfigError

    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise ConfigError(f"--box {text!r}: give four numbers TOP,LEFT,BOTTOM,RIGHT (pixels)")
    return values


COMMANDS: list[AddCommand] = [_add_explain, _add_embed, _add_similar]
