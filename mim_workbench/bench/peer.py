"""lightly's MAE as a training step, timed beside ours (the bench's measured peer).

lightly is an optional dependency (``pip install 'mim-workbench[bench]'``): it is
imported only when a peer step is built, and its absence is a ConfigError then.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import version
from typing import Any

import timm
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .config import BASE_MODEL, BETAS, check_config, img_hw


def lightly_version() -> str | None:
    """The installed lightly's version string, or None when it is not installed."""
    try:
        return version("lightly")
    except Exception:
        return None


def _check_peer_config(config: Mapping[str, Any], amp: str | None) -> dict[str, Any]:
    """The checked config; ConfigError unless MAE, random masking, a square image and amp off/bf16."""
    cfg = check_config(config)
    if cfg["method"] != "mae" or cfg["strategy"] != "random":
        raise ConfigError("lightly's peer step is MAE with random masking only")
    H, W = img_hw(cfg)
    if H != W:
        raise ConfigError(f"lightly's MAE needs a square image (its sin-cos positions assume a square grid), "
                          f"got {H}x{W}")
    if amp not in (None, "off", "bf16"):
        raise ConfigError(f"lightly's peer step supports amp off or bf16, got {amp!r}")
    return cfg


class LightlyMAEStep:
    """lightly's MAE (its ``benchmarks/imagenet/vitb16/mae.py`` of lightly 1.6) as a step.

    Same timm ViT and sizes as ours; lightly's ``MaskedVisionTransformerTIMM``
    encoder, ``MaskedVisionTransformerDecoderTIMM`` decoder with a linear embed and
    prediction head (masked tokens only), ``utils.random_token_mask``, per-patch
    normalised targets (``utils.normalize_mean_var``) when ``norm_pix_loss``, MSE, and
    its AdamW set-up (``get_weight_decay_parameters``, betas 0.9/0.95) at constant lr.
    """

    def __init__(self, config: Mapping[str, Any], *, device: str | torch.device = "cpu", amp: str | None = None,
                 seed: int = 0) -> None:
        try:
            from lightly.models import utils as lutils
            from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConfigError(f"lightly is not installed ({exc}); pip install 'mim-workbench[bench]'") from None
        cfg = _check_peer_config(config, amp)
        self.config = cfg
        self.device = torch.device(device)
        self.amp = amp or "off"
        self._u = lutils
        p, C = int(cfg["patch_size"]), int(cfg["in_chans"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vit = timm.create_model(BASE_MODEL, pretrained=False, img_size=img_hw(cfg), in_chans=C, num_classes=0,
                                    patch_size=p, embed_dim=int(cfg["embed_dim"]), depth=int(cfg["depth"]),
                                    num_heads=int(cfg["num_heads"]), mlp_ratio=float(cfg["mlp_ratio"]))
            self.backbone = MaskedVisionTransformerTIMM(vit=vit)
            dd = int(cfg["decoder_embed_dim"])
            self.decoder_embed = torch.nn.Linear(vit.embed_dim, dd)
            self.decoder = MaskedVisionTransformerDecoderTIMM(
                num_patches=vit.patch_embed.num_patches, embed_dim=dd, depth=int(cfg["decoder_depth"]),
                num_heads=int(cfg["decoder_num_heads"]), num_prefix_tokens=vit.num_prefix_tokens,
                mlp_ratio=float(cfg["mlp_ratio"]), proj_drop_rate=0.0, attn_drop_rate=0.0)
            self.prediction_head = torch.nn.Linear(dd, p * p * C)
        parts = [self.backbone, self.decoder_embed, self.decoder, self.prediction_head]
        self.modules = torch.nn.ModuleList(parts).to(self.device).train()
        self.patch_size = p
        self.sequence_length = self.backbone.sequence_length
        params, no_wd = lutils.get_weight_decay_parameters(parts)
        self.optimizer = torch.optim.AdamW(
            [{"name": "mae", "params": params},
             {"name": "mae_no_weight_decay", "params": no_wd, "weight_decay": 0.0}],
            lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]), betas=BETAS)

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """MSE of the predicted masked patches for images ``[B, C, H, W]`` on the step's device (0-d, with grad)."""
        u = self._u
        B = images.shape[0]
        idx_keep, idx_mask = u.random_token_mask(size=(B, self.sequence_length),
                                                 mask_ratio=float(self.config["mask_ratio"]), device=images.device)
        features = self.backbone.encode(images=images, idx_keep=idx_keep)
        x_decode = self.decoder_embed(features)
        x_masked = x_decode.new_zeros(B, self.sequence_length, x_decode.shape[-1])
        x_masked = u.set_at_index(x_masked, idx_keep, x_decode.type_as(x_masked))
        x_decoded = self.decoder(x_masked, idx_mask=idx_mask)
        pred = self.prediction_head(u.get_at_index(x_decoded, idx_mask))
        target = u.get_at_index(u.patchify(images, self.patch_size), idx_mask - 1)
        if self.config["norm_pix_loss"]:
            target = u.normalize_mean_var(target, dim=-1)
        return F.mse_loss(pred, target)

    def __call__(self, x: torch.Tensor, region: torch.Tensor | None = None, *,
                 fine: torch.Tensor | None = None) -> torch.Tensor:
        """Forward, loss, backward, AdamW step, zero_grad; the loss, detached, 0-d float32.

        ``region`` and ``fine`` are accepted for the same call signature as our step and ignored.
        """
        images = x.to(self.device, non_blocking=True)
        if self.amp == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                loss = self.loss(images)
        else:
            loss = self.loss(images)
        loss = loss.float()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.detach()


def make_lightly_step(config: Mapping[str, Any], *, device: str | torch.device = "cpu",
                      amp: str | None = None, seed: int = 0) -> LightlyMAEStep:
    """lightly's MAE step at ``config`` (``method="mae"``, ``strategy="random"``, square image).

    ``amp="bf16"`` wraps its forward and loss in the same autocast our step uses.
    ConfigError when lightly is not installed or the config or amp is not supported.
    """
    return LightlyMAEStep(config, device=device, amp=amp, seed=seed)
