#!/usr/bin/env bash
# Pretrain, embed, evaluate and look: the whole round trip on the offline digits (a few minutes on a CPU).
# Usage: examples/evaluate.sh [RUN_DIR]
set -euo pipefail
run=${1:-runs/digits}
crlf pretrain --data digits --epochs 5 --batch-size 256 --knn-every 1 --out "$run" --resume
crlf extract --ckpt "$run/encoder.safetensors" --data digits --split train --out "$run/train.npy"
crlf extract --ckpt "$run/encoder.safetensors" --data digits --split test --out "$run/test.npy"
crlf linear-eval --train-emb "$run/train.npy" --test-emb "$run/test.npy" --results "$run/linear_eval.json" \
    --label-fraction 0.1 --label-fraction 1 --seeds 3
crlf knn-eval --train-emb "$run/train.npy" --test-emb "$run/test.npy" -k 20 --results "$run/knn_eval.json"
crlf visualize --run "$run"            # figures and index.html in $run/figures/
echo "open $run/figures/index.html"
