#!/usr/bin/env bash
# Creates (or reuses) the project-local virtual environment .venv and installs the package with its dev, trl, bnb and plots extras.
# torch is pinned through constraints.txt (a CPU wheel), never in the package metadata.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c constraints.txt "torch==2.13.0"
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev,trl,bnb,plots]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
