"""What a timm ViT attends to: every block's attention weights, the class token's attention, rollout.

timm's blocks use fused attention, which never forms the weights; they are recomputed here
from each block's input (``q``, ``k`` after the block's own norms and scale), so nothing of
the model changes and any timm ViT works.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from .encoder import encoder_tokens, grid_of


@torch.no_grad()
def block_attentions(enc: VisionTransformer, images: torch.Tensor) -> list[torch.Tensor]:
    """Every block's attention ``[B, heads, N, N]`` (N = prefix + patch tokens; each row is a
    softmax and sums to 1) for ``images [B, C, H, W]``, first block first."""
    attns: list[torch.Tensor] = []

    def grab(module: nn.Module, inputs: tuple, _out: torch.Tensor) -> None:
        """Forward hook: recompute the block's attention from its input into ``attns``."""
        x = inputs[0]
        B, N, _ = x.shape
        qkv = module.qkv(x).reshape(B, N, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
        q, k = module.q_norm(qkv[0]), module.k_norm(qkv[1])
        attns.append(((q * module.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1))

    hooks = [blk.attn.register_forward_hook(grab) for blk in enc.blocks]
    try:
        encoder_tokens(enc, images)
    finally:
        for h in hooks:
            h.remove()
    return attns


def query_attention(enc: VisionTransformer, attn: torch.Tensor) -> torch.Tensor:
    """``[B, heads, gh, gw]``: how one block's ``attn [B, heads, N, N]`` spreads over the patches
    from the class token (from the mean over patch queries when the model has none).  Each
    head's map sums to at most 1 (the rest went to the prefix tokens)."""
    P = enc.num_prefix_tokens
    row = attn[:, :, 0, P:] if enc.cls_token is not None else attn[:, :, P:, P:].mean(dim=2)
    gh, gw = grid_of(enc)
    return row.reshape(*row.shape[:2], gh, gw)


def rollout(enc: VisionTransformer, attns: list[torch.Tensor], *, discard_ratio: float = 0.0) -> torch.Tensor:
    """``[B, gh, gw]`` attention rollout (Abnar & Zuidema 2020), scaled to [0, 1] per image.

    Each block's attention (mean over heads; with ``discard_ratio`` its weakest entries
    zeroed) plus the identity for the residual, rows renormalised, multiplied through the
    blocks; the class token's row (the mean over patch rows without one) over the patches.
    """
    B, _, N, _ = attns[0].shape
    eye = torch.eye(N, device=attns[0].device)[None]
    roll = eye.expand(B, N, N).clone()
    for attn in attns:
        a = attn.mean(dim=1)
        if discard_ratio > 0:
            flat = a.reshape(B, -1)
            k = int(flat.shape[1] * discard_ratio)
            if k:
                low = flat.topk(k, dim=1, largest=False).indices
                a = flat.scatter(1, low, 0.0).reshape(B, N, N)
        a = a + eye
        roll = (a / a.sum(dim=-1, keepdim=True)) @ roll
    m = query_attention(enc, roll[:, None])[:, 0]                           # [B, gh, gw]
    lo, hi = m.amin(dim=(1, 2), keepdim=True), m.amax(dim=(1, 2), keepdim=True)
    return (m - lo) / (hi - lo).clamp_min(1e-12)


__all__ = ["block_attentions", "query_attention", "rollout"]
