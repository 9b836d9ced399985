"""Region models learned from examples: a small U-Net that maps an image to its region.

    model = learn_regions(images, masks, seconds=90)      # a few painted examples suffice
    model.save("lungs.safetensors")
    mask = RegionModel.load("lungs.safetensors").propose(image)   # uint8 {0, 1}, image's H×W

The network (about 0.1 M parameters) sees the image letterboxed to ``size`` pixels and
standardised, so any resolution and windowing goes in; training augments every example with
random affine warps, contrast, gamma, blur and noise, because a handful of painted images is
all a user may give it. The prediction is cleaned the way a region is expected to look: the
``parts`` largest components (two lungs, one breast), holes filled, a smooth boundary.

A model file is self-contained and safe to load: weights in safetensors (fp16) and the
settings as JSON in its metadata; nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mim_workbench.errors import ConfigError, MimError
from mim_workbench.regions.morphology import fill_holes, largest_components, smooth_mask

if TYPE_CHECKING:
    import dask.array as da

    from mim_workbench.io.meta import LoadedImage

FORMAT = "mim-workbench-region-model"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class RegionModelConfig:
    """What a region model is: its input size, widths, and how its masks are cleaned."""

    size: int = 128                    # the letterboxed input's side, pixels
    widths: tuple[int, ...] = (8, 16, 32, 64)
    parts: int = 0                     # keep this many largest components (0: all sizeable ones)
    min_part: float = 0.05             # smaller components (share of the largest) are dropped
    smooth: float = 1.0                # boundary smoothing, pixels at the input size
    name: str = "region"


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class RegionNet(nn.Module):
    """A small U-Net: ``[B, 1, S, S]`` standardised image -> ``[B, 1, S, S]`` region logits."""

    def __init__(self, widths: Sequence[int] = (8, 16, 32, 64)) -> None:
        super().__init__()
        widths = list(widths)
        self.down = nn.ModuleList(_block(c_in, c_out) for c_in, c_out in zip([1] + widths[:-1], widths))
        self.up = nn.ModuleList(_block(c_hi + c_lo, c_lo) for c_hi, c_lo in zip(widths[:0:-1], widths[-2::-1]))
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 1, S, S]`` standardised images -> ``[B, 1, S, S]`` region logits (sigmoid gives probabilities)."""
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = block(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False), skip], 1))
        return self.head(x)


