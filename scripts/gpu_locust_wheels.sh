#!/usr/bin/env bash
# Locust and its dependencies as wheels for the GPU machine's Python 3.12 (it has no package index),
# into .gpu-locust/, for scripts/h200_decode.sh's locust phase. pytest and its helpers are left out:
# Locust imports them only for pytest-style locustfiles, and the device's own pytest runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu-locust && mkdir .gpu-locust
python -m pip download -q "locust==$(python -c 'import importlib.metadata as m; print(m.version("locust"))')" \
  --python-version 3.12 --implementation cp --only-binary=:all: \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .gpu-locust
rm -f .gpu-locust/{pytest,pluggy,iniconfig,packaging,pygments}-*.whl
du -sh .gpu-locust
