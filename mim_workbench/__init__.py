"""MIM Workbench headless core: masked image modeling on medical X-rays.

This package never imports napari or Qt; the napari front end lives in
``mim_workbench_napari`` (``plugins/``) and is a thin skin over these functions.
"""

__version__ = "0.1.0"
