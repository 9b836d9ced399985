"""Run settings: pretraining and fine-tuning, each one dataclass shared by the API, the CLI and the GUI.

Both nest the encoder's architecture as one :class:`~mim_workbench.models.config.EncoderConfig`.
``PretrainConfig`` holds what the user chose; ``resolved()`` fills the method
dependent defaults (strategy, ratio, gradient clipping, base learning rate) so that
``config.json`` in a run directory records exactly what ran; ``FinetuneConfig.resolved()``
fills the probe or full mode's defaults.  Defaults are sized for a laptop CPU;
``preset="rgmim-paper"`` gives the RGMIM paper's Table 1 set-up.

Settings come from keyword arguments, a dict, a JSON file or a TOML file; an
unknown key is an error (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from ..errors import ConfigError, check_known_keys
from ..models.config import (DEFAULT_POOL, ENCODER_FIELDS, METHODS, POOLS, EncoderConfig, ModelConfig, nest_encoder_fields,
                             parse_img_size)
from .schema import check_field_types

STRATEGY_NAMES = ("random", "block", "blockwise", "region")
AMP_MODES = ("auto", "bf16", "fp16", "off")
DEVICES = ("auto", "cpu", "cuda", "mps")

# Method-dependent defaults applied by ``resolved()`` when a field is left as None.
_METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "mae": {"strategy": "random", "ratio": 0.75, "clip_grad": None, "blr": 4e-4},
    "simmim": {"strategy": "block", "ratio": 0.6, "clip_grad": 5.0, "blr": 4e-4},
    "miram": {"strategy": "random", "ratio": 0.75, "clip_grad": None, "blr": 4e-4},
    # BEiT masks about 40 % blockwise; data2vec's vision recipe 60 %; both clip at 3.0.  A
    # classifier over hundreds of tokens learns slowly at MAE's rate: on 100 chest X-rays at
    # 112 px, 120 steps at 5e-4 (blr 2e-3 at a batch of 16) doubled the masked-token accuracy
    # of 1e-4 and beat 1.5e-3.
    "beit": {"strategy": "blockwise", "ratio": 0.4, "clip_grad": 3.0, "blr": 2e-3},
    "feature": {"strategy": "blockwise", "ratio": 0.6, "clip_grad": 3.0, "blr": 4e-4},
}

def method_defaults(method: str) -> dict[str, Any]:
    """The masking strategy, ratio, gradient clipping and base learning rate ``method`` uses
    when they are not given."""
    return dict(_METHOD_DEFAULTS[method])


PRESETS: dict[str, dict[str, Any]] = {
    # Li et al., RGMIM, Table 1: ViT-B/16, MAE-style decoder 512-d x 8 blocks x 16 heads,
    # batch 256, base lr 1.5e-4, weight decay 0.05, 40 pretraining epochs, ratio 0.75,
    # region-guided masking of the lungs.
    "rgmim-paper": {
        "method": "mae",
        "strategy": "region",
        "encoder": {"model": "vit_base_patch16_224", "img_size": (224, 224)},
        "decoder_embed_dim": 512,
        "decoder_depth": 8,
        "decoder_num_heads": 16,
        "batch_size": 256,
        "blr": 1.5e-4,
        "lr_scaling": "linear",
        "weight_decay": 0.05,
        "epochs": 40,
        "ratio": 0.75,
        "warmup_epochs": 5.0,
    },
    # What pays on a workstation CPU (benchmarks/RESULTS.md, "The pretraining study"): BEiT
    # with visual tokens fitted on the user's own images (its own blockwise masking, 40 %, and
    # base rate), 112 px inputs (4x the steps of 224 px in the same time), square-root lr
    # scaling for small batches, and a 20-minute budget with the schedule planned to end
    # with it.  Against MAE under the same budget it adds +0.05 / +0.03 AUC at 1 % / 10 %
    # labels (probed) with intervals clear of zero.
    "cpu": {
        "method": "beit",
        "encoder": {"img_size": (112, 112)},
        "epochs": 400,
        "time_budget_s": 1200.0,
    },
    # Learns something visible on a laptop CPU within a minute (the demo's model): 64 px
    # inputs, 4 px patches (on coarser grids nothing beats filling holes with the mean), a
    # 2-block ViT, SimMIM (on a dozen images MAE memorises an average chest), half the
    # patches masked region-first.
    "quick-cpu": {
        "method": "simmim",
        "strategy": "region",
        "ratio": 0.5,
        "encoder": {"img_size": (64, 64), "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 4},
        "batch_size": 8,
        "lr": 3e-3,
        "warmup_epochs": 5.0,
    },
}

# Fields that only control *how* a run executes, not what it computes: when resuming
# they come from the new config, everything else from the checkpoint.
RUN_CONTROL_FIELDS = frozenset({
    "out", "resume", "epochs", "max_steps", "time_budget_s", "device", "threads", "num_workers",
    "preview_every", "checkpoint_every", "keep_checkpoints", "cache", "data", "masks", "val_every",
    "checkpoint_interval_s", "max_nonfinite_steps", "compile",
})


def _bad(cfg: Any, name: str, why: str) -> NoReturn:
    """Raise ConfigError quoting ``cfg``'s value of ``name`` and why it is unusable."""
    raise ConfigError(f"{name}={getattr(cfg, name)!r}: {why}")


