"""Type checks of settings against a dataclass's annotations.

Why: settings arrive from JSON/TOML files, the GUI and checkpoints written by
someone else.  ``"cache": "no"`` is truthy and ``"ratio": "0.5"`` fails deep
inside a comparison; both must be refused up front with the key named, not
silently misread or reported as a bare ``TypeError``.
"""

from __future__ import annotations

import dataclasses
import numbers
import types
import typing
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from ..errors import ConfigError

_NoneType = type(None)


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits ``tp`` (the annotation forms our config dataclasses use)."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, t) for t in typing.get_args(tp))
    if tp is _NoneType:
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if origin is tuple and args and Ellipsis not in typing.get_args(tp) and len(value) != len(args):
            return False
        item_types = args if (origin is tuple and len(args) == len(value)) else args[:1] * len(value)
        return all(_matches(v, t) for v, t in zip(value, item_types))
    if origin is dict or tp is dict:
        return isinstance(value, Mapping)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # an annotation form we do not model: let the dataclass's own checks decide


def _describe(tp: Any) -> str:
    text = str(tp).replace("typing.", "")
    return text.replace("<class '", "").replace("'>", "")


def check_field_types(obj: Any, *, skip: tuple[str, ...] = ()) -> None:
    """ConfigError naming the first field of dataclass ``obj`` whose value has the wrong type."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        tp = hints.get(f.name, Any)
        if not _matches(value, tp):
            raise ConfigError(f"{f.name}={value!r}: expected {_describe(tp)}, got {type(value).__name__}")


__all__ = ["check_field_types"]
