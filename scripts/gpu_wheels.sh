#!/usr/bin/env bash
# Collects into .whl/ the pure-Python wheels that scripts/gpu_check.sh installs on a GPU machine whose
# Python has torch but not metarun's other dependencies, and no network to fetch them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
mkdir -p .whl
"$PY" -m pip wheel -q --no-deps -w .whl hydra-core omegaconf 'antlr4-python3-runtime==4.9.3'
ls .whl
