"""``build_model``: one entry point from a :class:`ModelConfig` to a ready MIM model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import MIMModel
from .beit import BEiTModel
from .config import ModelConfig
from .encoder import create_encoder, init_mae_style
from .feature import FeatureModel
from .mae import MAEModel
from .miram import MIRAMModel
from .simmim import SimMIMModel
from .weights import load_encoder_weights

MODEL_CLASSES: dict[str, type[MIMModel]] = {
    "mae": MAEModel,
    "simmim": SimMIMModel,
    "miram": MIRAMModel,
    "beit": BEiTModel,
    "feature": FeatureModel,
}


def build_model(cfg: ModelConfig | dict[str, Any], init: str | Path | None = None) -> MIMModel:
    """Build the model for ``cfg.method`` around ``timm.create_model(cfg.encoder.model)`` (never downloads).

    The encoder gets MAE's initialisation (sin-cos ``pos_embed``, xavier linears);
    ``init`` then overwrites it from a local weights file (our export, a checkpoint,
    or a timm state dict; see :func:`load_encoder_weights`).  Decoders and heads are
    always freshly initialised.  What loading did (adapted channels, resampled
    positions, ignored tensors) is kept in ``model.init_report``.
    """
    if isinstance(cfg, dict):
        cfg = ModelConfig.from_dict(cfg)
    encoder = create_encoder(cfg)
    init_mae_style(encoder, learn_pos_embed=cfg.learn_pos_embed)
    model = MODEL_CLASSES[cfg.method](cfg, encoder)
    model.init_report = load_encoder_weights(model.encoder, init) if init is not None else None
    model.encoder_ready()
    return model
