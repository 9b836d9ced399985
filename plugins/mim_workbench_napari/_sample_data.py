"""Sample data contributions: all files come from the installed package (see sample_data/LICENSES.md)."""

from __future__ import annotations

from mim_workbench import sample
from mim_workbench.io import read_image, read_mask

from ._layers import LayerData, to_layer_data


def chest_xray() -> list[LayerData]:
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
    return [to_layer_data(read_image(p)) for p in sample.dicom_files()]


def mammogram() -> list[LayerData]:
    return [to_layer_data(read_image(sample.mammogram_phantom()))]
