#!/usr/bin/env bash
# The main command from the README: set up .venv if needed, then run the end-to-end example.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python examples/quickstart.py "$@"