def require_data_and_out(cfg: PretrainConfig | FinetuneConfig) -> None:
    """A training run needs its dataset and its run directory (pretrain and finetune alike)."""
    if not cfg.data:
        raise ConfigError("data: no dataset given (--data PATH)")
    if not cfg.out:
        raise ConfigError("out: no run directory given (--out DIR)")


@dataclass
class PretrainConfig:
    """Everything ``pretrain`` needs.  Sizes are pixels, ratios and fractions in 0–1.

    ``batch_size`` is the *global* batch of one forward pass: under torchrun each of
    the N processes takes ``batch_size / N`` samples of it, so a run gives the same
    result on 1 or N processes.  One optimiser step consumes ``batch_size *
    accum_steps`` samples, and with ``lr=None`` the learning rate is ``blr`` scaled to
    that batch by ``lr_scaling`` (see ``absolute_lr``).

    The learning-rate schedule spans ``epochs``; ``max_steps`` only stops the run early
    (with a checkpoint), so a run cut short and resumed follows the same schedule as an
    uninterrupted one.  With ``time_budget_s`` the schedule is planned, from the measured
    step time, to end with the budget (never longer than ``epochs``).
    """

    # data and run directory
    data: str | None = None
    masks: str | None = None
    region_preset: str | None = None       # propose the missing region masks with this preset (regions.PRESETS)
    region_model: str | None = None        # or with this learned region model (regions learn)
    out: str | None = None
    val_fraction: float = 0.1
    val_every: int = 1                     # epochs between validations (0 = never); tiny data sets have 1-step epochs
    exclude_ids: list[str] = field(default_factory=list)   # sample ids kept out of training and validation
    augment: bool = True
    cache: bool | None = None              # decoded-image cache; None: on when the data fit its cap (io.cache)
    num_workers: int = 0
    # large images: region-guided crops from a pyramid level instead of whole letterboxed images
    crop_level: int | None = None          # pyramid level (0 = full resolution); None (and no crop_spacing): whole images
    crop_spacing: float | None = None      # or pick the level by pixel size, mm
    crops_per_image: int = 16              # crops of each image per epoch
    crop_region_fraction: float = 0.9      # share of crops centred on the region mask
    # method and masking
    method: str = "mae"
    strategy: str | None = None            # None: random (mae, miram), block (simmim), blockwise (beit, feature)
    ratio: float | None = None             # None: 0.75 (mae, miram), 0.6 (simmim, feature), 0.4 (beit)
    mask_options: dict[str, Any] = field(default_factory=dict)   # e.g. mask_patch_size, min_overlap, ratio_of
    # model
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder_embed_dim: int = 128
    decoder_depth: int = 4
    decoder_num_heads: int = 4
    norm_pix_loss: bool | None = None       # None: the model's default (ModelConfig)
    model_options: dict[str, Any] = field(default_factory=dict)  # other ModelConfig fields
    init: str | None = None
    # optimisation
    epochs: int = 10
    batch_size: int = 16
    accum_steps: int = 1
    blr: float | None = None               # for a batch of 256; None: the method's (4e-4, 1e-4 at a batch of 16; beit 2e-3)
    lr_scaling: str = "sqrt"               # how blr scales with the batch: "sqrt" (Adam's rule) or "linear" (MAE)
    lr: float | None = None
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 1.0
    clip_grad: float | None = None         # None: 5.0 for simmim, 3.0 for beit and feature, off otherwise
    max_nonfinite_steps: int = 20          # this many non-finite steps in a row stop the run (0 = never)
    amp: str = "auto"                      # CUDA: auto = bf16, else fp16; CPU: bf16 on AMX/AVX512-BF16, auto = bf16
                                           # on AMX for encoders >= 192 wide, else fp32 (runtime.resolve_amp)
    compile: bool = False                  # torch.compile the training forward (first step compiles; eager on failure)
    # execution
    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    resume: str | None = None
    max_steps: int | None = None
    time_budget_s: float | None = None
    preview_every: int = 25                # steps; 0 = never
    preview_size: int = 256                # longest side of preview arrays
    checkpoint_every: int | str = "epoch"  # steps, or "epoch"
    checkpoint_interval_s: float = 60.0    # "epoch" checkpoints no more often than this (0 = every epoch)
    keep_checkpoints: int = 3              # 0 = keep all
    preset: str | None = None

    def __post_init__(self) -> None:
        self.encoder = EncoderConfig.from_dict(self.encoder)
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)  # type: ignore[assignment]
        for name in ("data", "masks", "region_model", "out", "init", "resume"):
            v = getattr(self, name)
            if isinstance(v, Path):
                setattr(self, name, str(v))
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ConfigError naming the first unusable value (checked in field-group order)."""
        check_field_types(self)  # wrong types first: the range checks below assume numbers
        self._check_method_and_device()
        self._check_counts()
        self._check_numbers()
        self._check_data_options()

    def _check_method_and_device(self) -> None:
        """Method, masking strategy and ratio, validation share, mixed precision and device."""
        if self.method not in METHODS:
            _bad(self, "method", f"choose one of {', '.join(METHODS)}")
        if self.strategy is not None and self.strategy not in STRATEGY_NAMES:
            _bad(self, "strategy", f"choose one of {', '.join(STRATEGY_NAMES)}")
        if self.ratio is not None and not (0.0 < self.ratio < 1.0):
            _bad(self, "ratio", "must be a fraction strictly between 0 and 1")
        if not (0.0 <= self.val_fraction < 1.0):
            _bad(self, "val_fraction", "must be a fraction in [0, 1)")
        if self.amp not in AMP_MODES:
            _bad(self, "amp", f"choose one of {', '.join(AMP_MODES)}")
        if self.device not in DEVICES and not str(self.device).startswith(("cuda:", "mps:")):
            _bad(self, "device", f"choose one of {', '.join(DEVICES)} (or cuda:N)")

    def _check_counts(self) -> None:
        """Integer settings: sizes, step counts and intervals."""
        for name in ("epochs", "batch_size", "accum_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                _bad(self, name, "must be a positive integer")
        for name in ("threads", "max_steps"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                _bad(self, name, "must be a positive integer or unset")
        for name in ("num_workers", "preview_every", "keep_checkpoints", "val_every", "max_nonfinite_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                _bad(self, name, "must be an integer >= 0")
        if not (isinstance(self.checkpoint_every, int) and self.checkpoint_every > 0) and self.checkpoint_every != "epoch":
            _bad(self, "checkpoint_every", 'must be a positive number of steps or "epoch"')

    def _check_numbers(self) -> None:
        """Learning rates, regularisation, clipping, time budget and betas."""
        for name in ("blr", "weight_decay", "min_lr", "warmup_epochs", "checkpoint_interval_s"):
            v = getattr(self, name)
            if v is None and name == "blr":
                continue
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                _bad(self, name, "must be a finite number >= 0")
        if self.lr is not None and (not math.isfinite(self.lr) or self.lr <= 0):
            _bad(self, "lr", "must be a positive number or unset")
        if self.clip_grad is not None and (not math.isfinite(self.clip_grad) or self.clip_grad <= 0):
            _bad(self, "clip_grad", "must be a positive number or unset")
        if self.time_budget_s is not None and not (self.time_budget_s > 0):
            _bad(self, "time_budget_s", "must be positive seconds or unset")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            _bad(self, "betas", "must be two numbers in [0, 1)")

    def _check_data_options(self) -> None:
        """Excluded ids, option mappings, whole-slide crop settings and the preset."""
        if not isinstance(self.exclude_ids, (list, tuple)) or not all(isinstance(i, str) for i in self.exclude_ids):
            _bad(self, "exclude_ids", "must be a list of sample ids")
        self.exclude_ids = list(self.exclude_ids)
        if not isinstance(self.mask_options, dict):
            _bad(self, "mask_options", "must be a mapping")
        if not isinstance(self.model_options, dict):
            _bad(self, "model_options", "must be a mapping")
        if self.crop_level is not None and self.crop_level < 0:
            _bad(self, "crop_level", "must be a pyramid level >= 0 or unset")
        if self.crop_spacing is not None and not (math.isfinite(self.crop_spacing) and self.crop_spacing > 0):
            _bad(self, "crop_spacing", "must be a positive pixel size in mm or unset")
        if self.crops_per_image < 1:
            _bad(self, "crops_per_image", "must be a positive integer")
        if not 0.0 <= self.crop_region_fraction <= 1.0:
            _bad(self, "crop_region_fraction", "must be a fraction in [0, 1]")
        if self.lr_scaling not in ("linear", "sqrt"):
            _bad(self, "lr_scaling", "choose linear or sqrt")
        if self.preset is not None and self.preset not in PRESETS:
            _bad(self, "preset", f"choose one of {', '.join(PRESETS)}")
        if self.region_preset is not None:
            from ..regions import PRESETS as REGION_PRESETS

            if self.region_preset not in REGION_PRESETS:
                _bad(self, "region_preset", f"choose one of {', '.join(REGION_PRESETS)}")
            if self.strategy != "region":
                _bad(self, "region_preset", "proposes masks for region-guided masking: use it with strategy=region")
        if self.region_model is not None:
            if self.region_preset is not None:
                _bad(self, "region_model", "give a region preset or a region model, not both")
            if self.strategy != "region":
                _bad(self, "region_model", "proposes masks for region-guided masking: use it with strategy=region")

    # ------------------------------------------------------------------ derived values
    def resolved(self) -> PretrainConfig:
        """A copy with the method-dependent defaults and the absolute ``lr`` filled in."""
        d = _METHOD_DEFAULTS[self.method]
        return dataclasses.replace(
            self,
            strategy=self.strategy or d["strategy"],
            ratio=self.ratio if self.ratio is not None else d["ratio"],
            clip_grad=self.clip_grad if self.clip_grad is not None else d["clip_grad"],
            blr=self.blr if self.blr is not None else d["blr"],
            lr=self.absolute_lr(),
        )

    @property
    def effective_batch(self) -> int:
        """Samples per optimiser step (all processes together)."""
        return self.batch_size * self.accum_steps

    def absolute_lr(self) -> float:
        """``lr`` when given, else ``blr`` scaled from a batch of 256 to the effective batch.

        ``linear`` is MAE's rule (``blr * batch / 256``), made for batches of thousands: at a
        batch of 16 it divides the rate by 16.  ``sqrt`` (``blr * sqrt(batch / 256)``) is the
        square-root rule that keeps Adam's update noise constant (Malladi et al., NeurIPS
        2022), which suits the small batches of a workstation.
        """
        if self.lr is not None:
            return self.lr
        ratio = self.effective_batch / 256.0
        blr = self.blr if self.blr is not None else _METHOD_DEFAULTS[self.method]["blr"]
        return blr * (math.sqrt(ratio) if self.lr_scaling == "sqrt" else ratio)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["encoder"] = self.encoder.to_dict()
        out["betas"] = list(self.betas)
        return out

    def to_json(self, path: str | Path | None = None) -> str:
        """The settings as indented JSON text, also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PretrainConfig:
        """Build from a mapping; ``preset`` is applied first, explicit keys win.

        Unknown keys raise ConfigError listing all of them.  Dashes in keys are read
        as underscores so a file may use the CLI spelling (``batch-size``).  The encoder's
        settings may be nested under ``encoder`` or given flat (``img_size``, as the CLI and
        files written before the nesting do).
        """
        if not isinstance(values, dict):
            raise ConfigError(f"a config must be a mapping of settings, got {type(values).__name__}")
        values = nest_encoder_fields({str(k).replace("-", "_"): v for k, v in values.items()})
        check_known_keys(cls, values, "config key")
        preset = values.get("preset")
        if preset is not None and preset not in PRESETS:
            raise ConfigError(f"preset={preset!r}: choose one of {', '.join(PRESETS)}")
        merged = nest_encoder_fields(PRESETS[preset]) if preset is not None else {}
        encoder = {**EncoderConfig.from_dict(merged.get("encoder", {})).to_dict(),
                   **_encoder_mapping(values.get("encoder", {}))}
        merged.update(values)
        merged["encoder"] = encoder
        try:
            return cls(**merged)
        except TypeError as exc:  # wrong value types that the dataclass itself rejects
            raise ConfigError(f"invalid config: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> PretrainConfig:
        """Read a JSON (``.json``) or TOML (``.toml``) file."""
        return cls.from_dict(read_config_file(path))

    @classmethod
    def preset_config(cls, name: str, **overrides: Any) -> PretrainConfig:
        """The preset ``name`` with ``overrides`` on top (see :meth:`from_dict`)."""
        return cls.from_dict({"preset": name, **overrides})


# ====================================================================== fine-tuning
BALANCE = ("weights", "sampler", "none")

# Defaults that depend on the mode (applied by FinetuneConfig.resolved()).
_MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "probe": {"epochs": 100, "lr": 1e-3, "weight_decay": 0.0, "label_smoothing": 0.0, "drop_path": 0.0,
              "augment": False, "patience": 20, "warmup_epochs": 5.0},
    "full": {"epochs": 30, "lr": 3e-4, "weight_decay": 0.05, "label_smoothing": 0.1, "drop_path": 0.1,
             "augment": True, "patience": 8, "warmup_epochs": 2.0},
}


