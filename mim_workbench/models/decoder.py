"""MAE's lightweight decoder, built from timm's own ``Block`` (fused attention).

The decoder sees every position (visible tokens from the encoder, a shared mask
token elsewhere) with fixed 2-D sin-cos positions, exactly as in MAE.  Only the
masked positions' outputs are used, so the last block computes keys and values
for every token but queries, attention rows, projection and MLP for the masked
rows only (:func:`block_at_rows`), and the final norm and the prediction heads run
on M tokens instead of L.  The result is MAE's, to rounding (tests/test_models.py).
At the benchmark's reference config this leaves out 2 % of the step's FLOPs.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block

from .encoder import attention_path, sincos_2d
from .patches import gather_patches


class MAEDecoder(nn.Module):
    """Embed encoder tokens, fill masked positions with a mask token, run ``depth`` blocks.

    Args:
        embed_dim: encoder width D.
        grid: patch grid (gh, gw).
        prefix: number of prefix tokens the encoder outputs first (class/registers).
        dim, depth, num_heads, mlp_ratio: decoder size.
    """

    def __init__(self, embed_dim: int, grid: tuple[int, int], prefix: int, *, dim: int, depth: int,
                 num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.grid = grid
        self.prefix = prefix
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Fixed positions, rebuilt from the config: not part of the state dict.
        self.register_buffer("pos_embed", sincos_2d(dim, grid, prefix=prefix), persistent=False)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(*[
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)
        ])
        self.norm = norm(dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAE's initialisation: mask token ~ N(0, 0.02), xavier-uniform linears, unit LayerNorms, zero biases."""
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, latent: torch.Tensor, ids_keep: torch.Tensor, ids_masked: torch.Tensor) -> torch.Tensor:
        """Decoder tokens at the masked positions.

        Args:
            latent: encoder output ``[B, P + V, D]``.
            ids_keep: visible patch ids ``[B, V]``.
            ids_masked: masked patch ids ``[B, M]``.
        Returns:
            normalised decoder tokens ``[B, M, Dd]`` in the order of ``ids_masked``.
        """
        B = latent.shape[0]
        L = self.grid[0] * self.grid[1]
        P = self.prefix
        x = self.embed(latent)                                            # [B, P+V, Dd]
        Dd = x.shape[-1]
        # Scatter the visible tokens into a sequence of mask tokens (MAE's unshuffle).
        seq = torch.scatter(self.mask_token.to(x.dtype).expand(B, L, Dd), 1,
                            ids_keep[..., None].expand(-1, -1, Dd), x[:, P:])  # [B, L, Dd]
        if P:
            seq = torch.cat([x[:, :P], seq], dim=1)                        # [B, P+L, Dd]
        seq = seq + self.pos_embed
        with attention_path(self.blocks, seq):
            for block in self.blocks[:-1]:
                seq = block(seq)                                           # [B, P+L, Dd]
            if len(self.blocks):
                return self.norm(block_at_rows(self.blocks[-1], seq, ids_masked + P))  # [B, M, Dd]
        return self.norm(gather_patches(seq[:, P:], ids_masked))          # [B, M, Dd]


def rows_supported(block: nn.Module) -> bool:
    """True when :func:`block_at_rows` knows every part of ``block`` (a plain timm ``Block``)."""
    attn = getattr(block, "attn", None)
    return (type(block) is Block and type(attn) is Attention
            and getattr(attn, "gate", None) is None and hasattr(attn.qkv, "weight"))


def block_at_rows(block: nn.Module, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``block(x)`` at the token rows ``rows [B, R]`` only: ``[B, R, D]``.

    Keys and values come from every token, as in the full block; queries, the
    attention output, the projection, the residual and the MLP are computed for the
    R rows (each of them is per token).  Blocks other than a plain timm ``Block`` run
    whole and are gathered.
    """
    if not rows_supported(block):
        return gather_patches(block(x), rows)
    attn = block.attn
    B, N, C = x.shape
    R = rows.shape[1]
    H, hd = attn.num_heads, attn.head_dim
    A = H * hd
    h = block.norm1(x)                                                      # [B, N, C]
    w, b = attn.qkv.weight, attn.qkv.bias
    kv = F.linear(h, w[A:], None if b is None else b[A:])                    # [B, N, 2A]
    k, v = kv.reshape(B, N, 2, H, hd).permute(2, 0, 3, 1, 4).unbind(0)      # [B, H, N, hd] each
    q = F.linear(gather_patches(h, rows), w[:A], None if b is None else b[:A])
    q = q.reshape(B, R, H, hd).transpose(1, 2)                              # [B, H, R, hd]
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:  # timm's non-fused path (CPU bf16, see encoder.attention_path)
        a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        o = attn.attn_drop(a) @ v
    o = o.transpose(1, 2).reshape(B, R, A)
    if getattr(attn, "norm", None) is not None:                             # timm >= 1.0: scale_norm
        o = attn.norm(o)
    o = attn.proj_drop(attn.proj(o))                                        # [B, R, C]
    y = gather_patches(x, rows) + block.drop_path1(block.ls1(o))
    return y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))
