#!/usr/bin/env bash
# The test command from the README: set up .venv if needed, run the whole pytest suite, then peft's own harness on
# SparseOPD (scripts/peft_harness.sh; it needs the package registry once, to fetch peft's sdist). With arguments,
# only pytest runs, with them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
if [ "$#" -eq 0 ]; then  # lint and format first: seconds
    .venv/bin/ruff check sparse_opd_peft tests benchmarks examples
    .venv/bin/ruff format --check sparse_opd_peft tests benchmarks examples
fi
.venv/bin/python -m pytest "$@"
if [ "$#" -eq 0 ]; then
    bash scripts/peft_harness.sh
fi
