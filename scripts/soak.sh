#!/usr/bin/env bash
# The soak test (tests/soak.rs) with its figures shown: N generations through the library on the
# tiny model (default 1,000, the issue's figure; the test's own default is the same), cycling the
# full cache, CSP, H2O and StreamingLLM with and without --kv-shrink, and a bounded prefill.
# Prints the RSS after the warm-up and at the end, the growth, the least-squares slope per 100
# generations and the open file descriptors; writes every RSS sample to target/soak/rss.txt.
#
#   scripts/soak.sh           # 1,000 generations
#   scripts/soak.sh 10000     # longer
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-1000}"
mkdir -p target/soak
CSP_SOAK_N="$n" CSP_SOAK_TRACE="$PWD/target/soak/rss.txt" \
    cargo test --release --test soak -- --nocapture 2>&1 | grep -E '^soak:|^test |test result|panicked|RSS grew'
echo "soak.sh: RSS samples (generation KiB) in target/soak/rss.txt"
