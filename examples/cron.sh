#!/usr/bin/env bash
# Idempotent nightly training: safe to run from cron as often as you like.
#   0 * * * *  /path/to/examples/cron.sh >> /var/log/crlf.log 2>&1
# --resume continues an interrupted run, does nothing once it is complete (exit 0), and another copy of
# this script that finds the run directory busy exits 75 at once instead of training twice.
set -u
crlf pretrain --config "$(dirname "$0")/exp.toml" --out runs/nightly --resume --json > runs/nightly.json
code=$?
case $code in
  0)  echo "ok: $(python -c 'import json,sys; print(json.load(open("runs/nightly.json"))["status"])')" ;;
  75) echo "another run holds runs/nightly; skipping" ;;
  *)  echo "crlf pretrain failed with exit code $code" >&2; exit $code ;;
esac
