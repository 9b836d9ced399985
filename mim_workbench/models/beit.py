"""BEiT (Bao et al., ICLR 2022): predict the visual token of every masked patch.

As in BEiT, masked patch embeddings are replaced by a learned mask token before the
position embedding is added, the encoder sees every position, and a linear head scores
the masked positions over the codebook with cross-entropy.  The tokens come from
:class:`~.tokenizer.PatchTokenizer` (k-means over normalised patches of the user's own
images) instead of DALL-E's dVAE, which would have to be downloaded; it is fitted once
before training (``needs_fitting``) and stored with the model.

Besides the loss, ``losses`` carries ``token_acc`` (masked tokens predicted right) and
``token_base`` (the share of the most frequent true token among them: what predicting
token frequencies alone would score).  ``pred`` holds the predicted tokens drawn as
pixels (each token's mean patch), so the usual pictures show what the model expects.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from ..errors import ConfigError
from .base import MIMModel, MIMOutput
from .config import ModelConfig
from .encoder import encode_with_mask_token
from .patches import gather_patches
from .tokenizer import PatchTokenizer


class BEiTModel(MIMModel):
    """BEiT around a timm ViT encoder, with a tokenizer fitted on the training images."""

    step_metrics = ("token_acc", "token_base")

    def __init__(self, cfg: ModelConfig, encoder: VisionTransformer) -> None:
        super().__init__(cfg, encoder)
        D = encoder.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.tokenizer = PatchTokenizer(cfg.codebook_size, self.patch_size, self.in_chans)
        self.head = nn.Linear(D, cfg.codebook_size)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def needs_fitting(self) -> bool:
        """True until the tokenizer has been fitted (or restored from a checkpoint)."""
        return not bool(self.tokenizer.fitted)

    def fit(self, images: torch.Tensor, *, seed: int) -> None:
        """Fit the tokenizer on ``images [N, C, H, W]`` (see :meth:`PatchTokenizer.fit`)."""
        self.tokenizer.fit(images, seed=seed)

    def fitted_state(self) -> dict[str, torch.Tensor]:
        """The tokenizer's buffers (``centroids``, ``pictures``, ``fitted``)."""
        return {k: v.detach().cpu() for k, v in self.tokenizer.state_dict().items()}

    def load_fitted_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the tokenizer from :meth:`fitted_state`'s tensors."""
        self.tokenizer.load_state_dict(state)

    def forward(self, images: torch.Tensor, mask: torch.Tensor, fine: torch.Tensor | None = None, *,
                target: torch.Tensor | None = None) -> MIMOutput:
        """Cross-entropy over the codebook at masked patches; ``target`` (default ``images``)
        gives the true tokens, ``fine`` is ignored."""
        self._check(images, mask)
        if self.needs_fitting:
            raise ConfigError("the BEiT tokenizer is not fitted: fit it on training images first (model.fit)")
        idx = self._indices(mask, images.device)
        mask_d = mask.to(images.device, non_blocking=True)
        z = encode_with_mask_token(self.encoder, images, mask_d, self.mask_token)   # [B, P+L, D]
        z = z[:, self.encoder.num_prefix_tokens:]                                  # [B, L, D]
        logits = self.head(gather_patches(z, idx.ids_masked))                      # [B, M, K]
        true = self.tokenizer.tokens(images if target is None else target)         # [B, L]
        true_m = true.gather(1, idx.ids_masked)                                    # [B, M]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), true_m.flatten())
        with torch.no_grad():
            guess = logits.argmax(-1)                                              # [B, M]
            acc = (guess == true_m).float().mean()
            base = torch.bincount(true_m.flatten(), minlength=self.cfg.codebook_size).max() / true_m.numel()
        return MIMOutput(
            loss=loss, losses={"token": loss.detach(), "token_acc": acc, "token_base": base.float()},
            mask=mask_d, ids_masked=idx.ids_masked, pred=self.tokenizer.pictures[guess], normalized=False,
            tokens=true, tokens_pred=guess,
        )

    def check_state(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Refuse, naming ``where``, weights whose tokenizer is missing, unfitted or corrupt."""
        from ..errors import CheckpointError

        keys = ("tokenizer.centroids", "tokenizer.pictures", "tokenizer.fitted")
        missing = [k for k in keys if k not in state]
        if missing:
            raise CheckpointError(f"{where}: the BEiT tokenizer is missing ({', '.join(missing)}); "
                                  "the checkpoint cannot give the tokens its model predicts")
        c = state["tokenizer.centroids"]
        if tuple(c.shape) != tuple(self.tokenizer.centroids.shape) or not bool(torch.isfinite(c).all()) \
                or not bool(state["tokenizer.fitted"]):
            raise CheckpointError(f"{where}: the BEiT tokenizer is corrupt (tokenizer.centroids {tuple(c.shape)}, "
                                  f"expected {tuple(self.tokenizer.centroids.shape)} finite values of a fitted codebook)")
