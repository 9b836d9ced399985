"""The encoder: a stock timm VisionTransformer, plus the few helpers MIM needs around it.

We do not re-implement ViT blocks: the encoder *is* ``timm.create_model(name)``,
so its state dict loads into timm unchanged and it uses timm's fused attention
(``F.scaled_dot_product_attention``).  What MIM needs beyond timm's own forward is
an entry point that embeds only the visible patches (MAE), and one that swaps
masked tokens for a mask token (SimMIM); both live here and reuse the encoder's
own modules (blocks, norms, tokens, position embedding).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from ..errors import ConfigError
from .config import ModelConfig, check_img_size


# --------------------------------------------------------------------- positions
def sincos_2d(dim: int, grid: tuple[int, int], *, prefix: int = 0) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding ``[1, prefix + gh*gw, dim]`` (prefix rows zero).

    Half of the channels encode the row, half the column, so non-square grids get
    the right geometry (MAE's helper assumes a square grid).  For widths that are
    not a multiple of 4 the last column channels are dropped.
    """
    gh, gw = grid
    quarter = -(-dim // 4)  # widths that are not multiples of 4: compute wider, keep the first dim
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))  # [D/4]
    rows = torch.arange(gh, dtype=torch.float64)[:, None].expand(gh, gw).reshape(-1)  # [L]
    cols = torch.arange(gw, dtype=torch.float64)[None, :].expand(gh, gw).reshape(-1)  # [L]

    def enc(pos: torch.Tensor) -> torch.Tensor:  # [L] -> [L, D/2]
        """sin and cos of the positions ``[L]`` times every frequency: ``[L, 2 * quarter]`` float64."""
        out = pos[:, None] * omega[None, :]
        return torch.cat([out.sin(), out.cos()], dim=1)

    emb = torch.cat([enc(rows), enc(cols)], dim=1)[:, :dim]                           # [L, D]
    emb = torch.cat([torch.zeros(prefix, dim, dtype=emb.dtype), emb], dim=0)          # [prefix+L, D]
    return emb.to(torch.float32)[None]


# --------------------------------------------------------------------- creation
def create_encoder(cfg: ModelConfig) -> VisionTransformer:
    """``timm.create_model(cfg.encoder.model, pretrained=False, ...)`` with the config's size and overrides.

    Never downloads weights.  The classifier is removed (``num_classes=0``) and the
    model's own ``global_pool`` is kept, so the state dict matches
    ``timm.create_model(name, num_classes=0, in_chans=..., img_size=...)`` key for key.
    """
    arch = cfg.encoder
    if not timm.is_model(arch.model):
        close = timm.list_models(f"*{arch.model.split('_')[0]}*")[:8]
        hint = f" (e.g. {', '.join(close)})" if close else ""
        raise ConfigError(f"unknown timm model {arch.model!r}{hint}")
    try:
        enc = timm.create_model(
            arch.model,
            pretrained=False,
            img_size=arch.img_size,
            in_chans=arch.in_chans,
            num_classes=0,
            dynamic_img_size=False,
            drop_path_rate=cfg.drop_path_rate,
            **arch.timm_overrides(),
        )
    except (TypeError, AssertionError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"timm could not build {arch.model!r} with these settings: {exc}") from exc
    if not isinstance(enc, VisionTransformer):
        raise ConfigError(
            f"model {arch.model!r} is a {type(enc).__name__}, not a timm VisionTransformer "
            "(use a vit_* / deit_* model)"
        )
    n_prefix = int(enc.cls_token is not None) + (enc.reg_token.shape[1] if enc.reg_token is not None else 0)
    if n_prefix != enc.num_prefix_tokens or getattr(enc, "dist_token", None) is not None:
        raise ConfigError(
            f"model {arch.model!r} has extra prefix tokens (e.g. a distillation token) that MIM "
            "pretraining does not handle; use a plain vit_* model"
        )
    patch = patch_size_of(enc)
    check_img_size(arch.img_size, patch)
    if enc.pos_embed is None:
        raise ConfigError(f"model {arch.model!r} has no absolute position embedding; MIM needs one")
    return enc


