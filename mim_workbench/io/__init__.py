"""Headless I/O: readers for X-ray images and masks, letterboxing, datasets.

Readers return :class:`LoadedImage` (float32 pixels in [0, 1] plus
:class:`ImageMeta`) and raise :class:`~mim_workbench.errors.ReaderError` with one
clear line on any failure. Data-set discovery and patient splits live in
:mod:`mim_workbench.io.datasets` (folders, class folders, CSV manifests, DICOM trees) and
the decoded-sample cache in :mod:`mim_workbench.io.cache`; reading an image never imports
torch. The torch datasets that feed training are in :mod:`mim_workbench.training`.
"""

from mim_workbench.io.formats import SUPPORTED_EXTENSIONS
from mim_workbench.io.info import info_records
from mim_workbench.io.letterbox import Letterbox, letterbox
from mim_workbench.io.masks import read_mask
from mim_workbench.io.meta import LAZY_THRESHOLD_PIXELS, ImageMeta, LoadedImage
from mim_workbench.io.readers import is_supported, read_image, read_path

__all__ = [
    "LAZY_THRESHOLD_PIXELS",
    "SUPPORTED_EXTENSIONS",
    "ImageMeta",
    "Letterbox",
    "LoadedImage",
    "info_records",
    "is_supported",
    "letterbox",
    "read_image",
    "read_mask",
    "read_path",
]
