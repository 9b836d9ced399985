"""The core must never import napari or Qt: it runs on servers and under torchrun."""

import subprocess
import sys

GUI_MODULES = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt", "vispy")


def test_core_imports_no_gui_module():
    code = (
        "import sys, mim_workbench, mim_workbench.io, mim_workbench.masking, mim_workbench.models, "
        "mim_workbench.training, mim_workbench.inference, mim_workbench.cli, mim_workbench.sample\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {GUI_MODULES!r}]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"core imported GUI modules: {out.stdout}"
