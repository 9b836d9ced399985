"""Layer-wise learning-rate decay for fine-tuning ViTs (BEiT / MAE ``param_groups_lrd``).

Layer ids: position embedding, tokens and patch embedding 0, block ``i`` is
``i + 1``, everything after the blocks (final norm, head) ``depth + 1``; a
parameter of layer ``l`` gets ``lr * layer_decay ** (depth + 1 - l)``, so the
head learns at the full rate and the patch embedding at ``layer_decay **
(depth + 1)`` of it.  Which parameters are weight-decayed is decided by
:func:`mim_workbench.training.optim.param_groups`, the pretraining rule.
"""

from __future__ import annotations

import torch

from .optim import param_groups

_EMBED_NAMES = ("cls_token", "reg_token", "dist_token", "mask_token", "pos_embed")


def layer_id(name: str, depth: int) -> int:
    """Layer of a parameter named relative to the encoder (``blocks.3.attn.qkv.weight``)."""
    if name in _EMBED_NAMES or name.startswith(("patch_embed", "norm_pre")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups_lrd(model: torch.nn.Module, *, weight_decay: float, layer_decay: float,
                     encoder_attr: str = "encoder") -> list[dict]:
    """AdamW parameter groups with an ``lr_scale`` per layer (use :func:`set_scaled_lr`)."""
    encoder = getattr(model, encoder_attr)
    depth = len(encoder.blocks)
    prefix = encoder_attr + "."
    names = {id(p): n for n, p in model.named_parameters()}
    groups: dict[tuple[int, float], dict] = {}
    for g in param_groups(model, weight_decay):
        for p in g["params"]:
            name = names[id(p)]
            lid = layer_id(name[len(prefix):], depth) if name.startswith(prefix) else depth + 1
            key = (lid, float(g["weight_decay"]))
            if key not in groups:
                groups[key] = {"params": [], "weight_decay": g["weight_decay"], "layer": lid,
                               "lr_scale": float(layer_decay) ** (depth + 1 - lid)}
            groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def set_scaled_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """``lr * lr_scale`` on every group (scale 1 for groups without one)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


__all__ = ["layer_id", "param_groups_lrd", "set_scaled_lr"]
