//! `scripts/setup.sh`'s tool checks, on fake system trees (`SETUP_SYSROOT`): they must find
//! what the build loads — libclang the way bindgen's loader (clang-sys) names it, never the C++
//! library `libclang-cpp` — and name the Debian packages that are missing.

use std::path::Path;
use std::process::{Command, Output};

fn setup(root: &Path, arg: &str) -> Output {
    Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/setup.sh"))
        .arg(arg)
        .env("SETUP_SYSROOT", root)
        // neither may leak into the checks under a sysroot
        .env("LIBCLANG_PATH", "/usr/lib/llvm-14/lib")
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("setup.sh runs")
}

/// A fake root holding empty files at `files` (executables when under a bin folder).
fn tree(files: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in files {
        let p = dir.path().join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"").unwrap();
        if f.contains("bin/") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    dir
}

fn find_libclang(files: &[&str]) -> (Option<i32>, String, tempfile::TempDir) {
    let t = tree(files);
    let out = setup(t.path(), "--find-libclang");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).trim().to_owned(), t)
}

#[test]
fn libclang_cpp_alone_is_not_libclang() {
    let (code, out, _t) = find_libclang(&["usr/lib/llvm-14/lib/libclang-cpp.so.14", "usr/lib/x86_64-linux-gnu/libclang-cpp.so.14"]);
    assert_eq!(code, Some(1), "found: {out}");
    assert_eq!(out, "");
}

#[test]
fn versioned_libclang_in_the_llvm_folder() {
    let (code, out, t) = find_libclang(&["usr/lib/llvm-14/lib/libclang-cpp.so.14", "usr/lib/llvm-14/lib/libclang-14.so.1"]);
    assert_eq!(code, Some(0));
    assert_eq!(Path::new(&out), t.path().join("usr/lib/llvm-14/lib"));
}

#[test]
fn versioned_libclang_in_the_multiarch_folder() {
    let (code, out, t) = find_libclang(&["usr/lib/x86_64-linux-gnu/libclang-16.so.1"]);
    assert_eq!(code, Some(0));
    assert_eq!(Path::new(&out), t.path().join("usr/lib/x86_64-linux-gnu"));
}

#[test]
fn plain_and_dev_names_are_found() {
    for name in ["usr/lib/llvm-15/lib/libclang.so", "usr/local/lib/libclang.so.17", "usr/lib64/libclang-18.so", "opt/homebrew/opt/llvm/lib/libclang.dylib"] {
        let (code, out, t) = find_libclang(&[name]);
        assert_eq!(code, Some(0), "{name}");
        assert_eq!(Path::new(&out), t.path().join(Path::new(name).parent().unwrap()), "{name}");
    }
    // lookalikes are not
    for name in ["usr/lib/llvm-14/lib/libclangBasic.a", "usr/lib/llvm-14/lib/libclang-cpp.so", "usr/lib/libclang_rt.asan.so", "home/u/libclang.so"] {
        let (code, _, _t) = find_libclang(&[name]);
        assert_eq!(code, Some(1), "{name}");
    }
}

#[test]
fn missing_tools_are_named_as_debian_packages() {
    let missing = |files: &[&str]| {
        let t = tree(files);
        let out = setup(t.path(), "--missing");
        assert_eq!(out.status.code(), Some(0));
        String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_owned).collect::<Vec<_>>()
    };
    assert_eq!(missing(&[]), ["cmake", "libclang-dev", "g++", "patch", "python3", "python3-venv"]);
    // the Debian Rust image: libclang-cpp but no libclang, Python without ensurepip
    let rust_image = ["usr/bin/cmake", "usr/bin/c++", "usr/bin/patch", "usr/bin/python3", "usr/lib/llvm-14/lib/libclang-cpp.so.14", "usr/lib/python3.11/venv/__init__.py"];
    assert_eq!(missing(&rust_image), ["libclang-dev", "python3-venv"]);
    let complete = [
        "usr/bin/cmake",
        "usr/bin/g++",
        "usr/bin/patch",
        "usr/bin/python3",
        "usr/lib/llvm-14/lib/libclang.so.1",
        "usr/lib/python3.11/ensurepip/__init__.py",
    ];
    assert!(missing(&complete).is_empty());
}
