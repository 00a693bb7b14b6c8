#!/usr/bin/env bash
# valgrind (memcheck) over the library-level tests on the tiny model: everything the FFI does —
# loading the model and projector, image encoding, contexts created, shrunk and dropped, KV cells
# removed and compacted, attention observed through the eval callback, per-head masks, bounded
# prefills — must run without an invalid read or write, a use of uninitialised memory in a
# branch, or a definite leak. "Possibly lost" and "still reachable" blocks (thread pools, static
# caches) are reported by valgrind but are not errors here.
#
#   scripts/valgrind.sh            # the selection below (~7 minutes on 2 cores)
#   scripts/valgrind.sh --quick    # the first test of each binary (~3 minutes)
#
# The test binaries are the release ones `cargo test --release` builds (found with
# --message-format=json). Suppressions: scripts/valgrind.supp (each entry says why). Logs:
# target/valgrind/<binary>.log. Exit status: 0 clean, 1 errors or leaks (the log's report is
# printed), 2 valgrind missing. Valgrind 3.19 cannot decode AVX-512: keep llama.cpp built for
# the default target CPU (no RUSTFLAGS=-Ctarget-cpu=native) on machines that have it.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v valgrind >/dev/null 2>&1; then
    echo "valgrind.sh: valgrind is not installed (Debian/Ubuntu: apt-get install valgrind)" >&2
    exit 2
fi
quick=0
[[ "${1:-}" == "--quick" ]] && quick=1

# binary → tests (exact names), chosen to cover each FFI path once within ~7 minutes on 2
# cores (measured under valgrind, seconds): engine — load, prepare, text-only and image runs, KV
# figures (9); both prefill modes with flash attention off/auto (46). pruning — the observer
# (cb_eval) and flash attention paused for the prefill (60). granularity — per-head masks
# (patch 0003) and decode sinks (19); PrefixKV decode-time eviction, AirCache (18); decode
# attention read back per head (52). bounded — evictions during the prefill with the observed
# window (9); the K-shift (patch 0004) (118); error paths (3). soak — 12 generations: the full
# cache, CSP, H2O, StreamingLLM with and without --kv-shrink (a second context), a bounded
# prefill (~60). merge — LOOK-M's K/V merge graphs (patch 0010). chat — a chat's continuation
# turns, images from memory. capi — the C ABI in process (NULL and bad arguments, a chat from
# RGB pixels); then examples/c/chat.c itself, compiled and run as an app would. Left out: tests that only drive the CLI binary (valgrind would check the
# harness, not the child) and the slowest repeats of these paths.
declare -A tests=(
    [engine]="spans_markers_and_report chunked_prefill_matches_eval_chunks"
    [pruning]="observing_policies_keep_flash_attention_with_the_graph_observer device_compaction_matches_the_state_round_trip"
    [observer]="graph_observer_leaves_logits_unchanged elite_window_in_the_graph_matches_recomputation_with_flash_attention_on"
    [granularity]="masks_survive_decoding_and_sinks_apply_n_softmax prefixkv_evicts_while_decoding_and_aircache_keeps_all_text each_head_attends_to_exactly_its_selection"
    [bounded]="observed_window_after_evictions_matches_recomputation errors_are_one_line_and_name_the_problem shifted_cache_decodes_like_one_read_at_those_positions"
    [soak]="generations_do_not_grow_memory_or_file_descriptors"
    [merge]="pivot_merge_matches_reference_per_head"
    [chat]="images_are_pruned_once_and_later_turns_read_only_their_text images_in_memory_answer_like_files"
    [capi]="null_and_bad_arguments_are_errors"
    [expected]="moments_and_scores_match_recomputation_flash_attention_on"
    [families]="qwen25vl_eviction_by_key_keeps_exactly_the_kept_tokens gemma3_observer_sums_match_the_models_own_softmax"
)
order=(engine pruning observer granularity bounded soak merge chat capi expected families)

args=()
for b in "${order[@]}"; do args+=(--test "$b"); done
json=$(cargo test --release --no-run --message-format=json "${args[@]}")

