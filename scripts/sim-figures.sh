#!/bin/sh
# Regenerate the simulation figures committed under docs/sim/: the paper's
# experiments (mobile-edge, cold allocation) and the placement policies side by side.
# Usage: scripts/sim-figures.sh [path/to/physarum-sim]
set -eu
SIM=${1:-target/release/physarum-sim}
OUT=docs/sim
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$OUT"
figure() { # name scenario [extra args...]
    name=$1; file=$2; shift 2
    "$SIM" run "$file" --seed 1 --quiet --out "$TMP/$name" "$@" 2>/dev/null >"$TMP/$name.txt"
    cp "$TMP/$name/timeline.png" "$OUT/$name.png"
    grep -E '^(requests|instances|latency|invariants|VIOLATED)' "$TMP/$name.txt" >"$OUT/$name.txt"
}
figure mobile-edge scenarios/paper-mobile-edge.json
figure cold-allocation scenarios/paper-cold-allocation.json
"$SIM" first-response scenarios/paper-cold-allocation.json --seeds 30 --out "$TMP/first" \
    --reference-ms 2170 --reference-label "paper (IM 2021): median" 2>/dev/null >"$OUT/cold-allocation-first-response.txt"
cp "$TMP/first/first-response.png" "$OUT/cold-allocation-first-response.png"
sed -i '/^wrote /d' "$OUT/cold-allocation-first-response.txt"
figure placement-lowest_rtt scenarios/placement.json --placement lowest_rtt
figure placement-least_loaded scenarios/placement.json --placement least_loaded
figure placement-rtt_load_cost scenarios/placement.json --placement rtt_load_cost:ms_per_instance=3
echo "figures in $OUT"
