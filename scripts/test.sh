#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, and integration tests that boot guests on
# this host's real KVM (the probe guest, and Debian's stock kernel for its early boot log).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-host.sh

cargo fmt --all -- --check
(cd guest/probe && cargo fmt -- --check)
(cd fuzz && cargo fmt -- --check)
cargo clippy --workspace --all-targets -- -D warnings
(cd guest/probe && cargo clippy --release -- -D warnings)

# The Debian guest (kernel + busybox initramfs) is built once and shared by the tests.
export HYPERPOOL_DEBIAN_DIR="${HYPERPOOL_DEBIAN_DIR:-$PWD/target/debian-guest}"
export HYPERPOOL_GUEST_CACHE="$HYPERPOOL_DEBIAN_DIR/cache"
cargo run -q -p hyperpool -- guest debian "$HYPERPOOL_DEBIAN_DIR" >/dev/null

cargo test --workspace

# Every fuzz target (fuzz/) for a short bounded run; longer: scripts/fuzz.sh SECONDS.
scripts/fuzz.sh "${HYPERPOOL_FUZZ_SECONDS:-20}"
