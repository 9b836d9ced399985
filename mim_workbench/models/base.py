"""What every MIM model shares: the base class, the masked-patch objective, input checks, mask helpers.

:class:`MIMOutput` (defined in :mod:`.output`) is offered here too, where the models use it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from ..errors import ConfigError
from ..masking import MaskIndices, make_mask, mask_to_indices, patch_coverage
from .config import ModelConfig
from .encoder import grid_of, patch_size_of
from .output import MIMOutput
from .patches import PatchStats, normalise_patches
from .render import Rendered, render


def masked_regression(
    pred: torch.Tensor,
    target: torch.Tensor,
    chans: int,
    *,
    norm_pix: bool,
    stats: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """MAE objective on masked patches only.

    Args:
        pred: predictions ``[B, M, F]`` (normalised space when ``norm_pix``).
        target: the masked patches' pixels ``[B, M, F]``.
        stats: predicted statistics ``[B, M, 2C]`` or None.
    Returns:
        (pixel MSE, statistics loss or None).  Every patch has the same size and
        every sample the same M, so the mean over ``[B, M, F]`` equals MAE's
        per-patch mean followed by the masked mean.
    """
    if not norm_pix:
        return F.mse_loss(pred, target), None
    normed, true = normalise_patches(target, chans)               # [B, M, F], PatchStats
    pixel = F.mse_loss(pred, normed)
    if stats is None:
        return pixel, None
    return pixel, stats_loss(stats, true, chans)


def stats_loss(stats: torch.Tensor, true: PatchStats, chans: int) -> torch.Tensor:
    """MSE on the mean plus MSE on the log-std (scale-free, robust for flat patches)."""
    return F.mse_loss(stats[..., :chans], true.mean) + F.mse_loss(stats[..., chans:], true.log_std)


class MIMModel(nn.Module):
    """Base class: a timm ViT ``encoder`` plus an objective (see :func:`build_model`).

    Attributes:
        cfg: the :class:`ModelConfig` it was built from.
        encoder: the timm ``VisionTransformer`` (exportable as is).
        patch_size: p in pixels.  grid: (gh, gw).  num_patches: L = gh*gw.
    """

    cfg: ModelConfig
    #: names of the extra numbers in ``MIMOutput.losses`` logged per step (metrics.csv)
    step_metrics: tuple[str, ...] = ()
    #: True while the model needs :meth:`fit` on training images before it can train
    needs_fitting: bool = False

    def __init__(self, cfg: ModelConfig, encoder: VisionTransformer) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.patch_size: int = patch_size_of(encoder)
        self.grid: tuple[int, int] = grid_of(encoder)
        self.in_chans: int = cfg.encoder.in_chans
        self.num_patches: int = self.grid[0] * self.grid[1]
        self.init_report = None  # LoadReport when build_model(init=...) loaded weights

    # ----------------------------------------------------------------- API
    def forward(self, images: torch.Tensor, mask: torch.Tensor, fine: torch.Tensor | None = None, *,
                target: torch.Tensor | None = None) -> MIMOutput:  # pragma: no cover - abstract
        """Loss and predictions.  ``target`` (default ``images``) is the image to reconstruct."""
        raise NotImplementedError

    def render(self, out: MIMOutput, images: torch.Tensor, *, fill: float = 0.5) -> Rendered:
        """Pictures in image space for ``out`` (no gradients, never the true statistics of
        masked patches); see :mod:`mim_workbench.models.render` for what each picture shows."""
        return render(self, out, images, fill=fill)

    def mask_options(self, strategy: str) -> dict[str, Any]:
        """Options a mask strategy needs from this model (``block``: patch and cell sizes)."""
        if strategy == "block":
            return {"patch_size": self.patch_size, "mask_patch_size": self.cfg.mask_patch_size}
        return {}

    def make_mask(self, strategy: str, batch_size: int, ratio: float, *, region: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, device: torch.device | str | None = None,
                  **opts: Any) -> torch.Tensor:
        """:func:`mim_workbench.masking.make_mask` on this model's grid with its options filled in.

        ``region`` may be per-patch coverage ``[B, gh, gw]`` or a pixel mask
        ``[B, H, W]`` at the training size (converted with :func:`patch_coverage`).
        """
        if region is not None and tuple(region.shape[-2:]) == tuple(self.cfg.encoder.img_size) \
                and tuple(region.shape[-2:]) != self.grid:
            region = patch_coverage(region, self.patch_size)
        return make_mask(strategy, batch_size, self.grid, ratio, region=region, generator=generator,
                         device=device, **{**self.mask_options(strategy), **opts})

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that should not be weight-decayed (tokens, position embeddings).

        Biases and norm weights (1-D parameters) are excluded by the optimiser's
        usual ``ndim <= 1`` rule; this lists the rest.
        """
        names = set()
        for n, p in self.named_parameters():
            leaf = n.rsplit(".", 1)[-1]
            if leaf in ("pos_embed", "cls_token", "reg_token", "mask_token", "dist_token"):
                names.add(n)
        return names

    # ----------------------------------------------------------------- method hooks
    def fit(self, images: torch.Tensor, *, seed: int) -> None:
        """Fit what the targets need on training images ``[N, C, H, W]`` (BEiT: its tokenizer)."""

    def fitted_state(self) -> dict[str, torch.Tensor]:
        """What :meth:`fit` computed, as tensors to cache (empty when the method fits nothing)."""
        return {}

    def load_fitted_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take back what :meth:`fitted_state` gave (from a cache)."""

    def encoder_ready(self) -> None:
        """Called once the encoder holds its initial weights (a momentum teacher copies them)."""

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after every optimiser step (a momentum teacher follows the student)."""

    def check_state(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Raise CheckpointError, naming ``where``, when ``state`` lacks what this method needs."""

    def load_weights(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Load a checkpoint's ``state`` (all of it, strictly); CheckpointError naming ``where``
        when it lacks what the method needs or does not fit the model."""
        from ..errors import CheckpointError

        self.check_state(state, where)
        try:
            self.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{where}: weights do not fit the model: {exc}") from None

    # ----------------------------------------------------------------- helpers
    def _check(self, images: torch.Tensor, mask: torch.Tensor) -> None:
        H, W = self.cfg.encoder.img_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (self.in_chans, H, W):
            raise ConfigError(
                f"images must be [B, {self.in_chans}, {H}, {W}] for this model, got {tuple(images.shape)}"
            )
        if mask.dtype != torch.bool or tuple(mask.shape) != (images.shape[0], self.num_patches):
            raise ConfigError(
                f"mask must be bool [{images.shape[0]}, {self.num_patches}] (grid {self.grid[0]}x{self.grid[1]}), "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )

    # Not traced by torch.compile: the counts decide shapes (data-dependent), and the masks are
    # host tensors anyway; compiled graphs start after it (without this, dynamo warned of a graph
    # break at int(counts.min()) on every first compile).
    @torch.compiler.disable
    def _indices(self, mask: torch.Tensor, device: torch.device) -> MaskIndices:
        """Gather indices, computed where the mask lives (no sync for CPU masks), then moved."""
        idx = mask_to_indices(mask)
        if idx.ids_keep.device == device:
            return idx
        return MaskIndices(
            idx.ids_keep.to(device, non_blocking=True),
            idx.ids_masked.to(device, non_blocking=True),
            idx.ids_restore.to(device, non_blocking=True),
            idx.n_visible,
            idx.n_masked,
        )
