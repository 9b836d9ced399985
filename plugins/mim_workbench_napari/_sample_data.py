"""Sample data contributions: all files come from the installed package (see sample_data/LICENSES.md)."""

from __future__ import annotations

from mim_workbench import sample
from mim_workbench.io import read_image, read_mask

from ._layers import LayerData, to_layer_data


def chest_xray() -> list[LayerData]:
    """The sample chest X-ray (a PNG, float32 in [0, 1]) and its lung mask as a ``region: NAME`` Labels layer
    (uint8 {0, 1}, resampled to the image's grid). Raises ReaderError when a packaged file cannot be read."""
    image_path, mask_path = sample.chest_xray()
    image = read_image(image_path)
    mask = read_mask(mask_path, shape=image.data.shape[:2])
    data, kwargs, _ = to_layer_data(image)
    return [
        (data, kwargs, "image"),
        (mask, {"name": f"region: {kwargs['name']}", "scale": kwargs["scale"], "opacity": 0.4,
                "metadata": {"source": str(mask_path)}}, "labels"),
    ]


def dicom_radiographs() -> list[LayerData]:
    """One image layer per packaged sample DICOM file (float32 in [0, 1], scale = the file's pixel spacing in mm);
    ReaderError if one fails."""
    return [to_layer_data(read_image(p)) for p in sample.dicom_files()]


def mammogram() -> list[LayerData]:
    """The synthetic MG phantom (1600×1200 pixels of 0.1 mm, written to the cache on first use) as one image
    layer; ReaderError if it cannot be read."""
    return [to_layer_data(read_image(sample.mammogram_phantom()))]
