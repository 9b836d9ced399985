"""MIM models on timm ViTs: MAE (and RGMIM = MAE + region masking), SimMIM, MIRAM.

Typical use::

    cfg = ModelConfig(encoder=EncoderConfig("vit_tiny_patch16_224", img_size=(224, 224), in_chans=1), method="mae")
    model = build_model(cfg)
    mask = model.make_mask("random", batch_size, 0.75, generator=g)   # BoolTensor [B, L]
    out = model(images, mask)                   # out.loss, out.losses
    pics = model.render(out, images)            # masked, reconstruction, recon_plus_visible, error
    export_encoder(model, "encoder.safetensors")
"""

from .base import MIMModel, MIMOutput
from .build import MODEL_CLASSES, build_model
from .config import METHODS, EncoderConfig, ModelConfig
from .mae import MAEModel
from .miram import MIRAMModel
from .render import Rendered, render
from .simmim import SimMIMModel
from .weights import (
    LoadReport,
    create_encoder_from_export,
    export_encoder,
    load_encoder_weights,
    read_export_metadata,
)

__all__ = [
    "METHODS",
    "EncoderConfig",
    "MODEL_CLASSES",
    "LoadReport",
    "MAEModel",
    "MIMModel",
    "MIMOutput",
    "MIRAMModel",
    "ModelConfig",
    "Rendered",
    "SimMIMModel",
    "build_model",
    "create_encoder_from_export",
    "export_encoder",
    "load_encoder_weights",
    "read_export_metadata",
    "render",
]
