#!/usr/bin/env bash
# Long run of the property tests in tests/fuzz_decoders.rs: 6 properties x 1.7 M cases
# (about 10 million executions) in release mode; zero failures expected.
# Usage: tests/fuzz.sh [CASES_PER_PROPERTY]
set -euo pipefail
cd "$(dirname "$0")/.."
CASES="${1:-1700000}"
unset RUST_BACKTRACE
start=$(date +%s)
PROPTEST_CASES="$CASES" cargo test --release --test fuzz_decoders -- --test-threads 2
echo "fuzz: 6 properties x $CASES cases = $((6 * CASES)) executions in $(( $(date +%s) - start ))s"
