"""One embedding per image of a data set, nearest-neighbour search over them, and label agreement.

:func:`embed_dataset` writes an index folder: ``embeddings.npy`` (``[N, D]`` float32, unit
length), ``patches.npy`` (``[N, D, gh, gw]`` float16: each image's patch features, for
searching by region, :mod:`.region_search`) and ``index.json`` (the checkpoint and its
digest, the pooling, the encoder's input size, and per image its path, id, label, patient,
size and file fingerprint).  Run again on the same folder it keeps the rows of unchanged
images and embeds only new or changed ones; a changed checkpoint (another digest) or pooling
embeds everything again.  Distances are cosine distances (1 - cosine).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import ConfigError
from ..models.config import DEFAULT_POOL, POOLS

if TYPE_CHECKING:
    from ..io.samples import Sample
    from .reconstruct import CheckpointLike, ImageLike

INDEX_FILE, VECTORS_FILE, PATCHES_FILE = "index.json", "embeddings.npy", "patches.npy"
#: patch grids wider than this are average-pooled to it, so an index stays a few hundred MB at most
MAX_GRID = 16


def checkpoint_digest(checkpoint: CheckpointLike) -> str:
    """sha256 (first 16 hex digits) of the weights ``checkpoint`` names: it changes when they do."""
    from ..models.checkpoint import MODEL_FILE, load_checkpoint

    path = Path(str(checkpoint))
    weights = path if path.is_file() and path.suffix == ".safetensors" else load_checkpoint(path).path / MODEL_FILE
    h = hashlib.sha256()
    with open(weights, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


class Embedder:
    """A checkpoint's encoder turning images into unit-length feature vectors."""

    def __init__(self, checkpoint: CheckpointLike, *, pool: str = DEFAULT_POOL, device: str | torch.device = "cpu") -> None:
        """``pool``: the mean of the patch tokens ("avg") or the class token ("token"; the mean
        when the model has none).
        CheckpointError when the checkpoint holds no encoder; ConfigError for another pool."""
        from .explain import Explainer

        if pool not in POOLS:
            raise ConfigError(f"pool={pool!r}: choose {' or '.join(POOLS)}")
        self.explainer, self.pool = Explainer(checkpoint, device=device), pool

    def vectors(self, images: list[ImageLike]) -> np.ndarray:
        """``[len(images), D]`` float32 unit-length embeddings."""
        return self.encode(images)[0]

    @torch.no_grad()
    def encode(self, images: list[ImageLike]) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings ``[n, D]`` (float32, unit length) and patch features ``[n, D, gh, gw]``
        (float32, after the final norm; grids wider than ``MAX_GRID`` average-pooled to it)."""
        from ..models.classifier import patch_grid
        from ..models.encoder import encoder_tokens
        from .explain import bounded

        enc = self.explainer.encoder
        if not images:
            return np.zeros((0, enc.embed_dim), np.float32), np.zeros((0, enc.embed_dim, 1, 1), np.float32)
        x = torch.cat([self.explainer.model_input(bounded(im)[0])[0] for im in images])
        tokens = encoder_tokens(enc, x)
        P = enc.num_prefix_tokens
        feat = tokens[:, 0] if self.pool == "token" and enc.cls_token is not None else tokens[:, P:].mean(1)
        grid = patch_grid(enc, tokens).float()
        if max(grid.shape[-2:]) > MAX_GRID:
            grid = torch.nn.functional.adaptive_avg_pool2d(grid, (min(grid.shape[-2], MAX_GRID),
                                                                  min(grid.shape[-1], MAX_GRID)))
        return (torch.nn.functional.normalize(feat.float(), dim=-1).cpu().numpy(), grid.cpu().numpy())


@dataclass
class EmbeddingIndex:
    """The embeddings of a data set and what each row is (see the module docstring)."""

    root: Path
    checkpoint: str
    digest: str
    pool: str
    rows: list[dict[str, Any]]       # path, id, label, patient, size (H, W), fingerprint
    vectors: np.ndarray              # [N, D] float32, unit length
    patches: np.ndarray | None = None   # [N, D, gh, gw] float16 (None: an index without them)
    img_size: tuple[int, int] | None = None   # the encoder's input (H, W), which the patch grid covers
    _embedder: Embedder | None = field(default=None, repr=False, compare=False)

    def embedder(self, device: str | torch.device = "cpu") -> Embedder:
        """The encoder that embeds queries for this index: loaded once per index (the one that
        made it, for an index :func:`embed_dataset` returns)."""
        if self._embedder is None:
            self._embedder = Embedder(self.checkpoint, pool=self.pool, device=device)
        return self._embedder

    @classmethod
    def load(cls, root: str | Path) -> EmbeddingIndex:
        """Read an index folder; ConfigError naming what is missing or unreadable."""
        root = Path(root)
        try:
            meta = json.loads((root / INDEX_FILE).read_text(encoding="utf-8"))
            vectors = np.load(root / VECTORS_FILE)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{root}: not an embedding index (mim-workbench embed writes one): {exc}") from None
        if len(meta.get("rows", [])) != len(vectors):
            raise ConfigError(f"{root}: {INDEX_FILE} and {VECTORS_FILE} disagree; embed the data set again")
        patches = np.load(root / PATCHES_FILE, mmap_mode="r") if (root / PATCHES_FILE).is_file() else None
        if patches is not None and len(patches) != len(vectors):
            patches = None       # written by an interrupted run: region search asks to embed again
        img_size = tuple(meta["img_size"]) if meta.get("img_size") else None
        return cls(root, meta["checkpoint"], meta["digest"], meta["pool"], meta["rows"], vectors, patches, img_size)

    def save(self) -> None:
        """Write the files (the arrays first, so a crash never leaves rows without vectors)."""
        self.root.mkdir(parents=True, exist_ok=True)
        _save_array(self.root / VECTORS_FILE, self.vectors.astype(np.float32))
        if self.patches is not None:
            _save_array(self.root / PATCHES_FILE, np.asarray(self.patches, dtype=np.float16))
        meta = {"checkpoint": self.checkpoint, "digest": self.digest, "pool": self.pool,
                "img_size": list(self.img_size) if self.img_size else None, "rows": self.rows}
        (self.root / INDEX_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")

    def labels(self) -> list[str | None]:
        """Each row's label (None where the data set has none)."""
        return [r.get("label") for r in self.rows]


