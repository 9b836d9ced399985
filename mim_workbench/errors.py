"""Typed errors: every user-facing failure names the file or value at fault."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class MimError(Exception):
    """Base class for errors the CLI and GUI show as one clear line."""


class ReaderError(MimError):
    """A file could not be read as an image or mask; ``path`` names it."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = _one_line(problem)
        super().__init__(f"{self.path}: {self.problem}")


def _one_line(text: str, limit: int = 300) -> str:
    """Corrupt headers put control bytes and newlines into messages: keep them one printable line."""
    clean = " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


class DatasetError(MimError):
    """A dataset folder or manifest is malformed."""


class ConfigError(MimError):
    """A setting has a value we cannot use; the message names it."""


class CheckpointError(MimError):
    """A checkpoint is missing, incomplete or of the wrong kind."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (disk full, permissions); the previous one is untouched.

    Also an ``OSError`` (``errno`` kept) so callers that handle I/O errors still do.
    """


class TrainingError(MimError):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says what to change."""


def summary_line(exc: BaseException, limit: int = 200) -> str:
    """The telling line of a multi-line third-party message (torch.load's refusals name the
    blocked ``GLOBAL``), so our messages stay one line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    pick = next((ln for ln in lines if "GLOBAL" in ln), lines[0] if lines else type(exc).__name__)
    return pick if len(pick) <= limit else pick[: limit - 3] + "..."


def check_known_keys(cls: type, values: Mapping[str, Any], what: str) -> None:
    """Refuse settings that are not fields of the dataclass ``cls``, naming all of them at once
    (they are typos, or a newer schema): ``ConfigError("unknown <what>(s): a, b")``."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {what}(s): {', '.join(unknown)}")
