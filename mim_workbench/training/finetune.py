"""Classification fine-tuning of a pretrained encoder: ``finetune(config, on_event, control)``.

Two modes (:mod:`mim_workbench.models.classifier`):

``probe`` (linear probing, MAE's ``main_linprobe``)
    frozen encoder, BatchNorm(affine=False) + linear head on the pooled feature
    (the mean of the patch tokens unless ``pool="token"``).
    Without augmentation (the default in this mode) the encoder's features are
    computed once and the head trains on them: hundreds of epochs cost seconds.
``full`` (fine-tuning, MAE's ``main_finetune``)
    everything trains: global average pooling, layer-wise lr decay
    (``layer_decay``, 0.75), label smoothing (0.1), drop path (0.1), AdamW with
    weight decay 0.05, augmentation on.

Data: ``discover(data, masks)``; unlabelled images are dropped.  Splits are by
patient (:func:`~mim_workbench.io.datasets.patient_split`, ``split_seed``) into
train / val / test; then ``fraction`` of the *training* labels is kept
(:func:`~mim_workbench.training.labels.label_subset`, stratified, at least one
per class, nested and reproducible from ``seed``).  Validation and test splits do
not shrink with the fraction, so runs with different fractions and seeds are
scored on the same images.

Imbalance: ``balance="weights"`` (default) weights the loss by ``n / (K n_c)``;
``"sampler"`` draws training samples with equal class probability instead;
``"none"`` does neither.

Early stopping: after every epoch the validation loss is computed (cross-entropy,
class-weighted with the training set's ``n / (K n_c)`` unless ``balance="none"``, so
that it scores the same balanced objective as training); the best epoch's
weights are kept, and training stops after ``patience`` epochs without
improvement.  Warm-up epochs are neither kept nor counted (a barely trained head
often has the lowest loss).  Without a validation split the last epoch is kept.
At the end the kept weights are scored on the test split (the validation split
when there is no test split) and saved as a checkpoint of kind
``"finetune"`` (``model.safetensors`` with ``encoder.*`` and ``head.*``;
``meta.json`` with ``classes``, ``mode``, ``config``, ``model_config`` and the
metrics), which :func:`mim_workbench.inference.predict.predict` rebuilds.

The run directory holds ``config.json``, ``history.csv`` (one row per epoch),
``metrics.json`` and ``ckpt-<step>/`` + ``latest``.  Events and control are those of
``pretrain``: Started, Progress (one per optimiser step; ``val_loss`` on the step
closing an epoch), CheckpointSaved, Finished (reason ``completed``,
``early_stopped``, ``stopped``, ``time_budget`` or ``max_steps``), Failed.

Until the plan is done (completed or early-stopped) the run directory also holds
``resume.safetensors``, the loop's state at a finished epoch: a stopped, limited or
crashed run continues from there with ``resume=True`` (:mod:`.finetune_state`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import random
import time
import traceback
from dataclasses import dataclass, field
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, MimError
from ..io.meta import json_safe
from .control import Control, NullControl
from .events import CheckpointSaved, EventHandler, Failed, Finished, Progress, Started, null_handler
from ..models.checkpoint import restore_rng_state
from ..models.classifier import FINETUNE_KIND
from .config import FinetuneConfig, saved_finetune_values
from .finetune_state import LoopState, load_state, remove_state, restore_loop, save_state

if TYPE_CHECKING:
    from ..io.samples import Sample
    from .mim_dataset import MIMDataset

@dataclass
class FinetuneResult:
    run_dir: str
    checkpoint: str | None
    metrics: dict[str, Any]                # on ``eval_split``
    eval_split: str                        # "test" (or "val" when there is no test split)
    val_metrics: dict[str, Any] | None
    classes: list[str]
    reason: str
    best_epoch: int | None
    epochs_run: int
    n_train: int
    n_val: int
    n_test: int
    history: list[dict[str, Any]] = field(default_factory=list)   # one row per epoch
    notes: list[str] = field(default_factory=list)
    external_metrics: dict[str, Any] | None = None   # on ``test_data``, when given
    #: per scored set ("test", "val", "external"): {"ids": [...], "labels": [n], "probs": [n, K]}
    predictions: dict[str, dict[str, Any]] = field(default_factory=dict)


def _feature_key(sample: Sample) -> str:
    """Features are cached by image file: ids of two data sets (labelled, external) may clash."""
    return str(sample.image)


class FeatureCache:
    """Frozen-encoder features by image file, shared by probe runs on one encoder (a study).

    ``key`` names the encoder; a run with another key empties the cache first.
    """

    def __init__(self) -> None:
        self.key: str | None = None
        self.features: dict[str, torch.Tensor] = {}

    def bind(self, key: str) -> None:
        """Use the cache for encoder ``key``, dropping features stored for another key."""
        if key != self.key:
            self.key, self.features = key, {}


def finetune(config: FinetuneConfig, on_event: EventHandler | None = None, control: Control | None = None,
             *, feature_cache: FeatureCache | None = None) -> FinetuneResult:
    """Fine-tune or linear-probe a classifier as ``config`` says (see the module docstring).

    Raises MimError subclasses for problems the user can fix; a Failed event is
    emitted before any exception propagates.
    """
    emit = on_event or null_handler
    control = control or NullControl()
    run: _Finetune | None = None
    try:
        run = _Finetune(config, emit, control, feature_cache)
        return run.run()
    except BaseException as exc:
        err: BaseException = exc
        if isinstance(exc, torch.OutOfMemoryError):
            err = ConfigError(f"out of memory with batch_size={config.batch_size}: lower the batch size")
        msg = "interrupted" if isinstance(err, KeyboardInterrupt) else (
            str(err) if isinstance(err, MimError) else f"{type(err).__name__}: {err}")
        try:
            emit(Failed(message=msg, run_dir=config.out, last_checkpoint=run.checkpoint if run else None,
                        traceback=None if isinstance(err, (MimError, KeyboardInterrupt)) else traceback.format_exc()))
        except Exception:
            pass
        if err is not exc:
            raise err from exc
        raise


class _Finetune:
    def __init__(self, config: FinetuneConfig, emit: EventHandler, control: Control,
                 feature_cache: FeatureCache | None) -> None:
        from .config import require_data_and_out
        from .runtime import prepare_device, resolve_amp

        cfg = config.resolved()
        require_data_and_out(cfg)
        self.cfg = cfg
        self.emit = emit
        self.control = control
        self.cache = feature_cache
        self.checkpoint: str | None = None
        self.notes: list[str] = []
        self.external_metrics: dict[str, Any] | None = None
        self.predictions: dict[str, dict[str, Any]] = {}
        self.run_dir = Path(cfg.out).expanduser()
        from ..models.checkpoint import list_checkpoints

        if list_checkpoints(self.run_dir) and not cfg.resume:
            raise ConfigError(f"out={str(self.run_dir)!r} already holds a run (checkpoints found); "
                              "choose another --out")
        if cfg.mode == "probe" and cfg.batch_size < 2:
            raise ConfigError("batch_size=1: the linear probe's BatchNorm needs batches of at least 2")
        self.device = prepare_device(cfg.device, threads=cfg.threads)
        self.amp_dtype, amp_notes = resolve_amp(cfg.amp, self.device)
        self.notes += amp_notes
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)
        self._setup_data()
        self._setup_model()

    # ------------------------------------------------------------------ data
    def _setup_data(self) -> None:
        from ..io.datasets import discover, patient_split
        from .labels import external_set, label_subset

        cfg = self.cfg
        index = discover(cfg.data, masks=cfg.masks)
        self.notes += list(index.notes)
        samples = [s for s in index.samples if s.label is not None]
        if len(samples) < len(index.samples):
            self.notes.append(f"{len(index.samples) - len(samples)} unlabelled image(s) left out")
        if cfg.exclude_ids:
            ex = set(cfg.exclude_ids)
            samples = [s for s in samples if s.id not in ex]
        classes = sorted({str(s.label) for s in samples})
        if len(classes) < 2:
            raise ConfigError(f"data={cfg.data!r}: fine-tuning needs at least two classes, found "
                              f"{len(classes)} ({', '.join(classes) or 'no labels'}); labels come from class folders, "
                              "a labels.csv or a manifest's label column")
        self.classes = classes
        splits = patient_split(samples, val=cfg.val_fraction, test=cfg.test_fraction, seed=cfg.split_seed)
        full_train = splits["train"]
        self.train_samples = label_subset(full_train, cfg.fraction, cfg.seed)
        self.val_samples = list(splits["val"])
        self.test_samples = list(splits["test"])
        seen = {s.label for s in self.train_samples}
        lost = [c for c in classes if c not in seen]
        if lost:
            self.notes.append(f"class(es) without training samples after the patient split: {', '.join(lost)}")
        self.notes.append(f"labels: {len(self.train_samples)} of {len(full_train)} training images "
                          f"(fraction {cfg.fraction:g}, seed {cfg.seed}); val {len(self.val_samples)}, "
                          f"test {len(self.test_samples)} images")
        if not self.val_samples:
            self.notes.append("no validation split: no early stopping, the last epoch is kept")
        self.external_samples = external_set(cfg.test_data, classes) if cfg.test_data else []

    # ------------------------------------------------------------------ model
    def _setup_model(self) -> None:
        from ..models.classifier import Classifier
        from .encoder_source import is_random_source, load_encoder

        cfg = self.cfg
        drop_path = cfg.drop_path if cfg.mode == "full" else 0.0
        given = cfg.model_config() if is_random_source(cfg.checkpoint) else None
        self.loaded = load_encoder(cfg.checkpoint, model_config=given, img_size=cfg.img_size,
                                   drop_path_rate=drop_path)
        self.notes += self.loaded.notes
        self.model_cfg = self.loaded.model_config
        model = Classifier(self.loaded.encoder, len(self.classes), cfg.mode, dropout=cfg.dropout, pool=cfg.pool)
        self.model = model.to(self.device)
        self.n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.use_features = cfg.mode == "probe" and not cfg.augment
        # Frozen features are computed once per image; images decoded every epoch are cached.
        from ..io.cache import cache_for

        samples = self.train_samples + self.val_samples + self.test_samples
        self.decode_cache, note = cache_for(
            False if self.use_features else cfg.cache, len(samples), self.model_cfg.encoder.img_size,
            channels=3 if self.model_cfg.encoder.in_chans == 3 else 1, fine_scale=None,
            region=any(s.mask is not None for s in samples))
        if note:
            self.notes.append(note)

    def _dataset(self, samples: list[Sample], augment: bool):
        from .mim_dataset import MIMDataset

        return MIMDataset(samples, img_size=self.model_cfg.encoder.img_size, in_chans=self.model_cfg.encoder.in_chans,
                          augment=augment, seed=self.cfg.seed, classes=self.classes, cache=self.decode_cache)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of what training changes (the frozen encoder of a probe is left out)."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()
                if self.cfg.mode == "full" or not k.startswith("encoder.")}

    def _loader(self, batches: list[list[int]]):
        from torch.utils.data import DataLoader

        return DataLoader(self.train_ds, batch_sampler=batches, num_workers=self.cfg.num_workers,
                          pin_memory=self.device.type == "cuda")

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @torch.no_grad()
    def _features(self, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled frozen-encoder features ``[n, D]`` and labels ``[n]`` (cached by sample id)."""
        from torch.utils.data import DataLoader

        # A random encoder is drawn from the run's seed: its features are that seed's only.
        source = f"random seed {self.cfg.seed}" if self.loaded.kind == "random" else self.loaded.source
        key = f"{source}|{self.model.pool}|{json.dumps(self.model_cfg.to_dict(), sort_keys=True)}"
        if self.cache is not None:
            self.cache.bind(key)
        store = self.cache.features if self.cache is not None else {}
        todo = [i for i, s in enumerate(samples) if _feature_key(s) not in store]
        if todo:
            ds = self._dataset([samples[i] for i in todo], augment=False)
            loader = DataLoader(ds, batch_size=self.cfg.batch_size, shuffle=False, num_workers=self.cfg.num_workers)
            self.model.eval()
            pos = 0
            for batch in loader:
                with self._autocast():
                    f = self.model.features(batch["image"].to(self.device)).float().cpu()
                for row in f:
                    store[_feature_key(samples[todo[pos]])] = row
                    pos += 1
        label_of = {c: k for k, c in enumerate(self.classes)}
        feats = torch.stack([store[_feature_key(s)] for s in samples]) if samples else torch.zeros(0, self.model.encoder.embed_dim)
        labels = torch.tensor([label_of[str(s.label)] for s in samples], dtype=torch.int64)
        return feats, labels

    # ------------------------------------------------------------------ run
    def run(self) -> FinetuneResult:
        """Train as planned, score the kept weights and save them; events as the module says."""
        setup_s = self._prepare_data()
        optimizer, scaler = self._build_optimiser()
        st = self._restore(optimizer, scaler)
        if self.cfg.head_init == "probe" and self.cfg.mode == "full" and st.step == 0:
            self._fit_head_on_frozen_features()
        self._announce(setup_s)
        reason = self._train_epochs(st, optimizer, scaler)
        return self._finish(st, reason)

    def _fit_head_on_frozen_features(self) -> None:
        """LP-FT (Kumar et al., ICLR 2022): start full fine-tuning from a logistic-regression head
        fitted on the pretrained encoder's frozen features, so that the first updates do not
        reshape the features to suit a random head."""
        from sklearn.linear_model import LogisticRegression

        feats, labels = self._features(self.train_samples)
        if len(set(labels.tolist())) < 2:
            self.notes.append("head_init=probe: the training images hold one class only; the head starts random")
            return
        weight = "balanced" if self.cfg.balance != "none" else None
        fit = LogisticRegression(max_iter=1000, class_weight=weight).fit(feats.numpy(), labels.numpy())
        coef = torch.as_tensor(fit.coef_, dtype=torch.float32)
        bias = torch.as_tensor(fit.intercept_, dtype=torch.float32)
        if coef.shape[0] == 1:   # binary: sklearn's one logit is the second class's against the first's
            coef, bias = torch.cat([torch.zeros_like(coef), coef]), torch.cat([torch.zeros_like(bias), bias])
        present = torch.as_tensor(fit.classes_)
        with torch.no_grad():
            self.model.head.weight.zero_()
            self.model.head.bias.zero_()
            self.model.head.weight[present] = coef.to(self.model.head.weight)
            self.model.head.bias[present] = bias.to(self.model.head.bias)
        self.notes.append(f"head_init=probe: the head starts as a logistic regression on the frozen features of "
                          f"{len(self.train_samples)} training images")

    def _prepare_data(self) -> float:
        """Loss weights, the splits' data (frozen features or datasets) and the step plan.

        Returns the seconds spent building the data (feature extraction in a probe)."""
        from .labels import class_counts, class_weights
        from .sampler import StepPlan

        cfg = self.cfg
        label_of = {c: k for k, c in enumerate(self.classes)}
        self.train_labels = [label_of[str(s.label)] for s in self.train_samples]
        counts = class_counts(self.train_labels, len(self.classes))
        self.loss_weight = class_weights(counts).to(self.device) if cfg.balance == "weights" else None
        # Validation scores the objective training pursues: class-balanced unless balance="none".
        self.val_weight = class_weights(counts).numpy() if cfg.balance != "none" else None
        t_setup = time.perf_counter()
        if self.use_features:
            self.train_data = self._features(self.train_samples)
            self.val_data = self._features(self.val_samples) if self.val_samples else None
            self.test_data = self._features(self.test_samples) if self.test_samples else None
            self.external_data = self._features(self.external_samples) if self.external_samples else None
        else:
            self.train_ds = self._dataset(self.train_samples, augment=bool(cfg.augment))
            self.val_data = self._dataset(self.val_samples, augment=False) if self.val_samples else None
            self.test_data = self._dataset(self.test_samples, augment=False) if self.test_samples else None
            self.external_data = self._dataset(self.external_samples, augment=False) if self.external_samples else None
        setup_s = time.perf_counter() - t_setup
        self.plan = StepPlan(n=len(self.train_samples), batch_size=cfg.batch_size, accum_steps=1, seed=cfg.seed)
        self.spe = self.plan.steps_per_epoch
        self.total = cfg.epochs * self.spe
        self.stop_at = min(self.total, cfg.max_steps) if cfg.max_steps else self.total
        self.warmup = min(self.total, int(round(cfg.warmup_epochs * self.spe)))
        return setup_s

    def _build_optimiser(self) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler | None]:
        """AdamW (layer-wise lr decay in full mode) and a GradScaler when training in fp16."""
        from .lr_decay import param_groups_lrd
        from .optim import build_optimizer

        cfg = self.cfg
        if cfg.mode == "full":
            groups = param_groups_lrd(self.model, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay)
            optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))
        else:
            optimizer = build_optimizer(self.model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
        scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        return optimizer, scaler

    def _restore(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> LoopState:
        """A fresh loop state, or with ``resume`` the saved one (model, optimiser and RNGs restored).

        Raises ConfigError when the saved run has already used up its steps or time budget."""
        from .optim import load_optimizer_state

        cfg = self.cfg
        if not cfg.resume:
            return LoopState()
        payload = load_state(self.run_dir, cfg.to_dict(), [s.id for s in self.train_samples],
                             read_settings=lambda saved: FinetuneConfig.from_dict(saved_finetune_values(saved)).to_dict())
        st = restore_loop(payload)
        self.model.load_state_dict(payload["model"], strict=cfg.mode == "full")
        load_optimizer_state(optimizer, payload["optimizer"])
        if scaler is not None and payload["scaler"] is not None:
            scaler.load_state_dict(payload["scaler"])
        restore_rng_state(payload["rng"])
        if st.step >= self.stop_at:
            raise ConfigError(f"resume: the run already reached step {st.step} of {self.stop_at}"
                              + (f" (max_steps={cfg.max_steps}: raise or unset it)" if cfg.max_steps else ""))
        if cfg.time_budget_s is not None and st.t_active >= cfg.time_budget_s:
            raise ConfigError(f"resume: the run already trained {st.t_active:.0f} s, its time budget "
                              f"(time_budget_s={cfg.time_budget_s:g}): raise or unset it")
        self.notes.append(f"resumed at epoch {st.epoch + 1} (step {st.step})")
        return st

    def _announce(self, setup_s: float) -> None:
        """Write ``config.json`` and emit Started."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(
            json.dumps({**cfg.to_dict(), "resume": False}, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if setup_s > 1.0 and self.use_features:
            self.notes.append(f"frozen features computed in {setup_s:.1f} s")
        self.emit(Started(run_dir=str(self.run_dir), config={**cfg.to_dict(), "task": "finetune",
                                                             "classes": self.classes},
                          total_steps=self.total, device=str(self.device), steps_per_epoch=self.spe,
                          n_train=len(self.train_samples), n_val=len(self.val_samples), n_params=self.n_params,
                          lr=cfg.lr, stop_at=self.stop_at,
                          amp={torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp_dtype, "off"),
                          notes=tuple(self.notes)))

    def _train_epochs(self, st: LoopState, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler | None) -> str:
        """Run epochs until the plan, a limit, patience or the user ends them; returns Finished's reason."""
        cfg = self.cfg
        self._step_s: float | None = None
        self._saved_clock: float | None = None
        while st.epoch < cfg.epochs and st.step < self.stop_at:
            epoch = st.epoch
            stop_reason = self._epoch(st, epoch, optimizer, scaler)
            if stop_reason is not None:
                return stop_reason
            st.epoch = epoch + 1
            if cfg.patience and st.bad_epochs >= cfg.patience and self.val_data is not None:
                return "early_stopped"
        return "max_steps" if st.step >= self.stop_at and self.stop_at < self.total else "completed"

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's training indices, one list per optimiser step."""
        from .labels import balanced_indices
        from .sampler import epoch_seed

        cfg = self.cfg
        if cfg.balance == "sampler":
            g = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch))
            order = balanced_indices(self.train_labels, self.spe * cfg.batch_size, g)
        else:
            order = self.plan.epoch_order(epoch)
        return [order[b * cfg.batch_size:(b + 1) * cfg.batch_size].tolist() for b in range(self.spe)]

    def _interrupt(self, st: LoopState) -> str | None:
        """Wait while paused; the reason to stop now ("stopped", "time_budget") or None."""
        if self.control.pause_requested() and not self.control.stop_requested():
            while self.control.pause_requested() and not self.control.stop_requested():
                time.sleep(0.05)
        if self.control.stop_requested():
            return "stopped"
        if self.cfg.time_budget_s is not None and st.t_active >= self.cfg.time_budget_s:
            return "time_budget"
        return None

    def _epoch(self, st: LoopState, epoch: int, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None) -> str | None:
        """One epoch of optimiser steps, each followed by a Progress event; the last one closes
        the epoch (validation, history, best weights, resume state).  Returns a stop reason or None."""
        from .lr_decay import set_scaled_lr
        from .optim import lr_at

        cfg = self.cfg
        if not self.use_features:
            self.train_ds.set_epoch(epoch)
        batches = self._epoch_batches(epoch)
        self.model.train()
        losses: list[float] = []
        loader = None if self.use_features else iter(self._loader(batches))
        for b, idx in enumerate(batches):
            if st.step >= self.stop_at:
                break
            stop_reason = self._interrupt(st)
            if stop_reason is not None:
                return stop_reason
            t0 = time.perf_counter()
            lr = lr_at(st.step, total_steps=self.total, warmup_steps=self.warmup, lr=cfg.lr,
                       min_lr=min(cfg.min_lr, cfg.lr))
            set_scaled_lr(optimizer, lr)
            lv = self._optimiser_step(idx, loader, optimizer, scaler)
            if math.isfinite(lv):
                losses.append(lv)
            st.step += 1
            dt = time.perf_counter() - t0
            st.t_active += dt
            self._step_s = step_s = dt if self._step_s is None else 0.8 * self._step_s + 0.2 * dt
            closes = b == self.spe - 1
            val_loss, val_acc = self._val_loss() if closes else (None, None)
            self.emit(Progress(step=st.step, total=self.stop_at, epoch=epoch, loss=lv, lr=lr,
                               images_per_s=len(idx) / step_s if step_s else 0.0,
                               eta_s=(self.stop_at - st.step) * (step_s or 0.0), val_loss=val_loss,
                               message=None if math.isfinite(lv) else f"step {st.step} skipped: non-finite loss"))
            if closes:
                self._close_epoch(st, epoch, losses, lr, val_loss, val_acc, optimizer, scaler)
        return None

    def _optimiser_step(self, idx: list[int], loader: Iterator[dict] | None, optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler | None) -> float:
        """Forward and backward one batch (``idx`` into the training features, or the loader's next
        batch); returns the loss, and skips the update when it is not finite."""
        cfg = self.cfg
        if self.use_features:
            train_x, train_y = self.train_data
            x, y = train_x[idx].to(self.device), train_y[idx].to(self.device)
            with self._autocast():
                logits = self.model.logits_from_features(x)
        else:
            batch = next(loader)
            x = batch["image"].to(self.device, non_blocking=True)
            y = batch["label"].to(self.device, non_blocking=True)
            with self._autocast():
                logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y, weight=self.loss_weight, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        lv = float(loss.detach())
        if math.isfinite(lv):
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
        return lv

    def _close_epoch(self, st: LoopState, epoch: int, losses: list[float], lr: float, val_loss: float | None,
                     val_acc: float | None, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler | None) -> None:
        """Record the epoch, keep its weights when validation improved, and write the resume state."""
        cfg = self.cfg
        st.history.append({"epoch": epoch, "step": st.step,
                           "loss": float(np.mean(losses)) if losses else None, "val_loss": val_loss,
                           "val_accuracy": val_acc, "lr": lr, "elapsed_s": st.t_active})
        # Epochs still warming up are neither kept as "best" nor counted towards patience
        # (an almost untrained head often has the lowest validation loss).
        first_candidate = max(0, math.ceil(cfg.warmup_epochs) - 1)
        if val_loss is None or epoch < first_candidate:
            pass
        elif val_loss < st.best_loss - 1e-6:
            st.best_loss, st.best_epoch, st.best_step, st.bad_epochs = val_loss, epoch, st.step, 0
            st.best_state = self._snapshot()
        else:
            st.bad_epochs += 1
        st.epoch = epoch + 1
        # Few labels make epochs of seconds: the state (a full model, twice, and the
        # optimiser) is written at the first epoch end, then at most every interval.
        if self._saved_clock is None or time.monotonic() - self._saved_clock >= cfg.checkpoint_interval_s:
            save_state(self.run_dir, st, config=cfg.to_dict(), train_ids=[s.id for s in self.train_samples],
                       model_state=self._snapshot(), optimizer=optimizer, scaler=scaler)
            self._saved_clock = time.monotonic()

    def _finish(self, st: LoopState, reason: str) -> FinetuneResult:
        """Load the kept weights, score them, save the checkpoint and ``metrics.json``; emit
        CheckpointSaved and Finished."""
        cfg = self.cfg
        step, history, best_epoch, best_step = st.step, st.history, st.best_epoch, st.best_step
        if st.best_state is not None:
            self.model.load_state_dict(st.best_state, strict=cfg.mode == "full")
        else:
            best_step = step
            best_epoch = history[-1]["epoch"] if history else None
        metrics, eval_split, val_metrics = self._final_metrics()
        self._write_history(history)
        self._write_predictions()
        path = self._save_model(max(1, best_step), best_epoch, metrics, val_metrics)
        summary = {
            "accuracy": metrics.get("accuracy"), "auc": metrics.get("auc"), "ap": metrics.get("ap"),
            "balanced_accuracy": metrics.get("balanced_accuracy"), "split": eval_split, "metrics": metrics,
            "val_metrics": val_metrics, "classes": self.classes, "mode": cfg.mode, "fraction": cfg.fraction,
            "seed": cfg.seed, "n_train": len(self.train_samples), "n_val": len(self.val_samples),
            "n_test": len(self.test_samples), "best_epoch": best_epoch, "epochs_run": len(history),
            "reason": reason, "checkpoint": str(path), "encoder": self.loaded.describe(), "notes": self.notes,
            "external": self.external_metrics, "n_external": len(self.external_samples),
        }
        (self.run_dir / "metrics.json").write_text(json.dumps(json_safe(summary), indent=2) + "\n", encoding="utf-8")
        if reason in ("completed", "early_stopped"):
            remove_state(self.run_dir)   # the plan is done: nothing to continue
        self.emit(Finished(run_dir=str(self.run_dir), step=step, last_checkpoint=str(path), reason=reason))
        return FinetuneResult(run_dir=str(self.run_dir), checkpoint=str(path), metrics=metrics, eval_split=eval_split,
                              val_metrics=val_metrics, classes=self.classes, reason=reason, best_epoch=best_epoch,
                              epochs_run=len(history), n_train=len(self.train_samples),
                              n_val=len(self.val_samples), n_test=len(self.test_samples), history=history,
                              notes=list(self.notes), external_metrics=self.external_metrics,
                              predictions=dict(self.predictions))

    def _final_metrics(self) -> tuple[dict[str, Any], str, dict[str, Any] | None]:
        """(metrics with their ``split``, that split's name, validation metrics or None) of the
        current weights: on the test split, else the validation split, else the training images."""
        self.model.eval()
        val_metrics = self._score(self.val_data, "val") if self.val_data is not None else None
        if self.external_data is not None:
            self.external_metrics = self._score(self.external_data, "external")
        if self.test_data is not None:
            metrics, eval_split = self._score(self.test_data, "test"), "test"
        elif val_metrics is not None:
            metrics, eval_split = val_metrics, "val"
            self.notes.append("no test split: metrics are on the validation split (used for early stopping)")
        else:
            metrics, eval_split = self._score(self.train_data if self.use_features else
                                              self._dataset(self.train_samples, augment=False)), "train"
            self.notes.append("no validation or test split: metrics are on the training images")
        return {**metrics, "split": eval_split}, eval_split, val_metrics

    def _save_model(self, step: int, best_epoch: int | None, metrics: dict[str, Any],
                    val_metrics: dict[str, Any] | None) -> Path:
        """Save the model as a ``finetune`` checkpoint at ``step`` and emit CheckpointSaved."""
        from ..models.checkpoint import save_checkpoint

        cfg = self.cfg
        ckpt_meta = {
            "kind": FINETUNE_KIND, "classes": self.classes, "mode": cfg.mode, "config": cfg.to_dict(),
            "model_config": self.model_cfg.to_dict(), "encoder_source": self.loaded.describe(),
            "epoch": best_epoch or 0, "metrics": metrics, "val_metrics": val_metrics,
            "splits": {"train": [s.id for s in self.train_samples], "val": [s.id for s in self.val_samples],
                       "test": [s.id for s in self.test_samples]},
        }
        # keep=1: a resumed run's model supersedes the one written before it was stopped.
        path = save_checkpoint(self.run_dir, step, model_state=self.model.state_dict(),
                               optimizer_state=None, meta=ckpt_meta, keep=1)
        self.checkpoint = str(path)
        self.emit(CheckpointSaved(path=str(path), step=step))
        return path

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _predict(self, data: tuple[torch.Tensor, torch.Tensor] | MIMDataset) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities [n, K], labels [n]) for cached features or an image dataset."""
        from torch.utils.data import DataLoader

        was = self.model.training
        self.model.eval()
        try:
            if isinstance(data, tuple):
                x, y = data
                with self._autocast():
                    logits = self.model.logits_from_features(x.to(self.device)).float()
                return logits.softmax(-1).cpu().numpy(), y.numpy()
            probs, labels = [], []
            for batch in DataLoader(data, batch_size=self.cfg.batch_size, shuffle=False,
                                    num_workers=self.cfg.num_workers):
                with self._autocast():
                    logits = self.model(batch["image"].to(self.device)).float()
                probs.append(logits.softmax(-1).cpu().numpy())
                labels.append(batch["label"].numpy())
            return np.concatenate(probs), np.concatenate(labels)
        finally:
            self.model.train(was)

    def _val_loss(self) -> tuple[float | None, float | None]:
        """Validation cross-entropy (class-weighted like training, see ``val_weight``) and accuracy."""
        if self.val_data is None:
            return None, None
        probs, labels = self._predict(self.val_data)
        nll = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0))
        w = self.val_weight[labels] if self.val_weight is not None else np.ones(len(labels))
        loss = float((w * nll).sum() / w.sum()) if w.sum() > 0 else float(nll.mean())
        return loss, float((probs.argmax(1) == labels).mean())

    def _score(self, data: tuple[torch.Tensor, torch.Tensor] | MIMDataset,
               split: str | None = None) -> dict[str, Any]:
        """Metrics of the current weights on ``data``; with ``split``, its per-image predictions are kept."""
        from .class_metrics import classification_metrics

        probs, labels = self._predict(data)
        if split is not None:
            samples = {"val": self.val_samples, "test": self.test_samples, "external": self.external_samples}[split]
            self.predictions[split] = {"ids": [s.id for s in samples], "labels": labels, "probs": probs}
        return classification_metrics(labels, probs, self.classes, positive=self.cfg.positive_class)

    def _write_predictions(self) -> None:
        """``predictions.csv``: one row per scored image (split, id, label, a probability per class)."""
        cols = ["split", "id", "label"] + [f"p_{c}" for c in self.classes]
        with open(self.run_dir / "predictions.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(cols)
            for split, rec in self.predictions.items():
                for i, y, p in zip(rec["ids"], rec["labels"], rec["probs"]):
                    w.writerow([split, i, self.classes[int(y)], *(f"{v:.6g}" for v in p)])

    def _write_history(self, history: list[dict[str, Any]]) -> None:
        cols = ["epoch", "step", "loss", "val_loss", "val_accuracy", "lr", "elapsed_s"]
        with open(self.run_dir / "history.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for row in history:
                w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in cols})


__all__ = ["FINETUNE_KIND", "FeatureCache", "FinetuneConfig", "FinetuneResult", "finetune"]
