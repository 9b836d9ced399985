"""Encoder weights in and out: local files only, no pickle, timm-compatible exports.

Loading accepts our own export, a full MIM checkpoint (``encoder.*`` keys), a timm
state dict saved as safetensors, and legacy ``.pth``/``.pt``/``.bin`` files through
``torch.load(weights_only=True)`` (which refuses arbitrary pickled objects).  The
usual mismatches between a downloaded-elsewhere checkpoint and an X-ray model are
adapted instead of failing:

* RGB patch embedding into a 1-channel model: the kernel is summed over channels
  (a grey image fed as R=G=B gives the same response); 1 -> C repeats it / C;
* a different image size: ``pos_embed`` is resampled to the new grid with
  ``timm.layers.resample_abs_pos_embed`` (the old grid comes from our export's
  metadata, otherwise it is assumed square);
* ``module.`` / ``_orig_mod.`` (DDP, torch.compile) and ``encoder.`` prefixes are stripped;
  classifier heads and MAE decoder weights are reported and ignored.

Nothing here ever downloads anything.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from .. import __version__
from ..errors import CheckpointError, summary_line
from .encoder import grid_of, pos_prefix

log = logging.getLogger(__name__)

EXPORT_KIND = "mim_workbench.encoder"
LEGACY_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_NESTED_KEYS = ("state_dict", "model", "model_state", "module", "encoder")
_STRIP_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadReport:
    """What :func:`load_encoder_weights` did; ``str()`` gives a readable summary."""

    path: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        parts = [f"{self.path}: loaded {self.loaded} tensors"]
        if self.adapted:
            parts.append("adapted: " + "; ".join(self.adapted))
        if self.missing:
            parts.append(f"missing {len(self.missing)}: {_short(self.missing)}")
        if self.unexpected:
            parts.append(f"ignored {len(self.unexpected)} unexpected: {_short(self.unexpected)}")
        return " | ".join(parts)


def _short(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f", ... (+{len(names) - n})" if len(names) > n else "")


# --------------------------------------------------------------------- reading
def _resolve(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        for name in ("encoder.safetensors", "model.safetensors"):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"{p}: folder has no encoder.safetensors or model.safetensors")
    if not p.is_file():
        raise CheckpointError(f"{p}: weights file not found")
    return p


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a weights file (safetensors or legacy torch, no pickle)."""
    p = _resolve(path)
    meta: dict[str, str] = {}
    if p.suffix == ".safetensors":
        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{p}: not a readable safetensors file ({exc})") from exc
        return sd, meta
    if p.suffix in LEGACY_SUFFIXES:
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"{p}: cannot be read with torch.load(weights_only=True) ({summary_line(exc)}); "
                "convert it to safetensors"
            ) from exc
        return _unwrap(obj, p), meta
    raise CheckpointError(
        f"{p}: unsupported weights format {p.suffix or '(no suffix)'} "
        f"(use .safetensors or {', '.join(LEGACY_SUFFIXES)})"
    )


def _unwrap(obj: Any, p: Path) -> dict[str, torch.Tensor]:
    """Find the state dict inside a training checkpoint (``{"model": ...}`` etc.)."""
    for _ in range(3):
        if not isinstance(obj, dict):
            break
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        inner = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    raise CheckpointError(f"{p}: no state dict of tensors found")


