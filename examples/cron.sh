#!/usr/bin/env bash
# Idempotent nightly training: safe to run from cron as often as you like.
#   0 * * * *  /path/to/examples/cron.sh /srv/ml >> /var/log/crlf.log 2>&1
# Usage: cron.sh [WORK_DIR]. It works in WORK_DIR (default: the folder above this script's, the project root,
# never cron's $HOME), so the relative paths of exp.toml (data_dir = "./data") and runs/ always mean the same
# place; runs/ is created when missing, and removed again when that first start fails (a failed start leaves
# nothing). --resume continues an interrupted run and does nothing once it is complete (exit 0); a copy of this
# script that finds the run directory busy (crlf exits 75 at once) skips instead of training twice.
# runs/nightly.json (crlf's --json summary) is replaced only by a run that succeeded.
set -u
config="$(cd "$(dirname "$0")" && pwd)/exp.toml"
work="${1:-$(dirname "$config")/..}"
command -v crlf > /dev/null || { echo "crlf is not on PATH ($PATH): set PATH in the crontab" >&2; exit 127; }
cd "$work" || { echo "cannot enter the work folder $work" >&2; exit 1; }
made=$([ -d runs ] || echo yes)  # a failed first start removes runs/ again (crlf removes runs/nightly itself)
mkdir -p runs || { echo "cannot create $work/runs" >&2; exit 1; }
summary="runs/.nightly.json.$$" errors="runs/.nightly.err.$$" code=1  # this process's own temp files
trap 'rm -f "$summary" "$errors"; [ "$code" = 0 ] || [ -z "$made" ] || rmdir runs 2> /dev/null' EXIT
# stdout (the JSON summary) to a temp file; stderr (logs, progress, errors) through to ours and into $errors
crlf pretrain --config "$config" --out runs/nightly --resume --json 2>&1 > "$summary" | tee "$errors" >&2
code=${PIPESTATUS[0]}
case $code in
  0)  mv "$summary" runs/nightly.json
      echo "ok: $(sed -n 's/^ *"status": "\(.*\)",*$/\1/p' runs/nightly.json)" ;;
  75) echo "another run holds $work/runs/nightly; skipping" ;;
  *)  reason=$(grep 'error: ' "$errors" | tail -n 1)  # crlf's own one-line error, if it wrote one
      reason=${reason#*error: }
      echo "crlf pretrain failed with exit code $code: ${reason:-see its output above}" >&2; exit "$code" ;;
esac
