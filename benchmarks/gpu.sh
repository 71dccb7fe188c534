#!/usr/bin/env bash
# The GPU session's one command, from the project root, with .gpu/ carried (see docs/performance.md):
#   bash benchmarks/gpu.sh                      # issue 16, speed: benchmarks/gpu.py, about 7 minutes
#   bash benchmarks/gpu.sh accuracy ablation    # issue 17, accuracy: one sweep (ablation, seed, methods, targets)
# Everything lands in $OUT (gpu-out/ when unset). BUDGET (seconds, default 420) bounds the Python part; set-up
# (wheels, editable crlf, CIFAR-10 JPEGs to $CRLF_C10) takes about half a minute before it.
set -uo pipefail
source .gpu/setup.sh || exit 1
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
case "${1:-speed}" in
  speed) python3 benchmarks/gpu.py --budget "${BUDGET:-420}" --out "$OUT" ;;
  accuracy) python3 benchmarks/accuracy.py --sweep "${2:-ablation}" --budget "${BUDGET:-420}" \
              --parallel "${PARALLEL:-3}" --out "$OUT" ;;
  *) echo "usage: bash benchmarks/gpu.sh [speed | accuracy SWEEP]" >&2; exit 2 ;;
esac
