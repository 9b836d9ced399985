"""The pretraining loop: ``pretrain(config, on_event, control) -> RunResult``.

One function for the CLI, the GUI's child process and ``torchrun``.  What leaves
the loop leaves through ``on_event`` (see :mod:`.events`); what enters it enters
through ``control`` (polled once per step).  Everything that decides a number the
run computes - sample order, augmentation, masks, optimiser - is a function of the
config and the step, so a run stopped and resumed from a checkpoint continues
exactly, and N processes compute the same thing as one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError, MimError, TrainingError
from ..models import ModelConfig
from ..models import checkpoint as ckpt_mod
from ..models.config import ENCODER_FIELDS
from ..models.render import METHOD_PICTURES
from .config import RUN_CONTROL_FIELDS, PretrainConfig, require_data_and_out
from .control import Control, NullControl
from .events import (
    CheckpointSaved,
    Event,
    EventHandler,
    Failed,
    Finished,
    Preparing,
    Preview,
    Progress,
    RunResult,
    Started,
    null_handler,
)
from .metrics_log import MetricsLog
from .optim import build_optimizer, grad_norm_, load_optimizer_state, lr_at, set_lr
from .runtime import CompiledForward, DistContext, prepare_device, resolve_amp
from .sampler import LocalBatches, StepPlan
from .targets import codebook_for, fit_targets

# Fixed seeds (offsets from config.seed) of the generators that must not depend on
# how far training got: validation masks and preview masks.
_MASK_SEED_OFFSET = 1
_VAL_SEED_OFFSET = 4_242
_PREVIEW_SEED_OFFSET = 9_999
_PLAN_AFTER_STEPS = 3      # step times before this are warm-up (allocation, compilation)


def pretrain(config: PretrainConfig, on_event: EventHandler | None = None,
             control: Control | None = None) -> RunResult:
    """Pretrain a masked-image model as ``config`` says; see the module docstring.

    Raises MimError subclasses for problems the user can fix (bad settings, data,
    checkpoints); a Failed event is emitted before any exception propagates, and
    checkpoints already written stay complete.
    """
    emit = on_event or null_handler
    control = control or NullControl()
    dist_ctx: DistContext | None = None
    trainer: _Trainer | None = None
    try:
        dist_ctx = DistContext.from_env(config.device)
        trainer = _Trainer(config, emit, control, dist_ctx)
        return trainer.run()
    except BaseException as exc:
        last = trainer.last_checkpoint if trainer else None
        run_dir = str(trainer.run_dir) if trainer and trainer.run_dir else config.out
        err: BaseException = exc
        if isinstance(exc, torch.OutOfMemoryError):
            err = ConfigError(
                f"out of memory on {trainer.device if trainer else 'the device'} with batch_size="
                f"{config.batch_size}: lower the batch size (accum_steps keeps the effective batch)"
            )
        if isinstance(err, KeyboardInterrupt):
            msg = "interrupted"
        elif isinstance(err, MimError):
            msg = str(err)
        else:
            msg = f"{type(err).__name__}: {err}"
        try:
            emit(Failed(message=msg, run_dir=run_dir, last_checkpoint=last,
                        traceback=None if isinstance(err, (MimError, KeyboardInterrupt)) else traceback.format_exc()))
        except Exception:  # a broken handler must not hide the original error
            pass
        if err is not exc:
            raise err from exc
        raise
    finally:
        if trainer is not None:
            trainer.close()
        if dist_ctx is not None:
            dist_ctx.close()


# ====================================================================== config on resume
def merge_resume_config(given: PretrainConfig, saved: PretrainConfig) -> PretrainConfig:
    """The config of a resumed run: the checkpoint's, with the run-control fields of ``given``.

    Fields that decide what is computed (model, method, optimiser, batch, seed...)
    must match the checkpoint; a differing value that is not the default is an
    error rather than being silently ignored.
    """
    values = _flat_settings(saved)
    g, d = _flat_settings(given), _flat_settings(PretrainConfig())
    conflicts = []
    for name, gv in g.items():
        if name in ("resume", "preset"):
            continue
        if name in RUN_CONTROL_FIELDS:
            if gv != d[name]:
                values[name] = gv
        elif gv != d[name] and gv is not None and gv != values.get(name):
            conflicts.append(f"{name}={gv!r} (checkpoint: {values.get(name)!r})")
    if conflicts:
        raise ConfigError("cannot change settings when resuming: " + "; ".join(conflicts)
                          + " - start a new run with --init instead")
    values["resume"] = given.resume
    values["preset"] = None
    return PretrainConfig.from_dict(values)


def _flat_settings(cfg: PretrainConfig) -> dict[str, Any]:
    """``cfg.to_dict()`` with the encoder's fields beside the others, so each is compared by name."""
    values = cfg.to_dict()
    return {**values.pop("encoder"), **values}


