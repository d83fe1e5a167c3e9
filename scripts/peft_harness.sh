#!/usr/bin/env bash
# peft's own test harness on SparseOPD: downloads the sdist of the installed peft version once (pip, into
# .cache/peft_harness/) and runs its tests/test_custom_models.py with our cases in place of peft's
# (tests/peft_harness/). Extra arguments: peft test modules, then `-- PYTEST_ARGS`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup_env.sh
exec .venv/bin/python tests/peft_harness/run.py "$@"