def _save_array(path: Path, array: np.ndarray) -> None:
    """``np.save`` through a temporary file: an index open elsewhere (memory-mapped) keeps its old file."""
    import os

    tmp = path.with_name(path.stem + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def _fingerprint(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def embed_dataset(checkpoint: CheckpointLike, data: str | Path, out: str | Path, *, pool: str = DEFAULT_POOL,
                  batch_size: int = 32, device: str | torch.device = "cpu",
                  on_progress: Callable[[int, int], None] | None = None) -> EmbeddingIndex:
    """Embed every image of ``data`` (any layout ``discover`` reads) into the index folder ``out``,
    reusing the rows of an earlier run with the same checkpoint and pooling for unchanged
    images; ``on_progress(done, total)`` after each batch.  ConfigError for an empty data set."""
    from ..io import read_image
    from ..io.datasets import discover

    samples = list(discover(data).samples)
    if not samples:
        raise ConfigError(f"data={str(data)!r}: no images found")
    digest = checkpoint_digest(checkpoint)
    old = _reusable(Path(out), digest, pool)
    embedder = Embedder(checkpoint, pool=pool, device=device)
    rows, vectors, grids, todo = _rows(samples), [None] * len(samples), [None] * len(samples), []
    for i, row in enumerate(rows):
        vectors[i], grids[i], size = old.get(tuple(row["fingerprint"]), (None, None, None))
        if vectors[i] is None:
            todo.append(i)
        row["size"] = size
    for start in range(0, len(todo), batch_size):
        part = todo[start:start + batch_size]
        images = [read_image(samples[i].image, keep_color=False) for i in part]
        for i, image in zip(part, images):
            rows[i]["size"] = [int(image.data.shape[0]), int(image.data.shape[1])]
        for i, v, g in zip(part, *embedder.encode(images)):
            vectors[i], grids[i] = v, g.astype(np.float16)
        if on_progress is not None:
            on_progress(len(samples) - len(todo) + start + len(part), len(samples))
    index = EmbeddingIndex(Path(out), str(checkpoint), digest, pool, rows, np.stack(vectors).astype(np.float32),
                           np.stack(grids), tuple(embedder.explainer.img_size), embedder)
    index.save()
    return index


def _rows(samples: list[Sample]) -> list[dict[str, Any]]:
    return [{"path": str(s.image), "id": s.id, "label": s.label, "patient": s.patient, "size": None,
             "fingerprint": _fingerprint(Path(s.image))} for s in samples]


def _reusable(out: Path, digest: str, pool: str) -> dict[tuple, tuple[np.ndarray, np.ndarray, list[int]]]:
    """(vector, patch grid, image size) of an earlier index in ``out`` by image fingerprint, when made with
    this checkpoint and pooling and holding patch grids."""
    if not (out / INDEX_FILE).is_file():
        return {}
    try:
        old = EmbeddingIndex.load(out)
    except ConfigError:
        return {}
    if (old.digest, old.pool) != (digest, pool) or old.patches is None:
        return {}
    return {tuple(r["fingerprint"]): (v, np.array(g), r.get("size"))
            for r, v, g in zip(old.rows, old.vectors, old.patches)}


def knn_agreement(vectors: np.ndarray, labels: list[str | None], *, k: int = 20) -> float | None:
    """Leave-one-out k-nearest-neighbour label agreement (cosine): the share of labelled images whose
    ``k`` nearest other labelled images vote (majority, nearer first on a tie) for their own label.
    None with fewer than two labelled images."""
    keep = [i for i, lab in enumerate(labels) if lab is not None]
    if len(keep) < 2:
        return None
    x = vectors[keep]
    y = [labels[i] for i in keep]
    k = min(k, len(keep) - 1)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    right = 0
    for i, nbrs in enumerate(order):
        votes = Counter(y[j] for j in nbrs)
        top = max(votes.values())
        winner = next(y[j] for j in nbrs if votes[y[j]] == top)   # the nearest of the tied labels
        right += winner == y[i]
    return right / len(keep)


def similar(index: EmbeddingIndex, image: ImageLike, *, k: int = 8, exclude_same_patient: bool = False,
            device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """The ``k`` images of ``index`` nearest to ``image`` (``path``, ``distance``, ``label``),
    nearest first; an image of the index is its own first neighbour, at distance 0."""
    rows = index.rows
    own = _own_row(index, image)
    if own is not None:
        query = index.vectors[own]
    else:
        query = index.embedder(device).vectors([image])[0]
    dist = 1.0 - index.vectors @ query
    if own is not None:
        dist[own] = 0.0
    patient = rows[own].get("patient") if own is not None else None
    out = []
    for i in np.argsort(dist, kind="stable"):
        if exclude_same_patient and patient is not None and i != own and rows[i].get("patient") == patient:
            continue
        out.append({"path": rows[i]["path"], "distance": float(max(dist[i], 0.0)), "label": rows[i].get("label")})
        if len(out) == k:
            break
    return out


def _own_row(index: EmbeddingIndex, image: ImageLike) -> int | None:
    """The row of ``image`` (a path) in the index, if it is one of its images."""
    if not isinstance(image, (str, Path)):
        return None
    target = str(Path(image).resolve())
    return next((i for i, r in enumerate(index.rows) if r["fingerprint"][0] == target), None)


__all__ = ["EmbeddingIndex", "Embedder", "checkpoint_digest", "embed_dataset", "knn_agreement", "similar"]
