//! Shared test fixtures: the tiny model, generated once per test process (no binary fixtures are
//! committed).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use csp_llava::gguf::tiny;

/// Directory holding tiny-text.gguf, tiny-mmproj.gguf and img-0..3.png (seed 0).
pub fn tiny_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = tempfile::tempdir().expect("temp dir");
        tiny::write_all(d.path(), 0).expect("write tiny model");
        d
    })
    .path()
}

pub fn model() -> PathBuf {
    tiny_dir().join(tiny::TEXT_FILE)
}

pub fn mmproj() -> PathBuf {
    tiny_dir().join(tiny::MMPROJ_FILE)
}

pub fn image(i: usize) -> PathBuf {
    tiny_dir().join(tiny::image_file(i))
}

/// The tiny model loaded with 2 threads.
pub fn engine() -> csp_llava::Engine {
    let mut cfg = csp_llava::ModelConfig::new(model(), mmproj());
    cfg.threads = 2;
    csp_llava::Engine::load(&cfg).expect("tiny model loads")
}

/// A scratch directory for files a test makes (kept alive for the process).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"))
        .path()
}

/// Every policy that prunes a whole prompt at every granularity on the LLaVA families (PrefixKV
/// and AirCache, whose budgets are per layer, are tested apart).
pub const PRUNING: [csp_llava::policy::PolicyKind; 10] = {
    use csp_llava::policy::PolicyKind as K;
    [K::Csp, K::H2o, K::SnapKv, K::Streaming, K::Random, K::KNorm, K::VNorm, K::KeyDiff, K::LookM, K::Expected]
};
