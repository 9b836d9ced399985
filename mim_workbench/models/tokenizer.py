"""Visual tokens for BEiT-style pretraining, fitted on the user's own images (nothing downloaded).

BEiT names each patch by a token of DALL-E's dVAE and BEiT v2 by a codebook distilled from
CLIP; both need downloaded networks.  Here a token is a cluster of k-means over *normalised*
patches (each patch minus its mean, over its standard deviation: MAE's ``norm_pix_loss``
targets), so it names a patch's structure (an edge and its direction, a rib's curve, flat
tissue) whatever its brightness: the part of a patch worth predicting.  Each token also keeps
the mean raw patch of its members, to draw token maps as pictures.

The tokenizer travels inside the model (buffers ``tokenizer.centroids`` and
``tokenizer.pictures``), so a checkpoint is self-contained.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .patches import normalise_patches, patchify


class PatchTokenizer(nn.Module):
    """``K`` tokens over patches of ``patch_size`` pixels and ``in_chans`` channels.

    Buffers: ``centroids [K, F]`` in normalised-patch space, ``pictures [K, F]`` raw
    pixels (F = C*p*p), ``fitted`` (0-d bool).  Unfitted, every patch maps to token 0.
    """

    def __init__(self, codebook_size: int, patch_size: int, in_chans: int) -> None:
        super().__init__()
        self.patch_size, self.in_chans = int(patch_size), int(in_chans)
        dim = self.in_chans * self.patch_size ** 2
        self.register_buffer("centroids", torch.zeros(codebook_size, dim))
        self.register_buffer("pictures", torch.zeros(codebook_size, dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def codebook_size(self) -> int:
        """K, the number of tokens."""
        return int(self.centroids.shape[0])

    def normalised(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` images -> ``[B, L, C*p*p]`` float32 normalised patches."""
        normed, _ = normalise_patches(patchify(images.float(), self.patch_size), self.in_chans)
        return normed

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` long: the nearest centroid of every patch of ``images [B, C, H, W]``."""
        # in float32 even under mixed precision: a bf16 product would move patches between tokens
        with torch.autocast(images.device.type, enabled=False):
            x = self.normalised(images)                                        # [B, L, F]
            c = self.centroids.float()                                         # [K, F]
            # argmin |x - c|^2 = argmax (2 x.c - |c|^2); |x|^2 is the same for every token
            return (2 * x @ c.T - (c * c).sum(-1)).argmax(-1)                  # [B, L]

    @torch.no_grad()
    def fit(self, images: torch.Tensor, *, seed: int, max_patches: int = 100_000) -> None:
        """Fit the codebook by k-means on the patches of ``images [N, C, H, W]`` (at most
        ``max_patches`` of them, drawn with ``seed``); the same images and seed give the same
        codebook.  Raises ValueError when there are fewer patches than tokens."""
        from sklearn.cluster import MiniBatchKMeans

        raw = patchify(images.float(), self.patch_size).reshape(-1, self.centroids.shape[1])   # [N*L, F]
        K = self.codebook_size
        if raw.shape[0] < K:
            raise ValueError(f"{raw.shape[0]} patches cannot make {K} tokens: use more images or a smaller "
                             "codebook_size")
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(raw.shape[0], generator=g)[:max_patches]
        raw = raw[pick]
        normed, _ = normalise_patches(raw[None], self.in_chans)
        km = MiniBatchKMeans(n_clusters=K, random_state=seed, batch_size=4096, n_init=3, max_iter=50)
        labels = torch.from_numpy(km.fit_predict(normed[0].double().numpy())).long()
        self.centroids.copy_(torch.from_numpy(km.cluster_centers_).float())
        counts = torch.bincount(labels, minlength=K).clamp(min=1)[:, None].float()
        self.pictures.copy_(torch.zeros_like(self.pictures).index_add_(0, labels, raw) / counts)
        self.fitted.fill_(True)

    def draw(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``[B, L]`` tokens -> ``[B, C, H, W]`` picture: each patch drawn as its token's mean patch."""
        from .patches import unpatchify

        return unpatchify(self.pictures[tokens], self.patch_size, grid, self.in_chans)