def standardise(image: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Grey image -> letterboxed ``size``² float32, zero mean and unit spread inside the image;
    also the content box ``(top, left, height, width)`` on the canvas."""
    from skimage.transform import resize

    grey = image.mean(axis=-1) if image.ndim == 3 else image
    grey = np.asarray(grey, np.float32)
    scale = size / max(grey.shape)
    h, w = max(1, round(grey.shape[0] * scale)), max(1, round(grey.shape[1] * scale))
    small = resize(grey, (h, w), order=1, anti_aliasing=scale < 1, preserve_range=True).astype(np.float32)
    lo, hi = np.percentile(small, (1, 99))
    small = (np.clip(small, lo, hi) - small.mean()) / max(float(small.std()), 1e-3)
    canvas = np.zeros((size, size), np.float32)
    top, left = (size - h) // 2, (size - w) // 2
    canvas[top:top + h, left:left + w] = small
    return canvas, (top, left, h, w)


class RegionModel:
    """A trained :class:`RegionNet` with its settings: proposes regions, saves and loads."""

    def __init__(self, net: RegionNet, config: RegionModelConfig, info: dict[str, Any] | None = None) -> None:
        self.net, self.config, self.info = net.eval(), config, dict(info or {})

    @torch.no_grad()
    def probabilities(self, image: np.ndarray | da.Array | LoadedImage | str | Path) -> np.ndarray:
        """Region probability per pixel, float32 ``[H, W]`` on the image's grid.

        ``image`` goes through :func:`~mim_workbench.io.model_input.as_unit_array` (its errors included).
        """
        from skimage.transform import resize

        from mim_workbench.io.model_input import as_unit_array

        arr = as_unit_array(image)
        canvas, (top, left, h, w) = standardise(arr, self.config.size)
        logits = self.net(torch.from_numpy(canvas)[None, None])[0, 0].numpy()
        prob = 1.0 / (1.0 + np.exp(-logits[top:top + h, left:left + w]))
        return resize(prob, arr.shape[:2], order=1, preserve_range=True).astype(np.float32)

    def propose(self, image: np.ndarray | da.Array | LoadedImage | str | Path) -> np.ndarray:
        """The cleaned region, uint8 {0, 1} with the image's ``H×W``."""
        prob = self.probabilities(image)
        mask = prob >= 0.5
        cfg = self.config
        if mask.any():
            k = cfg.parts or 1_000
            mask = largest_components(mask, k, min_fraction=cfg.min_part)
            mask = fill_holes(mask)
            mask = smooth_mask(mask, cfg.smooth * max(prob.shape) / cfg.size)
        return mask.astype(np.uint8)

    def save(self, path: str | Path) -> Path:
        """Write the model as safetensors (fp16 weights, settings as JSON metadata)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in self.net.state_dict().items()}
        meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                "config": json.dumps(asdict(self.config)), "info": json.dumps(self.info)}
        save_file(state, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> RegionModel:
        """Read a model written by :meth:`save`; :class:`MimError` naming the file if it is not one."""
        path = Path(path)
        state, meta = _read_model_file(path)
        try:
            config = RegionModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                                          for k, v in json.loads(meta["config"]).items()})
            net = RegionNet(config.widths)
            net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
            info = json.loads(meta.get("info", "{}"))
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise MimError(f"{path}: not a usable region model ({type(exc).__name__}: {str(exc)[:200]})") from None
        return cls(net, config, info)


def _read_model_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    if not path.is_file():
        raise MimError(f"{path}: no such region model file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise MimError(f"{path}: not a region model (unreadable safetensors: {exc})") from None
    if meta.get("format") != FORMAT:
        raise MimError(f"{path}: not a region model written by mim-workbench (format {meta.get('format')!r})")
    if int(meta.get("format_version", "0")) > FORMAT_VERSION:
        raise MimError(f"{path}: region model format {meta['format_version']} is newer than this release reads")
    return state, meta


# ----------------------------------------------------------------------------- learning
@dataclass(frozen=True)
class LearnProgress:
    """Training of a region model: ``step`` of ``total``, the mean loss of the last steps."""

    step: int
    total: int
    loss: float
    eta_s: float | None


def _examples(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from skimage.transform import resize

    xs, ys = [], []
    for i, (image, mask) in enumerate(zip(images, masks)):
        if np.asarray(mask).shape[:2] != np.asarray(image).shape[:2]:
            raise ConfigError(f"example {i + 1}: mask {np.asarray(mask).shape[:2]} is not the image's "
                              f"{np.asarray(image).shape[:2]} (resample it to the image first)")
        if not np.asarray(mask).any():
            raise ConfigError(f"example {i + 1}: its mask is empty (paint the region first)")
        canvas, (top, left, h, w) = standardise(np.asarray(image, np.float32), size)
        target = np.zeros((size, size), np.float32)
        target[top:top + h, left:left + w] = resize(np.asarray(mask) > 0, (h, w), order=0, preserve_range=True)
        xs.append(canvas)
        ys.append(target)
    return torch.from_numpy(np.stack(xs))[:, None], torch.from_numpy(np.stack(ys))[:, None]


def _augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random affine warp (the same for image and mask), then contrast, gamma-like and noise."""
    b = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(b, generator=gen)  # noqa: E731
    angle, scale = u(-0.25, 0.25), u(0.8, 1.2)
    aspect, tx, ty = u(0.9, 1.1), u(-0.12, 0.12), u(-0.12, 0.12)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * aspect, -sin, tx], 1), torch.stack([sin, cos / aspect, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = (F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5).float()
    x = x * u(0.7, 1.4)[:, None, None, None] + u(-0.4, 0.4)[:, None, None, None]
    x = torch.sign(x) * x.abs() ** u(0.8, 1.25)[:, None, None, None]
    if torch.rand(1, generator=gen).item() < 0.3:
        x = F.avg_pool2d(x, 3, stride=1, padding=1)
    return x + 0.1 * torch.randn(x.shape, generator=gen), y


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    prob = torch.sigmoid(logits)
    dice = 1 - (2 * (prob * y).sum((1, 2, 3)) + 1) / (prob.sum((1, 2, 3)) + y.sum((1, 2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(logits, y) + dice.mean()


def learn_regions(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], *,
                  on_progress: Callable[[LearnProgress], None] | None = None, **settings: Any) -> RegionModel:
    """Train a region model; :func:`iter_learning` with its progress sent to ``on_progress``."""
    learning = iter_learning(images, masks, **settings)
    while True:
        try:
            progress = next(learning)
        except StopIteration as done:
            return done.value
        if on_progress is not None:
            on_progress(progress)


def iter_learning(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], *,
                  config: RegionModelConfig | None = None, steps: int = 600, seconds: float | None = 110.0,
                  batch_size: int = 8, lr: float = 3e-3, seed: int = 0, init: RegionModel | None = None
                  ) -> Iterator[LearnProgress]:
    """Train a region model on ``images`` (float arrays in [0, 1]) and their masks (same H×W,
    nonzero = region), yielding progress after each step; the model is the generator's return
    value. At most ``steps`` steps and ``seconds`` of training (the learning rate follows a
    cosine to whichever ends first, from the measured step time). ``init`` continues from
    another model (e.g. the shipped lungs model). Raises :class:`ConfigError` for no examples,
    an empty mask or a mask of another size, naming the example."""
    if len(images) == 0 or len(images) != len(masks):
        raise ConfigError(f"learning a region needs examples: got {len(images)} image(s) and {len(masks)} mask(s)")
    config = config or (init.config if init is not None else RegionModelConfig())
    x_all, y_all = _examples(images, masks, config.size)
    torch.manual_seed(seed)
    net = RegionNet(config.widths) if init is None else init.net
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    started, total, recent, step = time.monotonic(), steps, [], 0
    while step < total:
        step += 1
        total = _planned_steps(step, steps, seconds, started)
        recent = (recent + [_train_step(net, opt, x_all, y_all, gen, batch_size, lr, step, total)])[-20:]
        left = (time.monotonic() - started) / step * (total - step)
        yield LearnProgress(step, total, sum(recent) / len(recent), left)
    net.eval()
    return RegionModel(net, config, {"examples": len(images), "steps": step, "seed": seed,
                                     "seconds": round(time.monotonic() - started, 1)})


def _train_step(net: RegionNet, opt: torch.optim.Optimizer, x_all: torch.Tensor, y_all: torch.Tensor,
                gen: torch.Generator, batch_size: int, lr: float, step: int, total: int) -> float:
    idx = torch.randint(len(x_all), (batch_size,), generator=gen)
    x, y = _augment(x_all[idx], y_all[idx], gen)
    for group in opt.param_groups:
        group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - 1) / max(1, total))))
    loss = _loss(net(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def _planned_steps(step: int, steps: int, seconds: float | None, started: float) -> int:
    """Steps that fit in the time budget, estimated from the steps so far (after a few)."""
    if seconds is None or step < 5:
        return steps
    per_step = (time.monotonic() - started) / (step - 1) if step > 1 else 0.0
    return max(step, min(steps, int(seconds / max(per_step, 1e-6))))
