#!/usr/bin/env bash
# The GPU paths in one command, on a machine with an NVIDIA GPU and this repository's files:
# the tests marked `cuda`, short second-order MAML runs under vmap in each AMP mode, ProtoNet with
# model.batch_norm=running, and the benchmark's CUDA rows. Every log and the summary table go under
# $OUT (default ./gpu-check). About 5 minutes on one H200.
#
#   bash scripts/gpu_check.sh                 # torch with CUDA and metarun's dependencies installed
#   bash scripts/gpu_wheels.sh && ...         # a machine without network: first collect the pure-Python
#                                             # wheels metarun needs into .whl/ where pip works, copy
#                                             # the repository over, then run this script there
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.md"
: >"$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

# What is missing (Hydra, OmegaConf, ...) from .whl/ when it is there; metarun itself from this checkout.
if ! "$PY" -c 'import hydra, omegaconf' 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-check-site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check: Hydra is not installed and there is no .whl/; run scripts/gpu_wheels.sh where pip works" >&2
    exit 1
  fi
fi
if ! "$PY" -c 'import metarun.conf' 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/gpu-check-metarun . || exit 1
  export PYTHONPATH="/tmp/gpu-check-metarun${PYTHONPATH:+:$PYTHONPATH}"
fi

say "# metarun GPU check, $(date -u +%Y-%m-%d)"
say ""
say "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)," \
    "$("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())')"
say ""
say "| check | result | seconds |"
say "|---|---|---|"

failed=0
check() {  # check NAME LOG COMMAND...: run, time, and add a row to the table
  local name="$1" log="$2"; shift 2
  local start=$SECONDS
  if timeout 240 "$@" >>"$OUT/$log" 2>&1; then
    say "| $name | ok | $((SECONDS - start)) |"
  else
    failed=1
    say "| $name | FAILED (exit $?, see $log) | $((SECONDS - start)) |"
  fi
}

# A small image folder (the tests' fixture), so no dataset needs to travel.
DATA="$(mktemp -d)"
"$PY" - "$DATA" <<'PY'
import sys
from pathlib import Path
from tests.fixtures.folder import write_folder
write_folder(Path(sys.argv[1]) / "images", n_classes=30, sizes=lambda c: 20)
PY
RUN=("$PY" -m metarun dataset=folder "dataset.path=$DATA/images" dataset.image_size=28 "dataset.cache_dir=$DATA/cache"
     device=cuda train.steps=40 train.val_every=20 train.val_episodes=50 train.log_every=10 eval.episodes=200)

check "pytest -m cuda" tests.log "$PY" -m pytest -q -m cuda -p no:cacheprovider
for amp in none bf16 fp16; do
  check "MAML 2nd order, vmap, amp=$amp" runs.log "${RUN[@]}" algorithm=maml algorithm.task_batching=vmap \
        algorithm.first_order=false "device.amp=$amp" "hydra.run.dir=$DATA/runs/maml-$amp"
done
check "MAML 2nd order, loop, amp=none" runs.log "${RUN[@]}" algorithm=maml algorithm.task_batching=loop \
      "hydra.run.dir=$DATA/runs/maml-loop"
check "ProtoNet, batch_norm=running" runs.log "${RUN[@]}" algorithm=protonet model.batch_norm=running \
      "hydra.run.dir=$DATA/runs/protonet-running"
for run in "$DATA"/runs/*/; do
  [ -f "$run/results.json" ] && echo "$(basename "$run"): $(tr -d '\n ' <"$run/results.json" | grep -o '"test_accuracy":[0-9.]*')" >>"$OUT/runs.log"
done
check "benchmark, CUDA rows (quick)" bench.log "$PY" scripts/bench.py --device cuda --quick --skip-sampling \
      --out "$OUT/bench.json"

say ""
say "Test accuracies of the runs (40 steps on a synthetic folder, a smoke test, not a result):"
grep -E '^[a-z-]+: "test_accuracy"' "$OUT/runs.log" | sed 's/^/    /' | tee -a "$SUMMARY"
say ""
say "The benchmark's table:"
sed -n '/^|/p' "$OUT/bench.log" | tee -a "$SUMMARY"
rm -rf "$DATA"
exit $failed
