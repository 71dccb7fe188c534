#!/usr/bin/env bash
# The GPU session's commands, from the project root, with .gpu/ carried (see docs/performance.md):
#   bash benchmarks/gpu.sh                      # issue 16, speed: benchmarks/gpu.py, about 7 minutes
#   bash benchmarks/gpu.sh accuracy ablation    # issue 17, accuracy: one sweep (ablation, seed, methods, targets)
#   bash benchmarks/gpu.sh stream               # issue 15, streaming: ResNet-50 at 224 px fed from JPEGs
#   bash benchmarks/gpu.sh memory               # issue 36, big batches: benchmarks/memory.py, about 3 minutes
# Words after the mode (after the sweep for accuracy) go to the Python script, e.g. `speed --stages profile`.
# Everything lands in $OUT (gpu-out/ when unset). BUDGET (seconds, default 420) bounds the Python part; set-up
# (wheels, editable crlf, CIFAR-10 JPEGs to $CRLF_C10) takes about half a minute before it.
set -uo pipefail
source .gpu/setup.sh || exit 1
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
case "${1:-speed}" in
  speed) python3 benchmarks/gpu.py --budget "${BUDGET:-420}" --out "$OUT" "${@:2}" ;;
  accuracy) python3 benchmarks/accuracy.py --sweep "${2:-ablation}" --budget "${BUDGET:-420}" \
              --parallel "${PARALLEL:-3}" --out "$OUT" "${@:3}" ;;
  stream) python3 benchmarks/stream.py --make 6000 --folder /tmp/jpegs --device cuda --train --gpu-decode \
            --workers "$(nproc)" --batch 256 --steps 30 --warmup 5 --json "$OUT/stream.json" "${@:2}" ;;
  memory) timeout "${BUDGET:-420}" python3 benchmarks/memory.py --device cuda --json "$OUT/memory.json" "${@:2}" ;;
  *) echo "usage: bash benchmarks/gpu.sh [speed | accuracy SWEEP | stream | memory] [ARGS...]" >&2; exit 2 ;;
esac
