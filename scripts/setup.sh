#!/usr/bin/env bash
# One-shot, idempotent set-up for a fresh Debian machine with Python 3.11:
# system libraries for napari under Xvfb, a virtual environment, the package with
# its GUI and test extras. Safe to run again; it only installs what is missing.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${MIM_VENV:-$HOME/.local/share/mim-workbench/venv}
py=${PYTHON:-python3}

apt_pkgs=(xvfb xauth libgl1-mesa-dri libglx-mesa0 libegl1 libxkbcommon-x11-0 libxcb-icccm4
  libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0
  libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libfontconfig1 libdbus-1-3)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "setup: installing system packages: ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating virtual environment $venv" >&2
  mkdir -p "$(dirname "$venv")"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
fi
pip=("$venv/bin/python" -m pip install -q)
# torchvision must match torch exactly; install the pair first so the resolver
# never mixes a PyPI torchvision with another torch build.
if ! "$venv/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  echo "setup: installing torch + torchvision (a few minutes the first time)" >&2
  if [ "$(uname -m)" = "x86_64" ]; then
    "${pip[@]}" "torch==2.14.1" "torchvision==0.29.1" || "${pip[@]}" torch torchvision
  else
    "${pip[@]}" torch torchvision
  fi
fi
stamp="$venv/.mim-workbench-deps"
want=$(cat "$here/pyproject.toml" | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing mim-workbench dependencies" >&2
  "${pip[@]}" -e "$here[gui,test]"
  echo "$want" > "$stamp"
else
  "${pip[@]}" --no-deps -e "$here"
fi
echo "$venv"
