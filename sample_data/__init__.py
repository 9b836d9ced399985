"""Small real sample images (chest X-rays with lung masks, DICOM) shipped with MIM Workbench.

See LICENSES.md for the source and licence of every file.
"""

from importlib.resources import files
from pathlib import Path


def root() -> Path:
    """Folder holding the sample files, wherever the package is installed."""
    return Path(str(files(__name__)))