def patch_size_of(enc: VisionTransformer) -> int:
    """Square patch size of a timm ViT (rectangular patches are not supported)."""
    ph, pw = enc.patch_embed.patch_size
    if ph != pw:
        raise ConfigError(f"rectangular patches {ph}x{pw} are not supported")
    return int(ph)


def grid_of(enc: VisionTransformer) -> tuple[int, int]:
    """The encoder's patch grid ``(gh, gw)``: rows and columns of patches in its input image."""
    gh, gw = enc.patch_embed.grid_size
    return int(gh), int(gw)


def pos_prefix(enc: VisionTransformer) -> int:
    """How many leading rows of ``pos_embed`` belong to prefix (class/register) tokens."""
    return 0 if enc.no_embed_class else enc.num_prefix_tokens


def init_mae_style(enc: VisionTransformer, *, learn_pos_embed: bool) -> None:
    """MAE initialisation: sin-cos ``pos_embed``, xavier linears and patch projection.

    The position embedding stays timm's ``nn.Parameter`` (so exports load in timm);
    with ``learn_pos_embed=False`` it is frozen during pretraining, as in MAE.
    """
    with torch.no_grad():
        enc.pos_embed.copy_(sincos_2d(enc.embed_dim, grid_of(enc), prefix=pos_prefix(enc)))
        w = enc.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if enc.cls_token is not None:
            nn.init.normal_(enc.cls_token, std=0.02)
        for m in enc.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                if m.weight is not None:
                    nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    enc.pos_embed.requires_grad_(learn_pos_embed)


# --------------------------------------------------------------------- forward paths
def token_norm(enc: VisionTransformer) -> nn.Module:
    """The encoder's per-token output norm (``norm``, or ``fc_norm`` on avg-pool models)."""
    if not isinstance(enc.norm, nn.Identity):
        return enc.norm
    return enc.fc_norm


def has_linear_patch_embed(enc: VisionTransformer) -> bool:
    """True when ``patch_embed`` is a plain stride-p conv that a matmul on patchified pixels equals."""
    pe = enc.patch_embed
    proj = getattr(pe, "proj", None)
    return (
        isinstance(proj, nn.Conv2d)
        and isinstance(getattr(pe, "norm", None), nn.Identity)
        and tuple(proj.kernel_size) == tuple(proj.stride)
        and tuple(proj.padding) == (0, 0)
        and proj.groups == 1
        and tuple(proj.dilation) == (1, 1)
        and not getattr(pe, "dynamic_img_pad", False)
    )


def _with_prefix(enc: VisionTransformer, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Add patch positions ``pos`` to patch tokens ``x [B, N, D]`` and prepend the prefix tokens.

    Follows timm's conventions: class token first, then register tokens; they carry
    the leading ``pos_embed`` rows unless the model uses ``no_embed_class``.
    """
    B = x.shape[0]
    x = x + pos                                                       # [B, N, D]
    prefix = []
    if enc.cls_token is not None:
        prefix.append(enc.cls_token.expand(B, -1, -1))                # [B, 1, D]
    if enc.reg_token is not None:
        prefix.append(enc.reg_token.expand(B, -1, -1))                # [B, R, D]
    if prefix:
        tokens = torch.cat(prefix, dim=1) if len(prefix) > 1 else prefix[0]
        k = pos_prefix(enc)
        if k:
            tokens = tokens + enc.pos_embed[:, :k]
        x = torch.cat([tokens.to(x.dtype), x], dim=1)                 # [B, P+N, D]
    return enc.pos_drop(x)


def cpu_bf16_autocast(x: torch.Tensor) -> bool:
    """True when ``x`` lives on the CPU and CPU autocast to bf16 is active."""
    return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16)


@contextlib.contextmanager
def attention_path(blocks: nn.Module, x: torch.Tensor) -> Iterator[None]:
    """Run timm blocks with the attention kernel that is fast for ``x``'s device and precision.

    timm uses ``F.scaled_dot_product_attention`` (fused) by default, the right choice
    in fp32 and on GPUs.  Under CPU bf16 autocast, though, torch's CPU flash-attention
    kernel is 2-4x *slower* in bf16 than in fp32 (its backward especially), while
    bf16 matmuls run on AMX / AVX512-BF16: timm's own non-fused path (``q @ k^T``,
    softmax, ``@ v``) is then used for the duration of the forward (measured on a
    2-core Xeon with AMX, ViT-Tiny MAE step: 0.236 s -> 0.164 s; benchmarks/results).
    The flags are restored afterwards; the autograd graph does not depend on them.
    """
    if not cpu_bf16_autocast(x):
        yield
        return
    saved = [(m, m.fused_attn) for m in blocks.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    for m, _ in saved:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, flag in saved:
            m.fused_attn = flag


def _run_blocks(enc: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    x = enc.norm_pre(x)
    with attention_path(enc.blocks, x):
        x = enc.blocks(x)
    return token_norm(enc)(x)


def encoder_tokens(enc: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """All tokens ``[B, P + L, D]`` after the encoder's per-token norm (P prefix tokens first).

    timm's ``forward_features`` with the norm the MIM models use (``norm``, or
    ``fc_norm`` for models built with average pooling), so features match what
    the encoder saw in pretraining.
    """
    return _run_blocks(enc, enc.patch_drop(enc._pos_embed(enc.patch_embed(images))))


def block_outputs(enc: VisionTransformer, images: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output (the residual stream, before the final norm) for whole ``images``:
    one ``[B, P + L, D]`` tensor per block, first block first."""
    x = enc.patch_embed(images)                                       # [B, L, D]
    x = enc.norm_pre(_with_prefix(enc, x, enc.pos_embed[:, pos_prefix(enc):]))
    outs = []
    with attention_path(enc.blocks, x):
        for block in enc.blocks:
            x = block(x)
            outs.append(x)
    return outs


