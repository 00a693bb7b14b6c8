#!/usr/bin/env bash
# A long fuzzing run to leave going: the same targets as `cargo test --release --test fuzz`
# (tests/fuzz.rs) with a large time budget per target, round after round, each round with new
# random seeds, until stopped (Ctrl-C) or a target fails.
#
#   scripts/fuzz.sh                  # 600 s per target per round, forever
#   scripts/fuzz.sh 120 3            # 120 s per target, 3 rounds
#   scripts/fuzz.sh 300 0 chat       # only targets whose name contains "chat"
#
# Each round prints, per target, the cases run and what was accepted and refused; the totals
# follow. A failure prints the smallest failing input and its seed: rerun that round's target with
# CSP_FUZZ_SEED=<seed> to replay it. Output of every round: target/fuzz/round-N.log.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-600}"
rounds="${2:-0}"   # 0 = until stopped
filter="${3:-}"

cargo test --release --test fuzz --no-run
mkdir -p target/fuzz
declare -A total=()
round=0
trap 'echo; echo "fuzz.sh: stopped after $round round(s)"; for t in "${!total[@]}"; do printf "  %8d cases  %s\n" "${total[$t]}" "$t"; done; exit 130' INT TERM
while (( rounds == 0 || round < rounds )); do
    round=$((round + 1))
    log="target/fuzz/round-$round.log"
    echo "fuzz.sh: round $round, ${secs} s per target (log: $log)"
    rc=0
    # random: every target draws its own seed (printed); unset, the tests use CI's fixed seed
    CSP_FUZZ_SEED="${CSP_FUZZ_SEED:-random}" CSP_FUZZ_SECS="$secs" cargo test --release --test fuzz -- --nocapture ${filter:+"$filter"} >"$log" 2>&1 || rc=$?
    grep -E '^fuzz |^ +[0-9]+ × |^    \(' "$log" || true
    while read -r n target; do
        total["$target"]=$(( ${total["$target"]:-0} + n ))
    done < <(sed -n 's/^fuzz \(.*\): \([0-9]*\) cases in .*/\2 \1/p' "$log")
    echo "fuzz.sh: totals after round $round:"
    for t in "${!total[@]}"; do printf "  %10d cases  %s\n" "${total[$t]}" "$t"; done
    if (( rc != 0 )); then
        echo "fuzz.sh: round $round failed; the failure:" >&2
        grep -E -A30 'failed \(CSP_FUZZ_SEED|panicked at' "$log" | head -n 80 >&2
        exit 1
    fi
done
