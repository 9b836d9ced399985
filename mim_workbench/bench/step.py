"""The timed training step: one full step of the production code path.

``build_model`` -> ``model.make_mask`` -> ``model(images, mask, fine)`` ->
``loss.backward()`` -> the training loop's AdamW (``training.optim.build_optimizer``)
-> ``zero_grad``, at a constant learning rate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..masking import patch_coverage
from ..models import build_model
from ..training import optim
from ..training.runtime import CompiledForward, configure_backend
from .config import BETAS, check_config, default_region, make_fine, model_config

@dataclass
class _Settings:
    device: torch.device
    amp: torch.dtype | None


def _amp_dtype(amp: str | None, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``amp`` (None for off); ConfigError for an unknown mode or fp16 off CUDA."""
    if amp not in (None, "off", "bf16", "fp16"):
        raise ConfigError(f"amp must be off, bf16 or fp16, got {amp!r}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp or "off")
    if dtype is torch.float16 and device.type != "cuda":
        raise ConfigError("amp=fp16 needs CUDA (use bf16 on the CPU)")
    return dtype


class BenchStep:
    """One training step of the production code path; see :func:`make_step`.

    Attributes: ``config`` (the checked bench config), ``model`` (the MIM model),
    ``optimizer`` (AdamW from ``training.optim.build_optimizer``), ``device``.
    """

    def __init__(self, config: Mapping[str, Any], *, device: str | torch.device = "cpu",
                 amp: str | None = None, seed: int = 0) -> None:
        self.config = check_config(config)
        self.model_config = model_config(self.config)
        dev = torch.device(device)
        dtype = _amp_dtype(amp, dev)
        configure_backend(dev)            # as the training loop does (training.runtime.prepare_device)
        self._s = _Settings(dev, dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(self.model_config)
            if model.needs_fitting:   # BEiT's tokenizer, before timing: training fits it once, up front
                H, W = self.model_config.encoder.img_size
                n = max(32, -(-2 * self.model_config.codebook_size // model.num_patches))   # 2 patches a token
                model.fit(torch.rand(n, self.model_config.encoder.in_chans, H, W), seed=seed)
        self._steps = 0
        self.model = model.to(dev).train()
        # Looked up on the module at call time, so the step always uses the loop's current builder.
        self.optimizer = optim.build_optimizer(self.model, lr=float(self.config["lr"]),
                                               weight_decay=float(self.config["weight_decay"]), betas=BETAS)
        self.scaler = torch.amp.GradScaler("cuda") if dtype is torch.float16 else None
        self.generator = torch.Generator().manual_seed(seed + 1)   # masks: CPU generator, as in training
        self._region_px: torch.Tensor | None = None
        # The training loop's opt-in torch.compile (PretrainConfig.compile), training forward only.
        self.train_forward: Any = CompiledForward(self.model) if self.config["compile"] else self.model

    @property
    def device(self) -> torch.device:
        """The device the model and every batch live on."""
        return self._s.device

    @property
    def amp(self) -> str:
        """The autocast mode: ``"off"``, ``"bf16"`` or ``"fp16"``."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self._s.amp, "off")

    def coverage(self, batch_size: int, region: torch.Tensor | None = None) -> torch.Tensor:
        """Per-patch region coverage ``[B, gh, gw]`` as the training loop computes it.

        ``region`` may be a pixel mask ``[B, H, W]`` or ``[H, W]`` (converted with
        ``patch_coverage``, as the loop does for every batch), coverage ``[B, gh, gw]`` /
        ``[B, L]`` (returned as float), or None (the :func:`default_region` ellipse for
        every sample).  Any other shape raises ConfigError.
        """
        p = self.model.patch_size
        gh, gw = self.model.grid
        if region is None:
            if self._region_px is None or self._region_px.shape[0] != batch_size:
                self._region_px = default_region(self.model_config.encoder.img_size).expand(batch_size, -1, -1).contiguous()
            region = self._region_px
        if region.dim() == 2:                      # one mask for the whole batch
            region = region.expand(batch_size, -1, -1)
        if tuple(region.shape[-2:]) == tuple(self.model_config.encoder.img_size) and region.dim() == 3:
            return patch_coverage(region.float(), p)
        if tuple(region.shape) in ((batch_size, gh, gw), (batch_size, gh * gw)):
            return region.float()
        raise ConfigError(f"region must be a pixel mask [B, H, W] or coverage [B, {gh}, {gw}], "
                          f"got {tuple(region.shape)}")

    def mask(self, batch_size: int, region: torch.Tensor | None = None) -> torch.Tensor:
        """The step's mask ``[B, L]``: ``model.make_mask`` on the CPU generator (training loop's way).

        ``region`` is used by ``strategy="region"`` only (see :meth:`coverage`).
        """
        strategy = self.config["strategy"]
        cov = self.coverage(batch_size, region) if strategy == "region" else None
        return self.model.make_mask(strategy, batch_size, float(self.config["mask_ratio"]), region=cov,
                                    generator=self.generator)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, fine: torch.Tensor | None = None, *,
                model: Callable[..., Any] | None = None) -> Any:
        """The model's output for images ``x`` ``[B, C, H, W]`` and ``mask`` under the step's autocast.

        ``x`` (and, for MIRAM, ``fine`` or an upsampled ``x``) are moved to the step's
        device; ``model`` defaults to the eager model.
        """
        images = x.to(self.device, non_blocking=True)
        if self.config["method"] == "miram":
            fine = make_fine(x, self.model_config.miram_scale) if fine is None else fine
            fine = fine.to(self.device, non_blocking=True)
        else:
            fine = None
        ctx = (torch.autocast(self.device.type, dtype=self._s.amp) if self._s.amp is not None
               else contextlib.nullcontext())
        with ctx:
            return (model or self.model)(images, mask, fine=fine)

    def __call__(self, x: torch.Tensor, region: torch.Tensor | None = None, *,
                 fine: torch.Tensor | None = None) -> torch.Tensor:
        """Forward, loss, backward, AdamW step, zero_grad; the loss, detached, 0-d float32."""
        mask = self.mask(x.shape[0], region)
        out = self.forward(x, mask, fine, model=self.train_forward)
        loss = out.loss.float()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._steps += 1
        self.model.after_step(self._steps, 10_000)   # the feature method's teacher follows, as in training
        return loss.detach()

    @torch.inference_mode()
    def reconstruct(self, x: torch.Tensor, region: torch.Tensor | None = None, *,
                    fine: torch.Tensor | None = None) -> Any:
        """Inference: forward + ``model.render`` in eval mode (what ``reconstruct`` and the GUI do).

        The model is back in train mode afterwards, also after an error.
        """
        self.model.eval()
        try:
            out = self.forward(x, self.mask(x.shape[0], region), fine)
            return self.model.render(out, x.to(self.device))
        finally:
            self.model.train()


def make_step(config: Mapping[str, Any], *, device: str | torch.device = "cpu", amp: str | None = None,
              seed: int = 0) -> BenchStep:
    """A callable ``step_fn(x, region=None, *, fine=None) -> loss`` (detached 0-d tensor).

    ``config`` has exactly the keys ``img_size, patch_size, in_chans, embed_dim, depth,
    num_heads, decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio,
    mask_ratio, batch_size, norm_pix_loss, lr, weight_decay`` plus optional ``method``
    (``mae`` | ``simmim`` | ``miram``, default ``mae``), ``strategy`` (``random`` |
    ``block`` | ``region``, default ``random``) and ``compile`` (default false: the
    training loop's opt-in ``torch.compile`` of the forward, eager fallback on failure;
    the first call then compiles, 40-60 s on 2 CPU cores).  Each call does one full
    training step of the production code path at the constant learning rate ``lr``.

    ``x`` is a float32 CPU tensor ``[B, C, H, W]`` (moved to ``device`` like the
    loop moves batches).  ``region`` is only used by ``strategy="region"``: a pixel
    mask ``[B, H, W]`` or patch coverage ``[B, gh, gw]``; None uses a fixed central
    ellipse (:func:`default_region`).  ``fine`` is MIRAM's fine image ``[B, C, 2H, 2W]``;
    None synthesises one by upsampling ``x`` (benchmark only, see :func:`make_fine`).

    Keyword options beyond the config keys: ``device``, ``amp`` (``bf16`` autocast
    of the forward as the training loop does on CUDA; off by default; ``fp16`` on
    CUDA only) and ``seed``.  A bad config or amp raises ConfigError.
    """
    return BenchStep(config, device=device, amp=amp, seed=seed)
