"""MAE's lightweight decoder, built from timm's own ``Block`` (fused attention).

The decoder sees every position (visible tokens from the encoder, a shared mask
token elsewhere) with fixed 2-D sin-cos positions, exactly as in MAE; the output
is gathered at the masked positions *before* the final norm and the prediction
heads, so those run on M tokens instead of L (a quarter at ratio 0.75).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

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
            seq = self.blocks(seq)                                         # [B, P+L, Dd]
        out = gather_patches(seq[:, P:], ids_masked)                      # [B, M, Dd]
        return self.norm(out)
