#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite, GUI tests under Xvfb.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$(bash "$here/scripts/setup.sh" | tail -n 1)
cd "$here"
export MIM_WORKBENCH_CACHE=${MIM_WORKBENCH_CACHE:-$(mktemp -d)/cache}
exec xvfb-run -a -s "-screen 0 1600x1000x24" "$venv/bin/python" -m pytest -p no:cacheprovider "$@"
