"""Whether a display server is there to open windows on (the launcher and ``gui`` both ask)."""

from __future__ import annotations

import os
import sys


def has_display() -> bool:
    """A display server is named (always true on macOS and Windows)."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
