#!/usr/bin/env bash
# Run the fuzz targets: fuzz/run.sh [SECONDS] [TARGET...]
# Each target (all of them when none is named) runs for SECONDS (default 60) from
# its seeds: the committed corpus/TARGET plus, for the config and scenario targets,
# the shipped files themselves. New inputs go to a scratch folder, so a run never
# changes the committed corpus. Exits non-zero when any target finds a crash; the
# crashing input is kept in fuzz/artifacts/TARGET/ (see fuzz/README.md).
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
shift || true

# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets the stable toolchain take them.
export RUSTC_BOOTSTRAP=1
if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked
fi

# Without a sanitizer: libFuzzer's coverage guidance and Rust's own checks (panics,
# overflow checks, debug assertions) are what we fuzz for, and it runs several times
# faster than with AddressSanitizer. All targets are built in one go.
cargo fuzz build --sanitizer none

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

# Shipped files that are seeds as they are.
seeds_of() {
    case "$1" in
        conf) echo ../conf ;;
        service_config) echo ../conf/services ;;
        scenario) echo ../scenarios ;;
    esac
}

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=()
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t" "corpus/$t"
    log="$scratch/$t.log"
    # shellcheck disable=SC2046
    if cargo fuzz run --sanitizer none "$t" "$scratch/$t" "corpus/$t" $(seeds_of "$t") -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        runs=$(awk '/^stat::number_of_executed_units:/ { print $2 }' "$log")
        echo "fuzz $t: ${runs:-?} runs in ${seconds}s, no crash"
    else
        echo "fuzz $t: FAILED; the end of its log:"
        tail -n 40 "$log"
        failed+=("$t")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: crashes in ${failed[*]} (inputs in fuzz/artifacts/; see fuzz/README.md)"
    exit 1
fi
