#!/usr/bin/env bash
# Time a cold first request (allocates an instance) and cached requests through a
# `physarum dev` cluster on loopback, with curl. Build first:
#   cargo build --release -p physarum
# Usage: bins/scripts/first-request.sh [RUNS]   (env: BIN, PORT, ALLOCATORS)
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-target/release/physarum}
PORT=${PORT:-4299}
RUNS=${1:-3}
OUT=$(mktemp)
DEV=
trap '[ -n "$DEV" ] && kill -INT "$DEV" 2>/dev/null; wait 2>/dev/null; rm -f "$OUT"' EXIT
for run in $(seq 1 "$RUNS"); do
  start=$(date +%s.%N)
  "$BIN" dev --port "$PORT" --allocators "${ALLOCATORS:-1}" >"$OUT" 2>&1 &
  DEV=$!
  for _ in $(seq 1 600); do grep -q "Press Ctrl-C" "$OUT" && break; kill -0 "$DEV" || { cat "$OUT"; exit 1; }; sleep 0.05; done
  up=$(date +%s.%N)
  cold=$(curl -s -o /dev/null -w '%{time_total}' "127.0.0.1:$PORT/hello-world-server/hello")
  first=$(date +%s.%N)
  cached=$(for _ in $(seq 1 50); do curl -s -o /dev/null -w '%{time_total}\n' "127.0.0.1:$PORT/hello-world-server/hello"; done |
    sort -n | awk '{a[NR]=$1} END {printf "p50 %.4f s, max %.4f s", a[int((NR+1)/2)], a[NR]}')
  printf 'run %d: cluster up %.2f s; cold first request %s s; dev start -> first Hello %.2f s; cached (50 curls): %s\n' \
    "$run" "$(echo "$up - $start" | bc)" "$cold" "$(echo "$first - $start" | bc)" "$cached"
  kill -INT "$DEV"; wait "$DEV" || true; DEV=
done
