#!/usr/bin/env bash
# One-time, idempotent set-up of a fresh machine: system packages, a virtual environment,
# the CPU build of torch pinned by constraints.txt, then qbheat with its export and dev extras, then
# the start-up hook that makes torchvision (and so timm) importable before qbheat.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

# System packages: Fashion-MNIST (real images for training and probes) and Chromium
# (renders report.html headless in the tests).
need_apt=()
dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || need_apt+=(dataset-fashion-mnist)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: please install the Debian packages: sudo apt-get install ${need_apt[*]}" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
# torch first, from the local CPU wheel; constraints.txt keeps every later install on it.
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" install torch==2.13.0
"${PIP[@]}" install -c constraints.txt -e ".[dev]"
# `import timm` before `import qbheat` must work too: a start-up hook runs qbheat's torchvision shim
# just before torchvision is first imported (see scripts/torchvision_hook.py).
"$VENV/bin/python" scripts/torchvision_hook.py --install >/dev/null
touch "$VENV/.installed"