def model_config_for(cfg: PretrainConfig) -> ModelConfig:
    """The models.ModelConfig of a (resolved) PretrainConfig."""
    options = dict(cfg.model_options)
    arch = {k: options.pop(k) for k in ENCODER_FIELDS if k in options}
    values: dict[str, Any] = {
        "encoder": {**cfg.encoder.to_dict(), **arch}, "method": cfg.method,
        "decoder_embed_dim": cfg.decoder_embed_dim, "decoder_depth": cfg.decoder_depth,
        "decoder_num_heads": cfg.decoder_num_heads,
    }
    if cfg.norm_pix_loss is not None:
        values["norm_pix_loss"] = cfg.norm_pix_loss
    if "mask_patch_size" in cfg.mask_options:  # SimMIM's cell size lives in the model config too
        values["mask_patch_size"] = cfg.mask_options["mask_patch_size"]
    values.update(options)
    try:
        return ModelConfig.from_dict(values)
    except ConfigError as exc:
        raise ConfigError(f"model settings: {exc}") from None


# ====================================================================== the trainer
@dataclasses.dataclass
class _QueuedStep:
    """An optimiser step whose work is queued; its numbers are still on the device."""

    step: int
    epoch: int
    lr: float
    # [loss summed over processes, processes with a non-finite loss, unreadable files met,
    #  gradient norm, 1 if the update was skipped on the device]
    numbers: torch.Tensor
    skipped: bool | None         # decided on the host (fp16, non-fused optimiser); None: numbers[4]
    unreadable: list[str]
    messages: list[str]
    t0: float