mkdir -p target/valgrind
start=$(date +%s)
failed=()
for b in "${order[@]}"; do
    exe=$(printf '%s\n' "$json" | grep '"reason":"compiler-artifact"' | grep "\"name\":\"$b\"" | grep '"test":true' \
        | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
    if [[ -z "$exe" ]]; then
        echo "valgrind.sh: no test binary for $b in cargo's output" >&2
        exit 1
    fi
    read -r -a names <<<"${tests[$b]}"
    (( quick )) && names=("${names[0]}")
    log="target/valgrind/$b.log"
    t0=$(date +%s)
    # OMP_NUM_THREADS=1: llama.cpp's OpenMP pool adds nothing to check but time under valgrind
    # (which runs one thread at a time anyway). CSP_SOAK_*: the soak test runs in this process
    # (no re-exec, which valgrind would not follow) for 12 generations, every configuration of
    # its cycle at least once; its RSS bound is not checked under valgrind.
    rc=0
    OMP_NUM_THREADS=1 CSP_SOAK_CHILD=1 CSP_SOAK_N=12 CSP_SOAK_NO_RSS=1 valgrind \
        --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite \
        --show-leak-kinds=definite --num-callers=40 \
        --suppressions=scripts/valgrind.supp --log-file="$log" \
        "$exe" --exact --test-threads=1 "${names[@]}" >"target/valgrind/$b.out" 2>&1 || rc=$?
    # a renamed test would silently run nothing: every name must have run
    passed=$(sed -n 's/^test result: .* \([0-9]*\) passed.*/\1/p' "target/valgrind/$b.out" | tail -n 1)
    if (( rc == 0 )) && [[ "${passed:-0}" != "${#names[@]}" ]]; then
        echo "valgrind.sh: $b ran ${passed:-0} of ${#names[@]} tests (${names[*]}): renamed? update this script" >&2
        rc=1
    fi
    summary=$(grep -E 'ERROR SUMMARY' "$log" | tail -n 1 | sed 's/^==[0-9]*== //')
    lost=$(grep -E 'definitely lost:' "$log" | tail -n 1 | sed 's/^==[0-9]*== *//')
    echo "valgrind $b (${#names[@]} tests, $(( $(date +%s) - t0 )) s): ${summary:-no summary}; ${lost:-definitely lost: 0 bytes}"
    if (( rc != 0 )); then
        failed+=("$b")
        echo "---- $b: exit $rc; test output:" >&2
        tail -n 20 "target/valgrind/$b.out" >&2
        echo "---- $b: valgrind report ($log):" >&2
        grep -vE '^==[0-9]+== *$' "$log" | sed -n '/Invalid\|uninitialised\|definitely lost in\|Process terminating/,+25p' | head -n 150 >&2
    fi
done
# examples/c/chat.c, the C ABI as an app uses it: compiled against the cdylib (built here with
# `cargo build --release --lib`, a no-op after the tests) and run on the tiny model, two images,
# two questions from standard input.
t0=$(date +%s)
cargo build --release --lib --quiet
cdir=target/valgrind/c
mkdir -p "$cdir"
target/release/csp-llava gen-tiny-model "$cdir/tiny" >/dev/null
"${CC:-cc}" -std=c99 -Wall -Wextra -Werror -Iinclude examples/c/chat.c -Ltarget/release -lcsp_llava \
    -Wl,-rpath,"$PWD/target/release" -o "$cdir/chat"
rc=0
printf 'Which image is red?\nAnd the other?\n' | OMP_NUM_THREADS=1 valgrind --error-exitcode=99 --leak-check=full \
    --errors-for-leak-kinds=definite --show-leak-kinds=definite --num-callers=40 \
    --suppressions=scripts/valgrind.supp --log-file=target/valgrind/c-chat.log \
    "$cdir/chat" "$cdir/tiny/tiny-text.gguf" "$cdir/tiny/tiny-mmproj.gguf" "$cdir/tiny/img-0.png" "$cdir/tiny/img-1.png" \
    >target/valgrind/c-chat.out 2>&1 || rc=$?
# both questions answered (32 tokens each: the tiny model never says end of generation)
answers=$(grep -o '\[32 tokens\]' target/valgrind/c-chat.out | wc -l)
(( rc == 0 && answers != 2 )) && { echo "valgrind.sh: examples/c/chat.c answered $answers of 2 questions" >&2; rc=1; }
summary=$(grep -E 'ERROR SUMMARY' target/valgrind/c-chat.log | tail -n 1 | sed 's/^==[0-9]*== //')
lost=$(grep -E 'definitely lost:' target/valgrind/c-chat.log | tail -n 1 | sed 's/^==[0-9]*== *//')
echo "valgrind examples/c/chat.c (2 questions, $(( $(date +%s) - t0 )) s): ${summary:-no summary}; ${lost:-definitely lost: 0 bytes}"
if (( rc != 0 )); then
    failed+=("examples/c/chat.c")
    echo "---- examples/c/chat.c: exit $rc; output:" >&2
    tail -n 20 target/valgrind/c-chat.out >&2
    grep -vE '^==[0-9]+== *$' target/valgrind/c-chat.log | sed -n '/Invalid\|uninitialised\|definitely lost in\|Process terminating/,+25p' | head -n 150 >&2
fi
echo "valgrind.sh: $(( $(date +%s) - start )) s in all"
if (( ${#failed[@]} )); then
    echo "valgrind.sh: errors or definite leaks in: ${failed[*]} (logs in target/valgrind/)" >&2
    exit 1
fi
echo "valgrind.sh: no invalid accesses, no definite leaks"