def _clean_keys(sd: dict[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for pre in _STRIP_PREFIXES:
                if k.startswith(pre):
                    k, changed = k[len(pre):], True
        out[k] = v
    if any(k.startswith("encoder.") for k in out):
        # A whole MIM model (ours): keep the encoder, ignore decoder and heads.
        others = sorted(k for k in out if not k.startswith("encoder."))
        if others:
            report.adapted.append(f"took encoder.* from a full model, ignored {len(others)} other tensors")
        out = {k[len("encoder."):]: v for k, v in out.items() if k.startswith("encoder.")}
    return out


# --------------------------------------------------------------------- adapting
def _adapt_patch_embed(w: torch.Tensor, target: torch.Tensor, report: LoadReport) -> torch.Tensor:
    """Convert a patch-embedding kernel ``[D, Cs, p, p]`` to ``[D, Ct, p, p]``."""
    cs, ct = w.shape[1], target.shape[1]
    if w.shape[0] != target.shape[0] or w.shape[2:] != target.shape[2:]:
        raise CheckpointError(
            f"{report.path}: patch_embed.proj.weight has shape {list(w.shape)}, model needs "
            f"{list(target.shape)} (different width or patch size: wrong --model?)"
        )
    if cs == ct:
        return w
    if ct == 1:
        report.adapted.append(f"patch embedding {cs}->1 channel (summed)")
        return w.sum(dim=1, keepdim=True)
    if cs == 1:
        report.adapted.append(f"patch embedding 1->{ct} channels (repeated / {ct})")
        return w.repeat(1, ct, 1, 1) / ct
    raise CheckpointError(f"{report.path}: cannot map a {cs}-channel patch embedding to {ct} channels")


def _adapt_pos_embed(pos: torch.Tensor, enc: VisionTransformer, meta: dict[str, str],
                     report: LoadReport) -> torch.Tensor:
    target = enc.pos_embed
    if pos.shape == target.shape:
        return pos
    if pos.dim() != 3 or pos.shape[-1] != target.shape[-1]:
        raise CheckpointError(
            f"{report.path}: pos_embed has shape {list(pos.shape)}, model needs {list(target.shape)}"
        )
    prefix = pos_prefix(enc)
    n_old = pos.shape[1] - prefix
    old_grid = None
    if "grid" in meta:
        old_grid = tuple(json.loads(meta["grid"]))
        if old_grid[0] * old_grid[1] != n_old:
            old_grid = None
    if old_grid is None:
        side = math.isqrt(n_old)
        if side * side != n_old:
            raise CheckpointError(
                f"{report.path}: pos_embed has {n_old} positions, not a square grid and no grid "
                "metadata; cannot resample it"
            )
        old_grid = (side, side)
    new_grid = grid_of(enc)
    report.adapted.append(f"pos_embed resampled {old_grid[0]}x{old_grid[1]} -> {new_grid[0]}x{new_grid[1]}")
    return resample_abs_pos_embed(pos.float(), new_size=list(new_grid), old_size=list(old_grid),
                                  num_prefix_tokens=prefix).to(pos.dtype)


# --------------------------------------------------------------------- public
def load_encoder_weights(encoder: VisionTransformer | nn.Module, path: str | Path, *,
                         strict: bool = True) -> LoadReport:
    """Load encoder weights from a local file into ``encoder`` (a timm ViT, or a MIM model).

    Args:
        encoder: the timm ``VisionTransformer`` to fill (a :class:`MIMModel` works too).
        path: ``.safetensors`` (our export, a full model, a timm state dict) or a
            legacy ``.pth``/``.pt``/``.bin``/``.ckpt``; a folder holding
            ``encoder.safetensors`` or ``model.safetensors`` also works.
        strict: raise :class:`CheckpointError` when encoder tensors are missing from
            the file (a partly loaded encoder almost always means the wrong model).

    Returns:
        a :class:`LoadReport`; unexpected tensors (classifier, decoder) are ignored
        and listed there, and logged.
    """
    inner = _unwrap_model(encoder)
    enc = getattr(inner, "encoder", inner)
    sd, meta = read_state_dict(path)
    report = LoadReport(path=str(path), metadata=meta)
    sd = _clean_keys(sd, report)
    own = enc.state_dict()
    if "patch_embed.proj.weight" in sd and "patch_embed.proj.weight" in own:
        sd["patch_embed.proj.weight"] = _adapt_patch_embed(sd["patch_embed.proj.weight"],
                                                           own["patch_embed.proj.weight"], report)
    if "pos_embed" in sd and "pos_embed" in own:
        sd["pos_embed"] = _adapt_pos_embed(sd["pos_embed"], enc, meta, report)

    unexpected = sorted(k for k in sd if k not in own)
    bad = [f"{k} {list(sd[k].shape)} vs {list(own[k].shape)}" for k in sd if k in own and sd[k].shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{report.path}: tensor shapes do not match the model: {_short(bad, 4)}")
    usable = {k: v for k, v in sd.items() if k in own}
    missing = sorted(k for k in own if k not in usable)
    if not usable:
        raise CheckpointError(f"{report.path}: no tensor matches the encoder (is it a ViT checkpoint?)")
    if missing and strict:
        raise CheckpointError(f"{report.path}: {len(missing)} encoder tensors missing: {_short(missing)}")
    enc.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    report.missing = missing
    report.unexpected = unexpected
    log.info("%s", report)
    return report


def _unwrap_model(model: nn.Module) -> nn.Module:
    """The MIM model (or bare encoder) inside DDP / torch.compile wrappers."""
    for attr in ("module", "_orig_mod"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            model = inner
    return model


def export_metadata(model: nn.Module) -> dict[str, str]:
    """Safetensors metadata (str -> str) describing how to rebuild the encoder in timm."""
    model = _unwrap_model(model)
    enc: VisionTransformer = getattr(model, "encoder", model)
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        name = cfg.encoder.model
        overrides = cfg.encoder.timm_overrides()
        method = cfg.method
    else:
        name = (getattr(enc, "pretrained_cfg", None) or {}).get("architecture") or type(enc).__name__
        overrides, method = {}, ""
    ph = enc.patch_embed.patch_size[0]
    img_size = [int(v) for v in enc.patch_embed.img_size]
    timm_kwargs = {"img_size": img_size, "in_chans": int(enc.patch_embed.proj.in_channels),
                   "num_classes": 0, **overrides}
    meta = {
        "format": "pt",
        "kind": EXPORT_KIND,
        "model": name,
        "img_size": json.dumps(img_size),
        "in_chans": str(timm_kwargs["in_chans"]),
        "patch_size": str(int(ph)),
        "grid": json.dumps(list(grid_of(enc))),
        "timm_kwargs": json.dumps(timm_kwargs),
        "method": method,
        "mim_workbench_version": __version__,
    }
    if cfg is not None:
        meta["model_config"] = json.dumps(cfg.to_dict())
    return meta


def export_encoder(model: nn.Module, path: str | Path) -> Path:
    """Write the bare encoder state dict as safetensors, loadable by timm.

    Load it back with::

        enc = timm.create_model(meta["model"], pretrained=False, **json.loads(meta["timm_kwargs"]))
        enc.load_state_dict(safetensors.torch.load_file(path))

    (or :func:`create_encoder_from_export`).  The file is written next to its final
    name and renamed, so a crash never leaves a truncated export.
    """
    model = _unwrap_model(model)
    enc = getattr(model, "encoder", model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in enc.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata=export_metadata(model))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_export_metadata(path: str | Path) -> dict[str, str]:
    """Metadata of a safetensors export (empty for files without any)."""
    p = _resolve(path)
    if p.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception as exc:
        raise CheckpointError(f"{p}: not a readable safetensors file ({exc})") from exc


def create_encoder_from_export(path: str | Path) -> VisionTransformer:
    """Rebuild a timm ViT from one of our exports (architecture from its metadata), strictly loaded."""
    meta = read_export_metadata(path)
    if meta.get("kind") != EXPORT_KIND or "timm_kwargs" not in meta:
        raise CheckpointError(f"{path}: not a mim-workbench encoder export (no export metadata)")
    enc = timm.create_model(meta["model"], pretrained=False, **json.loads(meta["timm_kwargs"]))
    sd, _ = read_state_dict(path)
    enc.load_state_dict(sd, strict=True)
    return enc