def encode_visible(
    enc: VisionTransformer,
    patches: torch.Tensor,
    ids_keep: torch.Tensor,
    images: torch.Tensor | None = None,
) -> torch.Tensor:
    """MAE encoder pass over the visible patches only.

    Args:
        patches: pixels patchified in (C, p, p) order ``[B, L, C*p*p]``.
        ids_keep: visible patch ids ``[B, V]``.
        images: the images ``[B, C, H, W]``; only used when the patch embedding is not
            a plain conv (then all patches are embedded and the visible ones gathered).

    Returns:
        ``[B, P + V, D]`` tokens after the final norm, P prefix tokens (class/registers) first.
    """
    D = enc.embed_dim
    if has_linear_patch_embed(enc):
        # Gather raw visible pixels, then one matmul with the conv kernel: identical to
        # the stride-p conv, but computed for the visible patches only.
        vis = patches.gather(1, ids_keep[..., None].expand(-1, -1, patches.shape[-1]))  # [B, V, C*p*p]
        proj = enc.patch_embed.proj
        x = F.linear(vis, proj.weight.reshape(D, -1), proj.bias)                         # [B, V, D]
    else:
        if images is None:
            raise ValueError("images are needed for a patch embedding that is not a plain conv")
        x = enc.patch_embed(images)                                                       # [B, L, D]
        x = x.gather(1, ids_keep[..., None].expand(-1, -1, D))                           # [B, V, D]
    pos = enc.pos_embed[0, pos_prefix(enc):][ids_keep]                                    # [B, V, D]
    return _run_blocks(enc, _with_prefix(enc, x, pos))


def encode_with_mask_token(
    enc: VisionTransformer,
    images: torch.Tensor,
    mask: torch.Tensor,
    mask_token: torch.Tensor,
) -> torch.Tensor:
    """SimMIM encoder pass: all tokens, masked ones replaced by ``mask_token`` before positions.

    Returns ``[B, P + L, D]`` tokens after the final norm.
    """
    x = enc.patch_embed(images)                                       # [B, L, D]
    x = torch.where(mask[..., None], mask_token.to(x.dtype), x)       # [B, L, D]; exact replacement
    pos = enc.pos_embed[:, pos_prefix(enc):]                          # [1, L, D]
    return _run_blocks(enc, _with_prefix(enc, x, pos))


__all__ = [
    "attention_path",
    "block_outputs",
    "encoder_tokens",
    "cpu_bf16_autocast",
    "create_encoder",
    "encode_visible",
    "encode_with_mask_token",
    "grid_of",
    "init_mae_style",
    "patch_size_of",
    "pos_prefix",
    "sincos_2d",
    "token_norm",
]