class _Trainer:
    def __init__(self, config: PretrainConfig, emit: EventHandler, control: Control, dist_ctx: DistContext) -> None:
        self.dist = dist_ctx
        self._emit_raw = emit
        self.control = control
        self.last_checkpoint: str | None = None
        self.run_dir: Path | None = None
        self.device = torch.device("cpu")
        self.metrics: MetricsLog | None = None
        self.notes: list[str] = list(dist_ctx.notes)
        self._region_fallbacks = 0
        self._saved_clock = time.monotonic()   # when the last checkpoint was written (or the run began)
        self._setup(config)

    # ------------------------------------------------------------------ events
    def emit(self, event: Event) -> None:
        """Hand ``event`` to the caller's handler, on rank 0 only."""
        if self.dist.is_main:  # one voice per job: rank 0 logs, checkpoints and reports
            self._emit_raw(event)

    # ------------------------------------------------------------------ setup
    def _setup(self, config: PretrainConfig) -> None:
        resume = None
        if config.resume:
            resume = ckpt_mod.load_checkpoint(config.resume, kind="pretrain")
            try:
                saved = PretrainConfig.from_dict(resume.config)
            except ConfigError as exc:
                raise CheckpointError(f"{resume.path / ckpt_mod.META_FILE}: stored config is invalid: {exc}") from None
            given_out = config.out
            config = merge_resume_config(config, saved)
            # The run continues beside its checkpoint: the ``out`` stored in a checkpoint
            # (maybe someone else's, maybe moved) must never decide where this process writes.
            if not given_out:
                config = dataclasses.replace(config, out=str(resume.run_dir))
            if config.init:
                self.notes.append("init ignored: resuming restores the checkpoint's weights")
        cfg = config.resolved()
        require_data_and_out(cfg)
        self.cfg = cfg
        self.resume = resume
        self.run_dir = Path(cfg.out).expanduser()

        self.device = prepare_device(cfg.device, threads=cfg.threads, local_rank=self.dist.local_rank)
        self._seed_everything(cfg.seed)

        self.model_cfg = model_config_for(cfg)
        self._setup_data(cfg)
        self._setup_model(cfg, resume)
        cfg = self.cfg   # the model's setup may fix what the user left to the data (codebook size)
        self._setup_schedule(cfg, resume)
        self._setup_run_dir(cfg, resume)

    def _seed_everything(self, seed: int) -> None:
        # Model initialisation draws from the global generators; the loop itself uses
        # dedicated generators (sampler, masks, augmentation), see sampler.py.
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)

    def _setup_data(self, cfg: PretrainConfig) -> None:
        from .mim_dataset import MIMDataset
        from ..io.datasets import discover, patient_split

        index = discover(cfg.data, masks=cfg.masks)
        samples = list(index.samples)
        if cfg.exclude_ids:  # held out by the caller (e.g. the demo's test image): never trained on
            excluded = set(cfg.exclude_ids)
            missing = excluded - {s.id for s in samples}
            if missing:
                self.notes.append(f"exclude_ids not in the dataset: {', '.join(sorted(missing))}")
            samples = [s for s in samples if s.id not in excluded]
        if not samples:
            raise ConfigError(f"data={cfg.data!r}: no images found")
        splits = patient_split(samples, val=cfg.val_fraction, seed=cfg.seed)
        self.train_samples = list(splits["train"])
        self.val_samples = list(splits.get("val", []))
        if not self.train_samples:
            raise ConfigError(f"data={cfg.data!r}: the training split is empty (val_fraction={cfg.val_fraction})")
        if cfg.strategy == "region" and (cfg.region_preset or cfg.region_model):
            self._propose_regions(cfg)
        if cfg.strategy == "region" and not any(s.mask is not None for s in self.train_samples):
            raise ConfigError(
                "strategy=region needs region masks, but no training image has one "
                "(pass --masks DIR or --region-preset lungs|breast|teeth|tissue, or use --strategy random)"
            )
        fine_scale = int(self.model_cfg.miram_scale) if cfg.method == "miram" else None
        cache = self._make_cache(cfg, fine_scale)
        common = dict(img_size=cfg.encoder.img_size, in_chans=cfg.encoder.in_chans, fine_scale=fine_scale,
                      seed=cfg.seed, cache=cache, substitute_unreadable=True)
        if cfg.crop_level is not None or cfg.crop_spacing is not None:  # large images: pyramid crops
            from .crop_dataset import pretrain_crop_datasets

            self.train_ds, self.val_ds, self.preview_ds = pretrain_crop_datasets(
                cfg, self.train_samples, self.val_samples, fine_scale)
        else:
            self.train_ds = MIMDataset(self.train_samples, augment=cfg.augment, **common)
            self.val_ds = MIMDataset(self.val_samples, augment=False, **common) if self.val_samples else None
            # The preview image: a fixed held-back image (a training image when none is held back);
            # the other samples are there to stand in if it cannot be decoded.
            self.preview_ds = MIMDataset(self.val_samples or self.train_samples, augment=False, **common)
        self.data_signature = ckpt_mod.dataset_signature(self.train_samples + self.val_samples)
        self.data_notes = list(getattr(index, "notes", []) or [])

    def _propose_regions(self, cfg: PretrainConfig) -> None:
        """Masks for the images that have none, from the region preset (cached across runs).

        Every process of a torchrun job proposes what the cache lacks; the results are the
        same and written atomically, so the processes never need to wait for each other.
        """
        from ..regions.cache import propose_missing
        from ..regions.folder import model_source

        source = model_source(cfg.region_model) if cfg.region_model else cfg.region_preset
        name = Path(cfg.region_model).name if cfg.region_model else cfg.region_preset
        stage = f"proposing {name} region masks"
        workers = 1 if self.dist.enabled else max(1, min(8, cfg.threads or os.cpu_count() or 1))
        report = propose_missing(
            self.train_samples + self.val_samples, source, workers=workers,
            on_progress=lambda p: self.emit(Preparing(stage, p.done, p.total, p.eta_s)))
        self.notes.append(report.note())

    def _make_cache(self, cfg: PretrainConfig, fine_scale: int | None) -> Any:
        """The decoded-image cache (``io.cache.cache_for``).  Without it every epoch decodes and
        resizes every image again: 10 ms per 224 px PNG here, 0.16 s of a 0.40 s ViT-Tiny step
        at batch 16 (benchmarks/loop_defaults.py)."""
        from ..io.cache import cache_for

        samples = self.train_samples + self.val_samples
        cache, note = cache_for(cfg.cache, len(samples), cfg.encoder.img_size, channels=3 if cfg.encoder.in_chans == 3 else 1,
                                fine_scale=fine_scale, region=any(s.mask is not None for s in samples))
        if note:
            self.notes.append(note)
        return cache

    def _setup_model(self, cfg: PretrainConfig, resume: ckpt_mod.Checkpoint | None) -> None:
        from ..models import build_model

        model = build_model(self.model_cfg, init=None if resume else cfg.init)
        if resume is None and self._fit_codebook_to_data(cfg, model.num_patches):
            model = build_model(self.model_cfg, init=cfg.init)
        if resume is not None:
            model.load_weights(resume.model_state(), str(resume.path))
        else:
            note = fit_targets(model, self.train_ds, seed=cfg.seed, signature=self.data_signature, emit=self.emit)
            self.notes += [note] if note else []
        self.model = model.to(self.device)
        self.model.train()
        self.amp_dtype, amp_notes = resolve_amp(cfg.amp, self.device, width=self.model.encoder.embed_dim)
        self.notes += amp_notes
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.lr = float(cfg.lr)  # resolved(): given, or blr * effective batch / 256
        self.optimizer = build_optimizer(self.model, lr=self.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
        # Only the fused kernels take the skip decision as a tensor (found_inf).
        self._fused_optimizer = bool(self.optimizer.param_groups[0].get("fused"))
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        if resume is not None:
            state = resume.optimizer_state()
            if state is not None:
                try:
                    load_optimizer_state(self.optimizer, state)
                except (ValueError, KeyError, RuntimeError) as exc:
                    raise CheckpointError(f"{resume.path}: optimiser state does not fit: {exc}") from None
            if self.scaler is not None and resume.meta.get("scaler"):
                self.scaler.load_state_dict(resume.meta["scaler"])
        self.ddp_model: torch.nn.Module = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(self.model, device_ids=ids)
        # The training forward, compiled on request; validation and previews (eval mode,
        # other batch sizes) stay eager instead of compiling graphs of their own.
        self._compile_messages: list[str] = []
        self.train_forward: Any = self.ddp_model
        if cfg.compile:
            self.train_forward = CompiledForward(self.ddp_model, on_fallback=self._compile_messages.append)

    def _fit_codebook_to_data(self, cfg: PretrainConfig, num_patches: int) -> bool:
        """Shrink a codebook the user did not size to what the training images can fit; True
        when it changed.  The size is kept in the run's settings, so a resumed run rebuilds the
        same model."""
        if self.model_cfg.method != "beit" or "codebook_size" in cfg.model_options:
            return False
        size = codebook_for(len(self.train_ds), num_patches, self.model_cfg.codebook_size)
        if size == self.model_cfg.codebook_size:
            return False
        self.notes.append(f"beit: {size} visual tokens instead of {self.model_cfg.codebook_size}: "
                          f"{len(self.train_ds)} training images of {num_patches} patches fit no more "
                          "(--codebook-size sets it)")
        self.cfg = dataclasses.replace(cfg, model_options={**cfg.model_options, "codebook_size": size})
        self.model_cfg = model_config_for(self.cfg)
        return True

    def _setup_schedule(self, cfg: PretrainConfig, resume: ckpt_mod.Checkpoint | None) -> None:
        self.plan = StepPlan(n=len(self.train_ds), batch_size=cfg.batch_size, accum_steps=cfg.accum_steps,
                             seed=cfg.seed, world_size=self.dist.world_size, rank=self.dist.rank)
        spe = self.plan.steps_per_epoch
        self.full_steps = cfg.epochs * spe          # the schedule when time is no constraint
        self.total_steps = self.full_steps
        self.warmup_steps = min(self.total_steps, int(round(cfg.warmup_epochs * spe)))
        self.stop_at = min(self.total_steps, cfg.max_steps) if cfg.max_steps else self.total_steps
        # Masks for training come from one generator shared (identically seeded) by all
        # processes; its state is part of every checkpoint.
        self.mask_gen = torch.Generator().manual_seed(cfg.seed + _MASK_SEED_OFFSET)
        self.step, self.epoch, self.position = 0, 0, 0
        self.skipped = 0
        self._nonfinite_run = 0         # consecutive skipped steps; max_nonfinite_steps ends the run
        self._unreadable: set[str] = set()  # files that failed to decode, already reported
        self._elapsed_before = 0.0     # training seconds of the interrupted run(s), for metrics.csv
        self.last_val: float | None = None
        self.last_loss: float | None = None
        if resume is not None:
            self.step = resume.step
            sampler = resume.meta.get("sampler", {})
            if int(sampler.get("n_train", -1)) == self.plan.n and int(sampler.get("steps_per_epoch", -1)) == spe:
                self.epoch, self.position = int(sampler["epoch"]), int(sampler["position"])
            else:
                self.epoch, self.position = divmod(self.step, spe)
                self.notes.append("the training set changed size since the checkpoint; resuming at the same "
                                  "step, but the sample order differs from the interrupted run")
            if resume.meta.get("dataset_signature") not in (None, self.data_signature):
                self.notes.append("the dataset differs from the checkpoint's (files changed or moved)")
            ckpt_mod.restore_rng_state(resume.meta.get("rng", {}), self.mask_gen)
            metrics = resume.meta.get("metrics", {})
            self.skipped = int(metrics.get("skipped_steps", 0))
            self.last_val = metrics.get("val_loss")
            self._elapsed_before = float(metrics.get("elapsed_s") or 0.0)
            self.last_checkpoint = str(resume.path)
            planned = resume.meta.get("schedule")
            if planned and cfg.time_budget_s is not None:
                self._set_schedule(int(planned["total_steps"]), int(planned["warmup_steps"]))
        self.mask_opts = {**self.model.mask_options(cfg.strategy), **cfg.mask_options}

    def _setup_run_dir(self, cfg: PretrainConfig, resume: ckpt_mod.Checkpoint | None) -> None:
        rd = self.run_dir
        assert rd is not None
        same_dir = resume is not None and rd.resolve() == resume.run_dir.resolve()
        self._same_dir = same_dir
        if not same_dir and ckpt_mod.list_checkpoints(rd):
            raise ConfigError(f"out={str(rd)!r} already holds a run (checkpoints found); "
                              "resume it with --resume DIR or choose another --out")
        self.dist.barrier()  # every process checked before rank 0 writes anything
        if self.dist.is_main:
            rd.mkdir(parents=True, exist_ok=True)
            ckpt_mod.clean_stale_temp(rd)
            (rd / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n",
                                            encoding="utf-8")
            self.metrics = MetricsLog(rd / "metrics.csv", resume_step=self.step if same_dir else None,
                                      extra=self.model.step_metrics)

    def _set_schedule(self, total: int, warmup: int) -> None:
        self.total_steps, self.warmup_steps = total, min(total, warmup)
        self.stop_at = min(total, self.cfg.max_steps) if self.cfg.max_steps else total

    def _plan_to_budget(self) -> None:
        """Fit the learning-rate schedule into what is left of ``time_budget_s``.

        Cut off by a time budget, a schedule planned in epochs stops with its learning rate
        still high, which wastes most of what was learned late.  From the measured (smoothed)
        step time the schedule is re-planned after every step to end with the budget (never
        longer than ``epochs``); the warm-up is as long as asked, at most a quarter of it.
        """
        budget = self.cfg.time_budget_s
        if budget is None or self._step_s is None or self.step < _PLAN_AFTER_STEPS or self._step_s <= 0:
            return
        left = max(0.0, budget - self._t_active)
        total = max(self.step, min(self.full_steps, self.step + int(left / self._step_s)))
        warmup = self.warmup_steps
        if self.step < warmup:   # still warming up: as asked, but at most a quarter of a short schedule
            asked = int(round(self.cfg.warmup_epochs * self.plan.steps_per_epoch))
            warmup = max(self.step + 1, min(asked, total // 4))
        self._set_schedule(total, warmup)

    # ------------------------------------------------------------------ run
    def run(self) -> RunResult:
        """Train from the current step to ``stop_at`` (or a stop, a pause-and-stop or the time
        budget), ending on a checkpoint; emits Started, Progress, Preview, CheckpointSaved and
        Finished in that order of occurrence."""
        self._announce()
        history: list[dict[str, Any]] = []
        reason, saved_at = self._train_epochs(history)
        return self._finish(history, reason, saved_at)

    def _announce(self) -> None:
        """Emit Started, reset the run's clocks and show a first preview."""
        cfg = self.cfg
        self.emit(Started(
            run_dir=str(self.run_dir), config=cfg.to_dict(),
            total_steps=self.total_steps, device=str(self.device), start_step=self.step,
            steps_per_epoch=self.plan.steps_per_epoch, world_size=self.dist.world_size,
            n_train=len(self.train_samples), n_val=len(self.val_samples), n_params=self.n_params, lr=self.lr,
            amp={torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp_dtype, "off"),
            stop_at=self.stop_at, notes=tuple(self.notes + self.data_notes + self._compile_messages),
        ))
        self._compile_messages.clear()  # a compile failure at set-up is said once, in Started's notes
        self._t_active = 0.0           # seconds of training, pauses excluded
        self._step_s: float | None = None  # smoothed seconds per step
        self._reseed_step_s = False        # the first step compiled: let the second seed the average
        if cfg.preview_every:  # a first picture right away (also when resuming)
            self._preview()
        self._finished_at: float | None = None
        self._queued: _QueuedStep | None = None    # a step whose numbers are read after the next is queued

    def _flush(self, history: list[dict[str, Any]]) -> None:
        """Read back and report the queued step, if any."""
        if self._queued is not None:
            row, self._queued = self._finish_step(self._queued), None
            history.append(row)
            self._report(row)

    def _train_epochs(self, history: list[dict[str, Any]]) -> tuple[str, int]:
        """Steps until ``stop_at`` or a stop; returns (Finished's reason, step of the last checkpoint
        written here, -1 if none).  Every step's row is appended to ``history``."""
        saved_at = -1
        while self.step < self.stop_at:
            self.train_ds.set_epoch(self.epoch)
            batches = self._loader(self.epoch, self.position)
            while self.position < self.plan.steps_per_epoch and self.step < self.stop_at:
                if self._queued is not None and not self.dist.enabled and self.control.pause_requested():
                    # a pause is not part of the step's time (with several processes: ~1 step's worth)
                    self._flush(history)
                stop_reason = self._check_stop()
                if stop_reason:
                    self._flush(history)
                    return stop_reason, saved_at
                step = self._train_step(batches)
                self._flush(history)      # the previous step's numbers: this step is already queued
                epoch_done, saved = self._after_step(step, history)
                if saved:
                    saved_at = self.step
                if epoch_done:
                    break  # next epoch: new order, new loader
        self._flush(history)
        if self.stop_at < self.total_steps:
            return "max_steps", saved_at
        return ("time_budget" if self.total_steps < self.full_steps else "completed"), saved_at

    def _after_step(self, step: _QueuedStep, history: list[dict[str, Any]]) -> tuple[bool, bool]:
        """Queue ``step``'s numbers for later, or read and report them now with what falls due at
        this step (validation, next epoch, preview, checkpoint); returns (epoch done, saved)."""
        cfg = self.cfg
        epoch_done = self.position == self.plan.steps_per_epoch
        every = cfg.checkpoint_every
        if self._defer_numbers() and not (
                epoch_done or (cfg.preview_every and self.step % cfg.preview_every == 0)
                or (isinstance(every, int) and self.step % every == 0)):
            self._queued = step
            return False, False
        row = self._finish_step(step)
        history.append(row)
        if epoch_done and cfg.val_every and (self.epoch + 1) % cfg.val_every == 0:
            self.last_val = self._validate()
            row["val_loss"] = self.last_val
        self._report(row)
        if epoch_done:
            self.epoch, self.position = self.epoch + 1, 0
        if cfg.preview_every and self.step % cfg.preview_every == 0:
            self._preview()
        # Small data sets have 1-step epochs: epoch checkpoints are rate-limited in time.
        epoch_due = epoch_done and time.monotonic() - self._saved_clock >= cfg.checkpoint_interval_s
        if epoch_done and self.dist.enabled:  # clocks differ: all processes must agree
            epoch_due = self.dist.sum_floats([float(epoch_due)], self.device)[0] > 0
        if (every == "epoch" and epoch_due) or (isinstance(every, int) and self.step % every == 0):
            self._save()
            return epoch_done, True
        return epoch_done, False

    def _finish(self, history: list[dict[str, Any]], reason: str, saved_at: int) -> RunResult:
        """End on a checkpoint and a preview of the final step, then emit Finished."""
        cfg = self.cfg
        # Always end on a checkpoint, unless the newest one already holds this exact state.
        unchanged = self.resume is not None and self.step == self.resume.step and self._same_dir
        if saved_at != self.step and not unchanged:
            self._save()
        if cfg.preview_every and self.step % cfg.preview_every:
            self._preview()
        self.dist.barrier()
        self.emit(Finished(run_dir=str(self.run_dir), step=self.step, last_checkpoint=self.last_checkpoint,
                           reason=reason))
        return RunResult(run_dir=str(self.run_dir), step=self.step, last_checkpoint=self.last_checkpoint,
                         reason=reason, final_loss=self.last_loss, val_loss=self.last_val,
                         skipped_steps=self.skipped, history=history)

    def close(self) -> None:
        """Close the run's metrics file."""
        if self.metrics is not None:
            self.metrics.close()

    # ------------------------------------------------------------------ control
    def _check_stop(self) -> str | None:
        """Pause (sleep-polling) and stop requests, agreed on by all processes."""
        if self.control.pause_requested() and not self.control.stop_requested():
            while self.control.pause_requested() and not self.control.stop_requested():
                time.sleep(0.05)
        stop = 1.0 if self.control.stop_requested() else 0.0
        over = 1.0 if (self.cfg.time_budget_s is not None and self._t_active >= self.cfg.time_budget_s) else 0.0
        if self.dist.enabled:
            stop, over = self.dist.sum_floats([stop, over], self.device)
        if stop:
            return "stopped"
        if over:
            return "time_budget"
        return None

    # ------------------------------------------------------------------ data
    def _loader(self, epoch: int, start_step: int):
        from torch.utils.data import DataLoader

        loader = DataLoader(
            self.train_ds,
            batch_sampler=LocalBatches(self.plan, epoch, start_step),
            num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            # A private generator: creating the iterator must not consume global RNG state.
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )
        return iter(loader)

    def _masks(self, batch: dict[str, torch.Tensor], n_global: int, generator: torch.Generator,
               local: slice | None, *, count_fallbacks: bool = True) -> torch.Tensor:
        """Masks for a *global* micro-batch from ``generator``, cut to this process's rows.

        Every process draws the whole global batch's masks from the same generator,
        so sample k of a global batch gets the same mask on 1 or N processes.
        Region-guided masking needs the regions of the whole batch: gathered.
        """
        region = None
        if self.cfg.strategy == "region":
            from ..masking import patch_coverage

            cov = patch_coverage(batch["region"].float(), self.model.patch_size)  # [b, gh, gw]
            region = self.dist.gather_rows(cov, self.device) if local is not None else cov
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mask = self.model.make_mask(self.cfg.strategy, n_global, float(self.cfg.ratio), region=region,
                                        generator=generator, **self.mask_opts)
        if count_fallbacks:  # reported once per step instead of one warning per batch
            self._region_fallbacks += len(caught)
        return mask[local] if local is not None else mask

    def _forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], mask: torch.Tensor):
        images = batch["image"].to(self.device, non_blocking=True)
        fine = batch.get("fine")
        if fine is not None:
            fine = fine.to(self.device, non_blocking=True)
        ctx = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        with ctx:
            out = model(images, mask, fine=fine)
        return out, images

    # ------------------------------------------------------------------ one step
    def _defer_numbers(self) -> bool:
        """Read a step's loss and gradient norm only after the next step is queued (CUDA).

        Reading them is a host/device sync: right after the step it would leave the GPU
        idle while Python queues the next one.  Read one step later, the GPU is still
        busy with the next step.  Skipping a non-finite step then happens on the device
        (the fused AdamW's ``found_inf``), not by a host-side decision.  On the CPU
        everything is synchronous anyway, and fp16's GradScaler decides on the host.
        """
        return self.device.type == "cuda" and self.scaler is None and self._fused_optimizer

    def _train_step(self, batches) -> _QueuedStep:
        """Queue one optimiser step (forward, backward, update) without reading any number back."""
        cfg = self.cfg
        t0 = time.perf_counter()
        lr = lr_at(self.step, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                   lr=self.lr, min_lr=cfg.min_lr)
        set_lr(self.optimizer, lr)
        loss_sum, extra, unreadable = self._accumulate(batches)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = grad_norm_(params, cfg.clip_grad)
        local_loss = loss_sum / cfg.accum_steps
        finite = torch.isfinite(local_loss)
        # [loss, processes with a non-finite loss, unreadable files, step metrics...], summed over processes
        stats = torch.stack([torch.where(finite, local_loss, 0.0), (~finite).float(),
                             torch.full((), float(len(unreadable)), device=self.device)])  # a fill, no copy
        stats = self.dist.sum_tensor(torch.cat([stats, extra]))   # + the method's step metrics, one reduction
        bad = (stats[1] > 0) | ~torch.isfinite(norm)
        skipped = self._update(bad)
        self.optimizer.zero_grad(set_to_none=True)
        messages = self._step_messages()
        self.step += 1
        self.position += 1
        self.model.after_step(self.step, self.total_steps)
        numbers = torch.cat([stats[:3], norm.reshape(1).to(stats.device, stats.dtype), bad.reshape(1).to(stats.dtype),
                             stats[3:]])
        return _QueuedStep(step=self.step, epoch=self.epoch, lr=lr, numbers=numbers, skipped=skipped,
                           unreadable=unreadable, messages=messages, t0=t0)

    def _accumulate(self, batches) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Forward and backward ``accum_steps`` micro-batches; returns (the sum of their losses,
        a 0-d device tensor; the sums of the method's step metrics, ``[len(step_metrics)]``;
        the unreadable files they met)."""
        cfg = self.cfg
        local = self.plan.local_slice() if self.dist.enabled else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        extra = torch.zeros(len(self.model.step_metrics), dtype=torch.float32, device=self.device)
        unreadable: list[str] = []
        for k in range(cfg.accum_steps):
            batch = next(batches)
            unreadable += self._new_unreadable(batch)
            mask = self._masks(batch, cfg.batch_size, self.mask_gen, local)
            sync = k == cfg.accum_steps - 1 or not self.dist.enabled
            ctx = contextlib.nullcontext() if sync else self.ddp_model.no_sync()  # type: ignore[operator]
            with ctx:
                out, _ = self._forward(self.train_forward, batch, mask)
                loss = out.loss.float() / cfg.accum_steps
                # A non-finite loss still goes through backward (every process must take
                # part in the gradient all-reduce); the step is dropped below.
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            loss_sum += out.loss.detach().float()
            for k, name in enumerate(self.model.step_metrics):
                extra[k] += out.losses[name].float()
        return loss_sum, extra, unreadable

    def _update(self, bad: torch.Tensor) -> bool | None:
        """Apply the gradients unless ``bad`` (a 0-d bool tensor); returns whether the step was
        skipped, or None when the fused optimiser decides on the device (read later)."""
        if self.scaler is not None:
            skipped = bool(bad)
            if skipped:
                self.scaler.update()  # lower the loss scale for fp16 overflow
            else:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            return skipped
        if self._fused_optimizer:
            self.optimizer.found_inf = bad.float()   # the fused kernel leaves weights and state as they were
            self.optimizer.step()
            return None
        if not bool(bad):
            self.optimizer.step()
            return False
        return True

    def _step_messages(self) -> list[str]:
        """Region-mask fallbacks and compile failures since the last step, each said once."""
        messages = []
        if self._region_fallbacks:
            messages.append(f"{self._region_fallbacks} region-guided mask(s) fell back to random (empty region)")
            self._region_fallbacks = 0
        if self._compile_messages:  # compile failed during this step: said once, training went on eagerly
            messages += self._compile_messages
            self._compile_messages.clear()
        return messages

    def _finish_step(self, q: _QueuedStep) -> dict[str, Any]:
        """Read a queued step's numbers back (a sync) and do its bookkeeping: its metrics row."""
        cfg = self.cfg
        loss_total, n_bad, n_unreadable, grad_norm, bad, *extra = q.numbers.tolist()   # one read for all
        skipped = bool(bad) if q.skipped is None else q.skipped
        unreadable = self._record_unreadable(q.unreadable, q.step) if n_unreadable else []
        loss = loss_total / self.dist.world_size if not n_bad else float("nan")
        message = None
        if skipped:
            # facebookresearch/mae#65, #167: mixed precision can produce NaN/inf; skip the update, keep going.
            self.skipped += 1
            message = f"step {q.step} skipped: non-finite {'loss' if n_bad else 'gradient norm'}"
        self._nonfinite_run = self._nonfinite_run + 1 if skipped else 0
        message = "; ".join(([message] if message else []) + q.messages + [
            f"skipped an unreadable image, another took its place: {u}" for u in unreadable]) or None
        if math.isfinite(loss):
            self.last_loss = loss
        # The step's time: until its numbers are back, from when it started or the previous
        # step's numbers came back, whichever is later (with deferred reading, the interval
        # between two steps' numbers: the throughput).
        now = time.perf_counter()
        dt = now - max(q.t0, self._finished_at or 0.0)
        self._finished_at = now
        self._t_active += dt
        # Smoothed step time; the first step (allocation, warm-up) is not representative.
        if self._step_s is None or self._reseed_step_s:
            # With compile the first step is mostly compilation (40-60 s on a small CPU): it
            # would dominate images/s and the ETA for dozens of steps.
            self._reseed_step_s = self._step_s is None and bool(getattr(self.train_forward, "active", False))
            self._step_s = dt
        else:
            self._step_s = 0.8 * self._step_s + 0.2 * dt
        return {"step": q.step, "epoch": q.epoch, "loss": loss, "val_loss": None, "lr": q.lr,
                "images_per_s": cfg.effective_batch / self._step_s if self._step_s > 0 else 0.0,
                "grad_norm": grad_norm, "skipped": self.skipped, "elapsed_s": self._elapsed_before + self._t_active,
                "message": message, "unreadable": unreadable,
                **{name: v / (cfg.accum_steps * self.dist.world_size)
                   for name, v in zip(self.model.step_metrics, extra)}}

    def _new_unreadable(self, batch: dict[str, Any]) -> list[str]:
        """Reader messages of files this batch had to skip that this process has not seen yet."""
        return [p for p in dict.fromkeys(batch.get("unreadable") or ()) if p and p not in self._unreadable]

    def _record_unreadable(self, local: list[str], step: int) -> list[str]:
        """The step's new unreadable files of every process (all of them call this together),
        each reported once per run and listed in the run folder's ``unreadable.txt``
        (headless runs keep the record)."""
        new = [p for part in self.dist.gather_objects(local) for p in part if p not in self._unreadable]
        new = list(dict.fromkeys(new))
        self._unreadable.update(new)
        if new and self.dist.is_main and self.run_dir is not None:
            try:
                with open(self.run_dir / "unreadable.txt", "a", encoding="utf-8") as fh:
                    fh.writelines(f"step {step}: {p}\n" for p in new)
            except OSError:
                pass  # the event and the CLI line still say it
        return new

    def _report(self, row: dict[str, Any]) -> None:
        eta = (self.stop_at - self.step) * (self._step_s or 0.0)
        if self.cfg.time_budget_s is not None:
            eta = min(eta, max(0.0, self.cfg.time_budget_s - self._t_active))
        if self.metrics is not None:
            self.metrics.write(row)
        self.emit(Progress(step=row["step"], total=self.stop_at, epoch=row["epoch"], loss=row["loss"],
                           lr=row["lr"], images_per_s=row["images_per_s"], eta_s=eta, val_loss=row["val_loss"],
                           skipped_steps=self.skipped, message=row["message"],
                           unreadable=tuple(row.get("unreadable") or ()),
                           metrics={name: row[name] for name in self.model.step_metrics}))
        self._plan_to_budget()
        limit = self.cfg.max_nonfinite_steps
        if limit and self._nonfinite_run >= limit:
            first = row["step"] - self._nonfinite_run + 1
            raise TrainingError(
                f"stopped: the loss or gradient was not finite for {self._nonfinite_run} steps in a row "
                f"(steps {first}-{row['step']}; max_nonfinite_steps={limit}). Lower the learning rate (blr), "
                f"set clip_grad, or turn mixed precision off (amp=off); the last checkpoint "
                f"({self.last_checkpoint or 'none yet'}) holds the weights from before")

    # ------------------------------------------------------------------ validation / preview
    @torch.no_grad()
    def _validate(self) -> float | None:
        """Mean loss on the held-back split, with masks from a fixed seed.

        Every process evaluates the whole (small) split on its own copy of the model:
        no communication, and the same number as a single process.
        """
        if self.val_ds is None or len(self.val_ds) == 0:
            return None
        t0 = time.perf_counter()
        from torch.utils.data import DataLoader

        gen = torch.Generator().manual_seed(self.cfg.seed + _VAL_SEED_OFFSET)
        B, b = self.cfg.batch_size, self.plan.local_batch
        loader = DataLoader(self.val_ds, batch_size=B, shuffle=False, num_workers=0)
        total, count = 0.0, 0
        self.model.eval()
        try:
            for batch in loader:
                n = batch["image"].shape[0]
                mask = self._masks(batch, n, gen, None, count_fallbacks=False)
                for i in range(0, n, b):
                    part = {k: (v[i:i + b] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
                    out, _ = self._forward(self.model, part, mask[i:i + b])
                    m = part["image"].shape[0]
                    total += float(out.loss.float()) * m
                    count += m
        finally:
            self.model.train()
        self._t_active += time.perf_counter() - t0
        return total / count if count else None

    @torch.no_grad()
    def _preview(self) -> None:
        if not self.dist.is_main:
            return
        t0 = time.perf_counter()
        item = self.preview_ds[0]
        batch = {k: (v[None] if isinstance(v, torch.Tensor) else torch.as_tensor([v]))
                 for k, v in item.items() if not isinstance(v, str)}
        gen = torch.Generator().manual_seed(self.cfg.seed + _PREVIEW_SEED_OFFSET)
        mask = self._masks(batch, 1, gen, None, count_fallbacks=False)
        self.model.eval()
        try:
            out, images = self._forward(self.model, batch, mask)
            r = self.model.render(out, images.float())
        finally:
            self.model.train()
        size = self.cfg.preview_size
        self.emit(Preview(
            step=self.step,
            image=_small(images, size),
            masked=_small(r.masked, size),
            reconstruction=_small(r.reconstruction, size),
            error=_small(r.error, size),
            recon_plus_visible=_small(r.recon_plus_visible, size),
            extra={label: _small(getattr(r, name), size) for name, label in METHOD_PICTURES
                   if getattr(r, name) is not None},
        ))
        self._t_active += time.perf_counter() - t0

    # ------------------------------------------------------------------ checkpoints
    def _save(self) -> None:
        if self.dist.is_main:
            t0 = time.perf_counter()
            meta = {
                "kind": "pretrain",
                "config": self.cfg.to_dict(),
                "model_config": self.model_cfg.to_dict(),
                "epoch": self.epoch,
                "sampler": {"epoch": self.epoch, "position": self.position, "seed": self.cfg.seed,
                            "n_train": self.plan.n, "steps_per_epoch": self.plan.steps_per_epoch},
                "rng": ckpt_mod.capture_rng_state(self.mask_gen),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "dataset_signature": self.data_signature,
                "schedule": {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps},
                "world_size": self.dist.world_size,
                "metrics": {"loss": self.last_loss, "val_loss": self.last_val, "skipped_steps": self.skipped,
                            "elapsed_s": self._elapsed_before + self._t_active},
            }
            path = ckpt_mod.save_checkpoint(self.run_dir, self.step, model_state=self.model.state_dict(),
                                            optimizer_state=self.optimizer.state_dict(), meta=meta,
                                            keep=self.cfg.keep_checkpoints)
            self.last_checkpoint = str(path)
            self._t_active += time.perf_counter() - t0
            self.emit(CheckpointSaved(path=str(path), step=self.step))
        self._saved_clock = time.monotonic()
        self.dist.barrier()


def _small(t: torch.Tensor, size: int) -> np.ndarray:
    """First image of a ``[B, C, H, W]`` batch as a grey float32 array, longest side <= ``size``."""
    x = t[0].detach().float().mean(dim=0, keepdim=True)[None]   # [1, 1, H, W]
    h, w = x.shape[-2:]
    f = max(1, math.ceil(max(h, w) / size))
    if f > 1:
        x = torch.nn.functional.avg_pool2d(x, f, ceil_mode=True)
    return x[0, 0].cpu().numpy().astype(np.float32)
