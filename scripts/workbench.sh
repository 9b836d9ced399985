#!/usr/bin/env bash
# Set up (first run only) and open the workbench: napari with the plugin docked and a
# sample chest X-ray with its lung mask. Without a display it runs the headless demo.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$(bash "$here/scripts/setup.sh" | tail -n 1)
exec "$venv/bin/mim-workbench" gui "$@"
