"""Where a downstream model's encoder comes from: a checkpoint, an export, or nothing.

``load_encoder(source)`` is shared by fine-tuning and the dense head:

* a checkpoint of this package (anything ``load_checkpoint`` accepts: run
  directory, ``ckpt-<step>`` directory, a file inside it; kinds ``pretrain``,
  ``finetune``, ``dense``): the architecture comes from its ``model_config`` and
  the ``encoder.*`` tensors are loaded;
* an exported encoder (``export_encoder``'s ``.safetensors``, architecture in its
  metadata);
* ``None`` / ``"scratch"`` / ``"random"``: a freshly initialised encoder (MAE's
  initialisation) built from ``model_config``.

``model_config`` (a :class:`ModelConfig` or a dict of its fields) is required for
a random encoder and for bare weight files without metadata; with a checkpoint
or export it may change ``img_size`` (position embeddings are resampled) and
``drop_path_rate``, nothing else.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from timm.models.vision_transformer import VisionTransformer

from ..errors import CheckpointError, ConfigError
from ..models import ModelConfig, load_encoder_weights, read_export_metadata
from ..models.encoder import create_encoder, init_mae_style
from ..models.weights import EXPORT_KIND

RANDOM_SOURCES = ("scratch", "random", "none", "")


@dataclass
class LoadedEncoder:
    encoder: VisionTransformer
    model_config: ModelConfig          # how to rebuild it (stored in downstream checkpoints)
    kind: str                          # "checkpoint" | "export" | "weights" | "random"
    source: str | None                 # the path, or None for a random encoder
    step: int | None = None            # pretraining step of a checkpoint
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        """JSON-safe ``{"kind", "source", "step"}``, recorded in downstream metrics and checkpoints."""
        return {"kind": self.kind, "source": self.source, "step": self.step}


def is_random_source(source: str | Path | None) -> bool:
    """True for ``None`` and the strings of ``RANDOM_SOURCES`` (any case, spaces ignored): no weights to load."""
    return source is None or (isinstance(source, str) and source.strip().lower() in RANDOM_SOURCES)


def _as_model_config(value: ModelConfig | dict[str, Any] | None) -> ModelConfig | None:
    if value is None or isinstance(value, ModelConfig):
        return value
    return ModelConfig.from_dict(dict(value))


def _override(base: ModelConfig, *, img_size: int | str | Sequence[int] | None = None,
              drop_path_rate: float | None = None) -> ModelConfig:
    changes: dict[str, Any] = {}
    if img_size is not None:
        changes["encoder"] = dataclasses.replace(base.encoder, img_size=img_size)
    if drop_path_rate is not None:
        changes["drop_path_rate"] = float(drop_path_rate)
    return dataclasses.replace(base, **changes) if changes else base


def load_encoder(source: str | Path | None, *, model_config: ModelConfig | dict[str, Any] | None = None,
                 img_size: int | str | Sequence[int] | None = None,
                 drop_path_rate: float | None = None) -> LoadedEncoder:
    """Build the encoder ``source`` names (see the module docstring); weights on the CPU.

    ConfigError for a bad ``img_size``; CheckpointError when ``source`` is missing or unreadable, its tensors do
    not fit, or it brings no architecture and ``model_config`` is not given."""
    given = _as_model_config(model_config)
    if is_random_source(source):
        cfg = _override(given or ModelConfig(), img_size=img_size, drop_path_rate=drop_path_rate)
        enc = create_encoder(cfg)
        init_mae_style(enc, learn_pos_embed=True)
        return LoadedEncoder(enc, cfg, "random", None)

    path = Path(str(source)).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or encoder file")
    notes: list[str] = []
    if path.is_file() and path.suffix == ".safetensors" and not (path.parent / "meta.json").is_file():
        meta = read_export_metadata(path)
        if meta.get("kind") == EXPORT_KIND and "model_config" in meta:
            base = ModelConfig.from_dict(json.loads(meta["model_config"]))
            kind = "export"
        elif given is not None:
            base, kind = given, "weights"
        else:
            raise CheckpointError(f"{path}: a weights file without architecture metadata; "
                                  "give the model settings (model, img_size, embed_dim, ...) as well")
        cfg = _override(base, img_size=img_size, drop_path_rate=drop_path_rate)
        enc = create_encoder(cfg)
        report = load_encoder_weights(enc, path)
        notes += report.adapted
        return LoadedEncoder(enc, cfg, kind, str(path), notes=notes)

    from ..models.checkpoint import MODEL_FILE, load_checkpoint

    ckpt = load_checkpoint(path)
    if ckpt.is_legacy:
        if given is None:
            raise CheckpointError(f"{ckpt.path}: a bare weights file; give the model settings as well")
        cfg = _override(given, img_size=img_size, drop_path_rate=drop_path_rate)
        enc = create_encoder(cfg)
        report = load_encoder_weights(enc, ckpt.path)
        return LoadedEncoder(enc, cfg, "weights", str(ckpt.path), notes=list(report.adapted))
    if not ckpt.model_config:
        raise CheckpointError(f"{ckpt.path}: no model configuration stored; cannot rebuild its encoder")
    try:
        base = ModelConfig.from_dict(ckpt.model_config)
    except ConfigError as exc:
        raise CheckpointError(f"{ckpt.path}: stored model configuration is unusable: {exc}") from None
    cfg = _override(base, img_size=img_size, drop_path_rate=drop_path_rate if drop_path_rate is not None else 0.0)
    enc = create_encoder(cfg)
    report = load_encoder_weights(enc, ckpt.path / MODEL_FILE)
    notes += [a for a in report.adapted if not a.startswith("took encoder.*")]
    return LoadedEncoder(enc, cfg, "checkpoint", str(ckpt.path), step=ckpt.step, notes=notes)


__all__ = ["LoadedEncoder", "RANDOM_SOURCES", "is_random_source", "load_encoder"]
