"""k-nearest-neighbour scores on frozen encoder features: a fast, label-efficient check
used across self-supervised learning (no training, so it shows what the features hold)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..models.config import EncoderConfig


@torch.no_grad()
def encoder_features(source: str | None, arch: EncoderConfig, samples: list[Any], *, pool: str,
                     seed: int = 0, device: str = "cpu", batch_size: int = 64) -> np.ndarray:
    """``[n, D]`` pooled features of ``samples`` from the encoder ``source`` names (a random
    encoder drawn from ``seed`` when None), at the architecture's input size."""
    from torch.utils.data import DataLoader

    from ..models import ModelConfig
    from ..models.classifier import Classifier
    from ..training.encoder_source import is_random_source, load_encoder
    from ..training.mim_dataset import MIMDataset

    torch.manual_seed(seed)
    given = ModelConfig(encoder=arch) if is_random_source(source) else None
    loaded = load_encoder(source, model_config=given, img_size=arch.img_size)
    model = Classifier(loaded.encoder, 2, "probe", pool=pool).to(device).eval()
    mc = loaded.model_config
    ds = MIMDataset(samples, img_size=mc.encoder.img_size, in_chans=mc.encoder.in_chans, augment=False, seed=seed)
    feats = [model.features(b["image"].to(device)).float().cpu() for b in DataLoader(ds, batch_size=batch_size)]
    return torch.cat(feats).numpy() if feats else np.zeros((0, loaded.encoder.embed_dim), np.float32)


def knn_probabilities(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, *, k: int,
                      n_classes: int) -> np.ndarray:
    """``[n_test, n_classes]`` class probabilities from the ``k`` nearest labelled images
    (cosine distance, distance-weighted votes; ``k`` capped at the number of labels)."""
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=min(k, len(train_x)), metric="cosine", weights="distance")
    knn.fit(train_x, train_y)
    out = np.zeros((len(test_x), n_classes), np.float64)
    out[:, knn.classes_] = knn.predict_proba(test_x)
    return out


__all__ = ["encoder_features", "knn_probabilities"]