def saved_finetune_values(values: dict[str, Any]) -> dict[str, Any]:
    """A fine-tuning run's saved settings, as written by any version: those written before the
    pooling was recorded (no ``pool``, or ``None``) probed the class token and fine-tuned on the
    mean of the patch tokens."""
    values = dict(values)
    if values.get("pool") is None:
        values["pool"] = "token" if values.get("mode", "probe") == "probe" else "avg"
    return values


@dataclass
class FinetuneConfig:
    """Everything ``finetune`` needs; None means "the mode's default" (see ``resolved``)."""

    data: str | None = None
    masks: str | None = None
    out: str | None = None
    checkpoint: str | None = None          # pretrain/finetune checkpoint, exported encoder, or None = scratch
    mode: str = "probe"                    # "probe" | "full"
    fraction: float = 1.0                  # share of the training labels used
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    split_seed: int = 0                    # the patient split (fixed across seeds of an evaluation)
    exclude_ids: list[str] = field(default_factory=list)
    test_data: str | None = None           # an external labelled set (another hospital): scored, never trained on
    encoder: EncoderConfig = field(default_factory=EncoderConfig)   # a scratch encoder's; a checkpoint brings its own
    img_size: tuple[int, int] | None = None   # input size (position embeddings resampled); None: the encoder's
    # optimisation (None: mode default)
    epochs: int | None = None
    batch_size: int = 16
    lr: float | None = None
    min_lr: float = 1e-6
    weight_decay: float | None = None
    layer_decay: float = 0.75              # full mode only
    label_smoothing: float | None = None
    drop_path: float | None = None         # full mode only
    dropout: float = 0.0                   # before the head, full mode only
    pool: str = DEFAULT_POOL               # image feature: "token" (class token) or "avg" (mean of the patch tokens)
    head_init: str = "random"              # full mode: "probe" fits the head on the frozen features first (LP-FT)
    warmup_epochs: float | None = None
    balance: str = "weights"
    patience: int | None = None            # epochs without a better validation loss; 0 = never stop early
    augment: bool | None = None
    positive_class: str | None = None      # binary AUC/AP; default: the second class name
    # execution
    device: str = "auto"
    threads: int | None = None
    amp: str = "auto"
    seed: int = 0
    max_steps: int | None = None
    time_budget_s: float | None = None
    num_workers: int = 0
    cache: bool | None = None              # decoded-image cache (full mode); None: on when the data fit its cap
    resume: bool = False                   # continue the stopped or crashed run in ``out`` (finetune_state)
    checkpoint_interval_s: float = 60.0    # resume state at epoch ends no more often than this (0 = every epoch)

    def __post_init__(self) -> None:
        self.encoder = EncoderConfig.from_dict(self.encoder)
        if self.img_size is not None:
            self.img_size = parse_img_size(self.img_size)
        for name in ("data", "masks", "out", "checkpoint"):
            v = getattr(self, name)
            if isinstance(v, Path):
                setattr(self, name, str(v))
        self.exclude_ids = list(self.exclude_ids)
        self.validate()

    def validate(self) -> None:
        """ConfigError naming the first setting of the wrong type or out of range (run on construction)."""
        def bad(name: str, why: str) -> None:
            """Raise ConfigError naming setting ``name``, its value and ``why`` it is refused."""
            raise ConfigError(f"{name}={getattr(self, name)!r}: {why}")

        from .schema import check_field_types

        check_field_types(self)  # wrong types first: the range checks below assume numbers
        if self.mode not in _MODE_DEFAULTS:
            bad("mode", "choose probe or full")
        if self.pool not in POOLS:
            bad("pool", f"choose {' or '.join(POOLS)}")
        if self.head_init not in ("random", "probe"):
            bad("head_init", "choose random or probe")
        if not (0.0 < self.fraction <= 1.0):
            bad("fraction", "must be in (0, 1]")
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(name, "must be in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1.0:
            bad("test_fraction", "val_fraction + test_fraction must be below 1")
        if self.balance not in BALANCE:
            bad("balance", f"choose one of {', '.join(BALANCE)}")
        for name in ("batch_size",):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(name, "must be a positive integer")
        for name in ("epochs", "threads", "max_steps"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                bad(name, "must be a positive integer or unset")
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience < 0):
            bad("patience", "must be an integer >= 0")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", "must be a positive number")
        if not 0.0 < self.layer_decay <= 1.0:
            bad("layer_decay", "must be in (0, 1]")
        if self.label_smoothing is not None and not 0.0 <= self.label_smoothing < 1.0:
            bad("label_smoothing", "must be in [0, 1)")
        if self.drop_path is not None and not 0.0 <= self.drop_path < 1.0:
            bad("drop_path", "must be in [0, 1)")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            bad("time_budget_s", "must be positive seconds or unset")
        if not (self.checkpoint_interval_s >= 0 and math.isfinite(self.checkpoint_interval_s)):
            bad("checkpoint_interval_s", "must be seconds >= 0")

    def resolved(self) -> FinetuneConfig:
        """A copy with every unset (None) mode-dependent setting filled with ``mode``'s default."""
        d = _MODE_DEFAULTS[self.mode]
        return dataclasses.replace(self, **{k: (getattr(self, k) if getattr(self, k) is not None else v)
                                            for k, v in d.items()})

    def model_config(self) -> ModelConfig:
        """The ModelConfig of a scratch encoder at the run's input size."""
        encoder = self.encoder
        if self.img_size is not None:
            encoder = dataclasses.replace(encoder, img_size=self.img_size)
        return ModelConfig(encoder=encoder)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists, the encoder nested)."""
        d = dataclasses.asdict(self)
        if self.img_size is not None:
            d["img_size"] = list(self.img_size)
        d["encoder"] = self.encoder.to_dict()
        return d

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FinetuneConfig:
        """Build from a mapping (dashes read as underscores; the scratch architecture nested under
        ``encoder`` or given flat, except ``img_size``, which is the run's input size)."""
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
        values = nest_encoder_fields(values, tuple(k for k in ENCODER_FIELDS if k != "img_size"))
        check_known_keys(cls, values, "finetune setting")
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"invalid finetune config: {exc}") from None


def _encoder_mapping(value: Any) -> dict[str, Any]:
    """The encoder settings given as a mapping or an EncoderConfig, as a dict."""
    if isinstance(value, EncoderConfig):
        return value.to_dict()
    if not isinstance(value, dict):
        raise ConfigError(f"encoder={value!r}: must be a mapping of encoder settings")
    return dict(value)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings mapping stored in a JSON or TOML file (``[pretrain]`` table optional)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ModuleNotFoundError:
                raise ConfigError(f"{p}: reading TOML needs Python >= 3.11 or the 'tomli' package") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of settings at the top level")
    # Allow the settings to sit in a [pretrain] table next to other sections.
    if set(data) == {"pretrain"} and isinstance(data["pretrain"], dict):
        data = data["pretrain"]
    return data
