#!/usr/bin/env bash
# Wheels that benchmarks/gpu_check.sh needs on the lent GPU machine, which has no network: its image holds PyTorch
# (CUDA), Triton, transformers, accelerate, pytest and most of datasets' needs, but not bitsandbytes, datasets (with
# dill / multiprocess) or the peft version our tests were written against. Run here (package registries reachable):
#
#     bash benchmarks/gpu_wheels.sh            # -> .whl/ (ignored by git; ~45 MB, the device call carries <= 64 MiB)
#
# then one device call (`run` with carry [".whl"], timeout_s 560) with the command this script prints last: it
# installs the wheels into /tmp/site, runs gpu_check.sh into /tmp/gc under its own 470 s limit (its parts' limits sum
# to 450 s) so that the packing after it always runs, and hands back gpu_check.md, status.json and a tarball of
# everything (a device call returns at most 8 files).
#
# (Python 3.12 manylinux x86_64 wheels: the image's python3, seen as 3.12.3 at /opt/torch/.venv.)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-python3 -m pip}
mkdir -p .whl
for pkg in bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 peft==0.21.2; do
  $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$pkg"
done
ls -la .whl
du -sh .whl
cat <<'CMD'
device command:
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && PYTHON=python3 PYTHONUNBUFFERED=1 timeout -k 5 470 bash benchmarks/gpu_check.sh /tmp/gc; rc=$?; tar czf $OUT/gc.tgz -C /tmp gc; cp /tmp/gc/gpu_check.md /tmp/gc/status.json $OUT/; exit $rc
CMD
