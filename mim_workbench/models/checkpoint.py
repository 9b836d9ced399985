"""Checkpoints as directories of safetensors + JSON, written atomically.  No pickle.

Layout of a run directory::

    run/
      config.json
      metrics.csv
      ckpt-120/ model.safetensors  optim.safetensors  meta.json
      ckpt-240/ ...
      latest            <- text file: "ckpt-240"

A checkpoint is first written to a hidden temporary directory inside the run
directory (same file system, so the final ``rename`` is atomic), every file is
fsynced, then the directory is renamed into place, and only then is ``latest``
replaced (itself through a temporary file + ``os.replace``).  A crash at any point
leaves either the old or the new checkpoint complete, never a half-written one
that ``latest`` names.  ``latest`` is a text file rather than a symlink because
symlinks need privileges on Windows.

``meta.json`` holds everything that is not a tensor: config, step, epoch, sampler
position, RNG states (byte states base64-encoded), versions and a dataset signature.
The optimiser state is flattened: its tensors go into ``optim.safetensors`` under
``state.<param index>.<name>`` and the rest (param groups, scalar state) into that
file's JSON metadata.

Training writes checkpoints; inference and :class:`~mim_workbench.models.dense.DenseHead`
read them too, so the format lives here, below both.
"""

from __future__ import annotations

import base64
import json
import os
import platform
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, CheckpointWriteError, summary_line
from ..faults import fault_point

SCHEMA_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optim.safetensors"
META_FILE = "meta.json"
LATEST_FILE = "latest"
CKPT_PREFIX = "ckpt-"
_TMP_PREFIX = ".tmp-ckpt-"
_CKPT_RE = re.compile(r"^ckpt-(\d+)$")
LEGACY_SUFFIXES = (".pth", ".pt", ".bin")


# ====================================================================== reading
@dataclass
class Checkpoint:
    """A complete checkpoint on disk; tensors are read lazily."""

    path: Path                 # the ckpt-<step> directory (or the legacy .pth file)
    meta: dict[str, Any]

    @property
    def kind(self) -> str:
        """``"pretrain"``, ``"finetune"``, ``"dense"``, or ``"legacy"`` for a bare weights file ("" if unset)."""
        return str(self.meta.get("kind", ""))

    @property
    def step(self) -> int:
        """Optimiser steps taken when the checkpoint was saved (0 for a legacy file)."""
        return int(self.meta.get("step", 0))

    @property
    def epoch(self) -> int:
        """Epoch recorded in the metadata (0 when absent)."""
        return int(self.meta.get("epoch", 0))

    @property
    def config(self) -> dict[str, Any]:
        """A copy of the run's settings as saved (empty when absent)."""
        return dict(self.meta.get("config") or {})

    @property
    def model_config(self) -> dict[str, Any]:
        """A copy of the saved model settings, as ``ModelConfig.from_dict`` reads them (empty when absent)."""
        return dict(self.meta.get("model_config") or {})

    @property
    def run_dir(self) -> Path:
        """The run directory holding this checkpoint (a legacy file's folder)."""
        return self.path.parent

    @property
    def is_legacy(self) -> bool:
        """True for a bare weights file (``.pth``) with no metadata."""
        return self.kind == "legacy"

    def model_state(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The model's state dict, read now onto ``device`` (a legacy file's onto the CPU).  Raises
        CheckpointError for unreadable weights."""
        if self.is_legacy:
            return _load_legacy_state(self.path)
        from safetensors.torch import load_file

        try:
            return load_file(str(self.path / MODEL_FILE), device=str(device))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{self.path / MODEL_FILE}: cannot read model weights: {exc}") from None

    def optimizer_state(self) -> dict[str, Any] | None:
        """The optimiser ``state_dict`` (None when the checkpoint holds none)."""
        f = self.path / OPTIM_FILE
        if self.is_legacy or not f.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            rest = json.loads(meta["optim"])
        except Exception as exc:
            raise CheckpointError(f"{f}: cannot read optimiser state: {exc}") from None
        return unflatten_optimizer_state(tensors, rest)


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """Map what a user may pass to the checkpoint directory it means.

    Accepts the ``ckpt-<step>`` directory, any file inside it, the run directory
    (-> the checkpoint ``latest`` names, or the newest complete one when ``latest``
    is missing or stale) or the ``latest`` file itself.  Legacy weight files
    (``.pth``) are returned unchanged.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint (file or directory not found)")
    if p.is_file():
        if p.name == LATEST_FILE:
            return _from_run_dir(p.parent)
        if p.suffix.lower() in LEGACY_SUFFIXES:
            return p
        if (p.parent / META_FILE).exists() or p.name in (MODEL_FILE, OPTIM_FILE, META_FILE):
            return p.parent
        raise CheckpointError(
            f"{p}: not a checkpoint (expected a {CKPT_PREFIX}<step> directory, a file inside one, "
            "or a run directory); an exported encoder is used with --init instead"
        )
    if (p / META_FILE).exists() or (p / MODEL_FILE).exists():
        return p
    return _from_run_dir(p)


