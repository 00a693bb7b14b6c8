#!/usr/bin/env bash
# The GPU check (issue 15), for a machine with a GPU, CUDA's compiler and CMake but no Rust
# toolchain and no network. Prepared on the CPU machine: `scripts/setup.sh` makes
# vendor/llama-cpp-sys-2/llama.cpp (llama.cpp with csp-llava's patches, 28 MB); copy the
# repository with it (the device tool: carry ["vendor/llama-cpp-sys-2/llama.cpp"]). Then, there:
#
#   scripts/gpu-check.sh            # everything below, results in $OUT (default ./gpu-results)
#
# 1. builds llama.cpp with CUDA for this machine's GPU alone (CUDAARCHS, default from
#    nvidia-smi, e.g. 90 for Hopper) plus scripts/gpu/{make_model,obs_check,obs_bench}.cpp;
# 2. writes a LLaVA-1.5-7B-shaped random-weight model (Q4_0; MODEL_SHAPE overrides);
# 3. obs_check: in-graph attention sums (flash attention on) against an f64 reference, logits
#    identical with the observer on and off, OUT_PROD vs the transpose reduction;
# 4. compact_check: compaction and shrinking on the device (patch 0006) against the state round
#    trip (bit-identical logits), with timings;
# 5. headmask_check: per-head masks through flash attention (patch 0007) against the non-flash
#    path where the backend accepts them (CUDA does not: the layer falls back), decode tok/s;
# 6. obs_bench: prefill/decode speed of the reference (flash attention auto), flash attention
#    off, and the in-graph observer for CSP's window, H2O's all rows and both; bytes read back.
#
# GPU_CHECK_BACKEND=cpu runs the same on the CPU (a dry run of the script; use a small
# MODEL_SHAPE, e.g. "2 256 4 4 512 1000").
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SRC="$ROOT/vendor/llama-cpp-sys-2/llama.cpp"
OUT="${OUT:-$ROOT/gpu-results}"
BUILD="${BUILD:-$ROOT/target/gpu-check}"
BACKEND="${GPU_CHECK_BACKEND:-cuda}"
MODEL_SHAPE="${MODEL_SHAPE:-32 4096 32 32 11008 32000}"   # layers embd heads kv-heads ffn vocab
BENCH_ARGS="${BENCH_ARGS:-4096 512 3456 3 64 512}"          # n_prompt window n_media reps n_decode n_ubatch
JOBS="${JOBS:-$(nproc)}"
mkdir -p "$OUT"
log() { echo "gpu-check: $*" | tee -a "$OUT/log.txt" >&2; }

[[ -f "$SRC/include/llama.h" ]] || { log "no $SRC: run scripts/setup.sh on the CPU machine and copy vendor/ along"; exit 1; }
grep -q llama_set_attn_observer "$SRC/include/llama.h" || { log "$SRC lacks patch 0005 (stale vendor/?)"; exit 1; }
for tool in cmake c++; do command -v "$tool" >/dev/null || { log "missing $tool"; exit 1; }; done
{ echo "date: $(date -u +%FT%TZ)"; uname -a; cmake --version | head -1; c++ --version | head -1; } > "$OUT/machine.txt"

flags=(-DCMAKE_BUILD_TYPE=Release -DLLAMA_SRC="$SRC" -DGGML_NATIVE=ON)
if [[ "$BACKEND" == cuda ]]; then
  command -v nvcc >/dev/null || { log "missing nvcc (GPU_CHECK_BACKEND=cpu for a CPU dry run)"; exit 1; }
  ARCH="${CUDAARCHS:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')}"
  [[ -n "$ARCH" ]] || { log "cannot tell the GPU's architecture: set CUDAARCHS (e.g. 90)"; exit 1; }
  flags+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH")
  { nvcc --version | tail -1; nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader; } >> "$OUT/machine.txt" 2>&1 || true
  log "building llama.cpp with CUDA for sm_$ARCH ($JOBS jobs)"
else
  log "building llama.cpp for the CPU ($JOBS jobs)"
fi
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
t0=$(date +%s)
cmake -S "$ROOT/scripts/gpu" -B "$BUILD" "${gen[@]}" "${flags[@]}" > "$OUT/cmake.txt" 2>&1 || { tail -20 "$OUT/cmake.txt"; exit 1; }
cmake --build "$BUILD" -j "$JOBS" --target make_model obs_check obs_bench compact_check headmask_check > "$OUT/build.txt" 2>&1 || { tail -30 "$OUT/build.txt"; exit 1; }
log "built in $(( $(date +%s) - t0 )) s"

MODEL="${MODEL:-$BUILD/random-llama.gguf}"
if [[ ! -f "$MODEL" ]]; then
  t0=$(date +%s)
  # shellcheck disable=SC2086
  "$BUILD/make_model" "$MODEL" $MODEL_SHAPE 2>&1 | tee -a "$OUT/log.txt"
  log "model written in $(( $(date +%s) - t0 )) s"
fi

log "parity (obs_check)"
"$BUILD/obs_check" "$MODEL" > "$OUT/obs_check.txt" 2>&1 && log "obs_check passed" || { log "obs_check FAILED"; tail -20 "$OUT/obs_check.txt"; status=1; }
log "device compaction (compact_check)"
"$BUILD/compact_check" "$MODEL" > "$OUT/compact_check.txt" 2>&1 && log "compact_check passed" || { log "compact_check FAILED"; tail -20 "$OUT/compact_check.txt"; status=1; }
log "per-head masks through flash attention (headmask_check)"
"$BUILD/headmask_check" "$MODEL" > "$OUT/headmask_check.txt" 2>&1 && log "headmask_check passed" || { log "headmask_check FAILED"; tail -20 "$OUT/headmask_check.txt"; status=1; }
log "speed (obs_bench $BENCH_ARGS)"
# shellcheck disable=SC2086
"$BUILD/obs_bench" "$MODEL" $BENCH_ARGS > "$OUT/obs_bench.jsonl" 2> "$OUT/obs_bench.log" || { log "obs_bench FAILED"; tail -20 "$OUT/obs_bench.log"; exit 1; }
cat "$OUT/obs_bench.jsonl"
log "results in $OUT"
exit "${status:-0}"
