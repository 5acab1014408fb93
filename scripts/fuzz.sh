#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/) for SECONDS each (default 30), from the checked-in
# seeds (fuzz/seeds/<target>) plus what earlier runs found (fuzz/corpus/<target>, not checked in).
# Fails on the first crash: a panic, a sanitizer report, a hang (-timeout) or a runaway allocation
# (-malloc_limit_mb); libFuzzer leaves the input in fuzz/artifacts/<target>/, and
# `RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <that file>` replays it.
#
# cargo-fuzz passes nightly-only flags (-Zsanitizer=address, ...); RUSTC_BOOTSTRAP=1 lets the
# stable toolchain accept them.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-30}"
if ! [[ "$secs" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: scripts/fuzz.sh [SECONDS per target, default 30]" >&2
    exit 2
fi
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

cargo fuzz build
mkdir -p fuzz/artifacts
for target in $(cargo fuzz list); do
    mkdir -p "fuzz/corpus/$target"
    log="fuzz/artifacts/$target.log"
    echo "fuzz: $target for ${secs}s"
    if ! cargo fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$secs" -timeout=60 -malloc_limit_mb=1024 -print_final_stats=1 \
        >"$log" 2>&1; then
        # The report, not cargo-fuzz's dump of the input bytes.
        start=$(grep -n -m1 -E 'panicked at|==[0-9]+== ?ERROR' "$log" | cut -d: -f1 || true)
        sed -n "${start:-1},+40p" "$log"
        grep -A2 '^Reproduce with' "$log" || true
        echo "fuzz: $target failed (full log: $log)" >&2
        exit 1
    fi
    grep -E '^(stat::number_of_executed_units|stat::new_units_added|Done )' "$log" | tr '\n' ' '
    echo
done
