#!/usr/bin/env bash
# The main command from the README: set up .venv if needed, then run the whole story on the offline toy world
# (builds and caches the toy world on first use, ~6 min; then full OPD, diagnostics, mask, masked vs random, merge).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/sparse-opd demo "$@"
