"""A 2-D map of a data set's embeddings, what to colour it by, and labels given on the map.

:func:`project` lays the embeddings of an index (:mod:`.embed`) out in two dimensions: PCA
(linear, fast, the same map every time), t-SNE (scikit-learn; neighbourhoods kept, distances
between clusters meaningless) or UMAP (when ``umap-learn`` is installed).  :func:`colour_columns`
lists what each point can be coloured by: label, patient and every column of the data set's
table.  :func:`save_labels` writes labels given to a selection of points to a manifest CSV
(``image,label,patient``) that ``finetune --data`` reads, merging with what the file holds.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import ConfigError

PROJECTIONS = ("pca", "tsne", "umap")


def project(vectors: np.ndarray, method: str = "pca", *, seed: int = 0) -> np.ndarray:
    """``[N, 2]`` float32 coordinates of the ``[N, D]`` embeddings.  ConfigError for fewer than
    two embeddings, another method, or UMAP without ``umap-learn``."""
    x = np.asarray(vectors, dtype=np.float32)
    if len(x) < 2:
        raise ConfigError(f"an embedding map needs at least two images, the index has {len(x)}")
    if method == "pca":
        from sklearn.decomposition import PCA

        xy = PCA(n_components=2, svd_solver="full").fit_transform(x - x.mean(0)) if x.shape[1] > 1 else \
            np.c_[x, np.zeros(len(x))]
    elif method == "tsne":
        from sklearn.manifold import TSNE

        xy = TSNE(n_components=2, perplexity=min(30.0, (len(x) - 1) / 3), init="pca", random_state=seed,
                  metric="cosine").fit_transform(x)
    elif method == "umap":
        try:
            import umap
        except ImportError:
            raise ConfigError("projection 'umap' needs the umap-learn package (pip install umap-learn); "
                              "'pca' and 'tsne' need nothing more") from None
        xy = umap.UMAP(n_components=2, random_state=seed, metric="cosine",
                       n_neighbors=min(15, len(x) - 1)).fit_transform(x)
    else:
        raise ConfigError(f"projection {method!r}: choose one of {', '.join(PROJECTIONS)}")
    return np.asarray(xy, dtype=np.float32)


def colour_columns(rows: list[dict], data: str | os.PathLike | None = None) -> dict[str, list[str | None]]:
    """What each row of an index can be coloured by: ``label``, ``patient`` (where any row has
    one) and every column of ``data``'s table (its manifest or ``labels.csv``)."""
    from ..io.datasets import table_columns
    from ..io.samples import Sample

    columns: dict[str, list[str | None]] = {}
    for key in ("label", "patient"):
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            columns[key] = values
    if data is not None:
        # the index's rows already name each image and its id: no second discovery of the folder
        samples = [Sample(id=r.get("id", ""), image=Path(r["path"])) for r in rows]
        for col, values in table_columns(data, samples).items():
            if col.lower() not in columns and any(v is not None for v in values):
                columns[col] = values
    return columns


def save_labels(path: str | os.PathLike, labels: Mapping[str, str], patients: Mapping[str, str | None] | None = None,
                ) -> Path:
    """Give each image of ``labels`` (path -> label) its label in the manifest ``path``: rows of
    other images are kept, an image already there is relabelled, new images are added.  Paths
    are written relative to the manifest's folder when they lie under it.  The file is replaced
    in one step, so a crash leaves the old one.  ConfigError for an empty label or an unreadable file."""
    path = Path(path)
    if any(not str(v).strip() for v in labels.values()):
        raise ConfigError("a label cannot be empty")
    rows = _read_manifest(path)
    patients = patients or {}
    for image, label in labels.items():
        key = str(Path(image).resolve())
        rows[key] = {"label": str(label).strip(), "patient": patients.get(image) or rows.get(key, {}).get("patient")}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(["image", "label", "patient"])
        for image, row in rows.items():
            out.writerow([_relative(image, path.parent), row["label"], row.get("patient") or ""])
    os.replace(tmp, path)
    return path


def read_labels(path: str | os.PathLike) -> dict[str, str | None]:
    """The labels a manifest written by :func:`save_labels` gives, by absolute image path (empty
    when the file does not exist).  ConfigError for a file that is not such a manifest."""
    return {image: row["label"] or None for image, row in _read_manifest(Path(path)).items()}


def _read_manifest(path: Path) -> dict[str, dict]:
    """Rows of an existing labels manifest by absolute image path (empty when there is none)."""
    if not path.exists():
        return {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if "image" not in (reader.fieldnames or []):
                raise ConfigError(f"{path}: not a labels manifest (no 'image' column); choose another file")
            return {str((path.parent / r["image"]).resolve()): {"label": r.get("label") or "",
                                                                 "patient": r.get("patient") or None}
                    for r in reader if r.get("image")}
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None


def _relative(image: str, base: Path) -> str:
    """``image`` relative to ``base`` when under it, else absolute."""
    try:
        return Path(image).relative_to(base.resolve()).as_posix()
    except ValueError:
        return image


__all__ = ["PROJECTIONS", "colour_columns", "project", "read_labels", "save_labels"]
