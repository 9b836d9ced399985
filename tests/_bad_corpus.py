"""The generated bad-input corpus (``tests/data/bad/make_corpus.py``) as a module (not a test module)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_PATH = Path(__file__).parent / "data" / "bad" / "make_corpus.py"


def load_corpus() -> ModuleType:
    """``make_corpus`` loaded once per session (``make_corpus(dir)`` writes the cases)."""
    if "make_corpus" in sys.modules:
        return sys.modules["make_corpus"]
    spec = importlib.util.spec_from_file_location("make_corpus", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_corpus"] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod
