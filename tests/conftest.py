"""Shared fixtures. torch is imported first: importing triton after napari has made its
GL context segfaulted under Xvfb/Mesa."""

from __future__ import annotations

import os
from pathlib import Path

import importlib.util

import pytest
import torch  # noqa: F401  (import order matters, see above)

# The test environment has PyQt6 and PyQt5 (the self-check runs under each); qtpy alone would
# pick PyQt5. In-process GUI tests use the default binding, PyQt6, unless QT_API says otherwise.
if importlib.util.find_spec("PyQt6") is not None and not os.environ.get("QT_API"):
    os.environ["QT_API"] = "pyqt6"
if os.environ.get("QT_API"):  # pytest-qt must use the binding napari (qtpy) uses
    os.environ.setdefault("PYTEST_QT_API", os.environ["QT_API"])

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    env = os.environ.get("MIM_SHARED_DATA")
    root = Path(env) if env else REPO.parent / "shared" / "data"
    return root if root.is_dir() else None


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Autosaves and the decoded-image cache go to a folder of this session, never to the
    user's ~/.cache: a mask painted there (or by a benchmark) was restored into a GUI test
    that expects an empty region layer."""
    old = os.environ.get("MIM_WORKBENCH_CACHE")
    os.environ["MIM_WORKBENCH_CACHE"] = str(tmp_path_factory.mktemp("mim-cache"))
    yield
    if old is None:
        os.environ.pop("MIM_WORKBENCH_CACHE", None)
    else:
        os.environ["MIM_WORKBENCH_CACHE"] = old


@pytest.fixture
def shared_data() -> Path:
    root = shared_data_dir()
    if root is None:
        pytest.skip("../shared/data is not present")
    return root


@pytest.fixture
def one_thread():
    """One torch thread: shared CI machines stall OpenMP; results do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def sample_root() -> Path:
    from mim_workbench.sample import sample_root

    return sample_root()


def pytest_collection_modifyitems(config, items):
    # GUI tests need a display; without one (no Xvfb) they skip instead of crashing Qt.
    if os.environ.get("DISPLAY"):
        return
    skip = pytest.mark.skip(reason="no display: run the suite through scripts/test.sh (Xvfb)")
    for item in items:
        if "gui" in item.keywords:
            item.add_marker(skip)