def _from_run_dir(run_dir: Path) -> Path:
    named = read_latest(run_dir)
    if named is not None and _is_complete(named):
        return named
    found = [c for c in list_checkpoints(run_dir) if _is_complete(c)]
    if found:
        return found[-1]
    raise CheckpointError(f"{run_dir}: no complete checkpoint in this directory")


def load_checkpoint(path: str | Path, *, kind: str | None = None) -> Checkpoint:
    """Open a checkpoint (see ``resolve_checkpoint_dir`` for accepted paths).

    ``kind`` ("pretrain", ...) rejects checkpoints of another kind.  Raises
    CheckpointError for anything missing, incomplete or unreadable.
    """
    d = resolve_checkpoint_dir(path)
    if d.is_file():  # legacy weights: only plain tensors, via torch.load(weights_only=True)
        ckpt = Checkpoint(path=d, meta={"kind": "legacy", "schema_version": 0, "step": 0})
        if kind is not None and kind != "legacy":
            raise CheckpointError(
                f"{d}: a bare weights file, not a {kind} checkpoint; pass it as --init to start from it"
            )
        return ckpt
    meta_path = d / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{d}: incomplete checkpoint ({META_FILE} missing)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: unreadable checkpoint metadata ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("kind"), str) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{meta_path}: not checkpoint metadata (kind/step missing)")
    version = meta.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise CheckpointError(
            f"{meta_path}: checkpoint schema version {version!r} is not supported by this "
            f"version of mim-workbench (reads up to {SCHEMA_VERSION}); upgrade mim-workbench"
        )
    _check_meta_types(meta, meta_path)
    if not (d / MODEL_FILE).is_file():
        raise CheckpointError(f"{d}: incomplete checkpoint ({MODEL_FILE} missing)")
    if kind is not None and meta["kind"] != kind:
        raise CheckpointError(f"{d}: a {meta['kind']!r} checkpoint, expected {kind!r}")
    return Checkpoint(path=d, meta=meta)


# Types of the meta.json keys every kind shares; kinds may add keys of their own.  A
# checkpoint may come from someone else: a wrong type must be named here, not surface
# as a TypeError deep inside resume.
_META_TYPES: dict[str, tuple[type, ...]] = {
    "kind": (str,), "step": (int,), "epoch": (int,), "schema_version": (int,), "world_size": (int,),
    "config": (dict,), "model_config": (dict,), "sampler": (dict,), "rng": (dict,), "metrics": (dict,),
    "versions": (dict,), "scaler": (dict, type(None)), "dataset_signature": (str, type(None)),
    "saved_at": (str,),
}


def _check_meta_types(meta: dict[str, Any], meta_path: Path) -> None:
    for key, types in _META_TYPES.items():
        if key not in meta:
            continue
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise CheckpointError(f"{meta_path}: {key}={value!r} should be {names}")
    if meta["step"] < 0:
        raise CheckpointError(f"{meta_path}: step={meta['step']!r} should be >= 0")


def _load_legacy_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses anything that would need pickle code
        raise CheckpointError(f"{path}: not a plain-tensor weights file ({summary_line(exc)})") from None
    # Reference MAE / timm training scripts nest the weights under "model" or "state_dict".
    for key in ("model", "state_dict", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors")
    return dict(obj)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """``ckpt-<step>`` directories in ``run_dir``, oldest step first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def read_latest(run_dir: str | Path) -> Path | None:
    """The ``ckpt-<step>`` path ``run_dir/latest`` names (not checked to exist), or None when the file is
    missing, unreadable or does not hold such a name."""
    f = Path(run_dir) / LATEST_FILE
    try:
        name = f.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    if not _CKPT_RE.match(name):
        return None
    return Path(run_dir) / name


def _is_complete(d: Path) -> bool:
    return (d / META_FILE).is_file() and (d / MODEL_FILE).is_file()


# ====================================================================== writing
def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    meta: dict[str, Any],
    keep: int = 0,
) -> Path:
    """Write ``run_dir/ckpt-<step>/`` atomically, update ``latest``, prune old ones.

    ``meta`` is stored as is plus ``schema_version``, ``step`` and ``versions``;
    it must be JSON-serialisable.  ``keep`` > 0 keeps that many newest checkpoints.
    Returns the checkpoint's folder.  Raises CheckpointWriteError when the disk refuses
    (the previous checkpoints stay whole); a crash at any point leaves no partial
    ``ckpt-<step>/``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"{CKPT_PREFIX}{step}"
    tmp = run_dir / f"{_TMP_PREFIX}{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_checkpoint_files(tmp, step, model_state, optimizer_state, meta)
        _move_into_place(run_dir, tmp, final, step)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _write_error(run_dir, final, exc) from exc
        raise
    try:
        write_latest(run_dir, final)
    except OSError as exc:
        raise _write_error(run_dir, final, exc) from exc
    fault_point("ckpt-after-latest")
    if keep > 0:
        prune_checkpoints(run_dir, keep)
    return final


def _write_checkpoint_files(tmp: Path, step: int, model_state: dict[str, torch.Tensor],
                            optimizer_state: dict[str, Any] | None, meta: dict[str, Any]) -> None:
    """Weights, optimiser state and metadata into the folder ``tmp``, each synced to disk."""
    from safetensors.torch import save_file

    # Copies on CPU: safetensors refuses tensors that share storage, and a copy also
    # detaches the file from later in-place updates of the live parameters.
    weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model_state.items()}
    save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt"})
    _fsync_file(tmp / MODEL_FILE)
    fault_point("ckpt-after-model")
    if optimizer_state is not None:
        tensors, rest = flatten_optimizer_state(optimizer_state)
        save_file(tensors, str(tmp / OPTIM_FILE), metadata={"format": "pt", "optim": json.dumps(rest)})
        _fsync_file(tmp / OPTIM_FILE)
        fault_point("ckpt-after-optim")
    full_meta = {
        **meta,
        "schema_version": SCHEMA_VERSION,
        "step": int(step),
        "versions": versions(),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_text_synced(tmp / META_FILE, json.dumps(full_meta, indent=1, sort_keys=True) + "\n")
    fault_point("ckpt-after-meta")
    _fsync_dir(tmp)


def _move_into_place(run_dir: Path, tmp: Path, final: Path, step: int) -> None:
    """Rename the written folder ``tmp`` to ``final`` (replacing an older save of the step)."""
    fault_point("ckpt-before-rename")
    if final.exists():  # re-saving a step (e.g. after resuming from it): swap, then drop the old one
        trash = run_dir / f"{_TMP_PREFIX}old-{step}-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(run_dir)
    fault_point("ckpt-after-rename")


def _write_error(run_dir: Path, final: Path, exc: OSError) -> CheckpointWriteError:
    """One line for a failed save (disk full, ...) that says which checkpoint still holds."""
    latest = read_latest(run_dir)
    if latest is not None and _is_complete(latest):
        kept = f"the previous checkpoint {latest} is intact and still the latest"
    else:
        kept = "no earlier checkpoint of this run exists"
    err = CheckpointWriteError(f"{final}: could not write the checkpoint ({exc.strerror or exc}); {kept}")
    err.errno = exc.errno
    return err


def write_latest(run_dir: str | Path, ckpt_dir: str | Path) -> None:
    """Point ``run_dir/latest`` at ``ckpt_dir``'s name, atomically (temporary file, fsync, ``os.replace``).
    Raises OSError when the disk refuses."""
    run_dir = Path(run_dir)
    tmp = run_dir / f"{LATEST_FILE}.tmp-{os.getpid()}"
    _write_text_synced(tmp, Path(ckpt_dir).name + "\n")
    os.replace(tmp, run_dir / LATEST_FILE)
    _fsync_dir(run_dir)


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints; never the one ``latest`` names."""
    latest = read_latest(run_dir)
    ckpts = list_checkpoints(run_dir)
    removed = []
    for d in ckpts[: max(0, len(ckpts) - keep)]:
        if latest is not None and d.name == latest.name:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def clean_stale_temp(run_dir: str | Path) -> None:
    """Remove temporary directories a crashed save left behind."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for p in run_dir.iterdir():
        if p.name.startswith(_TMP_PREFIX):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _write_text_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes the rename itself durable; Windows cannot open directories.
    if os.name != "posix":
        return
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ====================================================================== optimiser state
def flatten_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into safetensors tensors and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state_dict.get("state", {}).items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = _jsonable(value)
    groups = []
    for g in state_dict.get("param_groups", []):
        tuples = [k for k, v in g.items() if isinstance(v, tuple)]
        groups.append({**{k: _jsonable(v) for k, v in g.items()}, "__tuples__": tuples})
    return tensors, {"param_groups": groups, "scalars": scalars, "state_ids": [str(k) for k in state_dict.get("state", {})]}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`: an ``optimizer.state_dict()`` (integer state keys,
    tuples restored in the param groups)."""
    state: dict[int, dict[str, Any]] = {int(pid): {} for pid in rest.get("state_ids", [])}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in rest.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    groups = []
    for g in rest.get("param_groups", []):
        g = dict(g)
        for k in g.pop("__tuples__", []):
            g[k] = tuple(g[k])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


# ====================================================================== RNG state
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng_state(mask_generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every random number source the loop uses, as JSON-able values."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": {
            "kind": np_state[0], "keys": np_state[1].tolist(), "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    if mask_generator is not None:
        state["mask_generator"] = _b64(mask_generator.get_state())
    return state


def restore_rng_state(state: dict[str, Any], mask_generator: torch.Generator | None = None) -> None:
    """Set every random number source from :func:`capture_rng_state`'s dict (CUDA only with the same device
    count; ``mask_generator`` when given and saved).  Raises CheckpointError for a malformed state."""
    try:
        torch.set_rng_state(_unb64(state["torch"]))
        n = state["numpy"]
        np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
        p = state["python"]
        random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
        if "cuda" in state and torch.cuda.is_available():
            cuda_states = [_unb64(s) for s in state["cuda"]]
            if len(cuda_states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda_states)
        if mask_generator is not None and "mask_generator" in state:
            mask_generator.set_state(_unb64(state["mask_generator"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint RNG state is unusable ({exc})") from None


# ====================================================================== provenance
def versions() -> dict[str, str]:
    """Version strings of Python, torch, numpy, mim_workbench, timm and safetensors (those importable)."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    try:
        from .. import __version__

        out["mim_workbench"] = __version__
    except ImportError:  # pragma: no cover
        pass
    for mod in ("timm", "safetensors"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # optional provenance only
            pass
    return out


def dataset_signature(samples: list[Any]) -> str:
    """Hash of sample ids, file sizes and mtimes: tells whether a resume sees the same data."""
    import hashlib

    h = hashlib.sha256()
    for s in sorted(samples, key=lambda s: str(s.id)):
        h.update(str(s.id).encode())
        for p in (getattr(s, "image", None), getattr(s, "mask", None)):
            if p is None:
                h.update(b"-")
                continue
            try:
                st = os.stat(p)
                h.update(f"{st.st_size}:{int(st.st_mtime)}".encode())
            except OSError:
                h.update(b"?")
    return h.hexdigest()[:32]
