//! The `csp-llava` binary: output contract and bad input. Every bad input must give one clear
//! line on stderr and a non-zero exit, never a panic or a hang.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use csp_llava::gguf::tiny;

fn csp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_csp-llava"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("binary runs")
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

/// Runs with the tiny model + given extra args; returns the output.
fn run_tiny(extra: &[&str]) -> Output {
    let (m, p) = (s(&support::model()), s(&support::mmproj()));
    let mut args = vec!["-m", m.as_str(), "--mmproj", p.as_str()];
    args.extend_from_slice(extra);
    csp(&args)
}

/// Asserts a clean failure whose one stderr line contains `needle`.
#[track_caller]
fn assert_fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<_> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {err}");
    assert!(lines[0].contains(needle), "expected '{needle}' in: {err}");
}

#[test]
fn json_on_three_images_has_the_contract_fields() {
    let imgs: Vec<String> = (0..3).map(|i| s(&support::image(i))).collect();
    let out = run_tiny(&[
        "--image", &imgs[0], "--image", &imgs[1], "--image", &imgs[2],
        "-p", "Compare the images.", "-n", "8", "--temp", "0", "--ignore-eos", "--json", "-c", "1024",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    for key in [
        "text", "n_prompt_tokens", "n_images", "image_tokens", "n_generated", "encode_ms", "prefill_ms",
        "decode_ms", "flash_attn", "kv_cells", "kv_bytes", "kv_bytes_allocated", "policy",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    assert_eq!(v["n_images"], 3);
    assert_eq!(v["image_tokens"], serde_json::json!([64, 64, 64]));
    assert_eq!(v["n_generated"], 8);
    assert_eq!(v["policy"], "full");
    assert_eq!(v["kv_cells"], v["n_prompt_tokens"]);
    assert!(v["flash_attn"] == "on" || v["flash_attn"] == "off");
    assert!(v["n_prompt_tokens"].as_u64().unwrap() > 192);
    // the timing line goes to stderr
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tok/s") && err.contains("KV"), "{err}");
}

#[test]
fn flash_attn_flag_is_honoured_and_reported() {
    let img = s(&support::image(0));
    for (flag, want) in [("off", "off"), ("on", "on")] {
        let out = run_tiny(&["--image", &img, "-p", "hi", "-n", "2", "--json", "-fa", flag, "-c", "512"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["flash_attn"], want);
    }
}

#[test]
fn streams_text_and_is_deterministic_with_a_seed() {
    let img = s(&support::image(1));
    let args = ["--image", img.as_str(), "-p", "What shape?", "-n", "12", "--seed", "7", "--temp", "0.9", "--ignore-eos", "-c", "512"];
    let a = run_tiny(&args);
    let b = run_tiny(&args);
    assert!(a.status.success());
    assert!(!a.stdout.is_empty());
    assert_eq!(a.stdout, b.stdout);
}

#[test]
fn gen_tiny_model_is_deterministic() {
    let d1 = support::scratch().join("gen1");
    let d2 = support::scratch().join("gen2");
    for d in [&d1, &d2] {
        let out = csp(&["gen-tiny-model", &s(d), "--seed", "3"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    for f in [tiny::TEXT_FILE, tiny::MMPROJ_FILE, "img-0.png", "img-1.png", "img-2.png", "img-3.png"] {
        assert_eq!(std::fs::read(d1.join(f)).unwrap(), std::fs::read(d2.join(f)).unwrap(), "{f}");
    }
}

#[test]
fn missing_model() {
    let p = s(&support::mmproj());
    assert_fails_with(&csp(&["-m", "/no/such/model.gguf", "--mmproj", &p, "-p", "hi"]), "model not found");
}

#[test]
fn corrupt_model() {
    let bad = support::scratch().join("corrupt-model.gguf");
    std::fs::write(&bad, b"this is not a gguf file at all").unwrap();
    let p = s(&support::mmproj());
    assert_fails_with(&csp(&["-m", &s(&bad), "--mmproj", &p, "-p", "hi"]), "not a valid GGUF");
    // a truncated real model
    let bytes = std::fs::read(support::model()).unwrap();
    let cut = support::scratch().join("truncated-model.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let out = csp(&["-m", &s(&cut), "--mmproj", &p, "-p", "hi"]);
    assert_fails_with(&out, "model");
}

#[test]
fn missing_and_corrupt_mmproj() {
    let m = s(&support::model());
    assert_fails_with(&csp(&["-m", &m, "--mmproj", "/no/such/mmproj.gguf", "-p", "hi"]), "mmproj not found");
    let bad = support::scratch().join("corrupt-mmproj.gguf");
    std::fs::write(&bad, b"GGUF\x03\0\0\0garbage").unwrap();
    assert_fails_with(&csp(&["-m", &m, "--mmproj", &s(&bad), "-p", "hi"]), "not a valid GGUF");
    // the text model passed as projector
    assert_fails_with(&csp(&["-m", &m, "--mmproj", &m, "-p", "hi"]), "not a multimodal projector");
}

#[test]
fn projector_width_mismatch() {
    let wrong = support::scratch().join("mmproj-width-48.gguf");
    tiny::mmproj_with_width(0, 48).write_file(&wrong).unwrap();
    let m = s(&support::model());
    let out = csp(&["-m", &m, "--mmproj", &s(&wrong), "-p", "hi"]);
    assert_fails_with(&out, "does not fit model");
    assert!(String::from_utf8_lossy(&out.stderr).contains("48"));
}

#[test]
fn unreadable_images() {
    assert_fails_with(&run_tiny(&["--image", "/no/such/image.png", "-p", "hi"]), "image not found");
    let txt = support::scratch().join("not-an-image.png");
    std::fs::write(&txt, "plain text, not pixels").unwrap();
    assert_fails_with(&run_tiny(&["--image", &s(&txt), "-p", "hi"]), "cannot decode image");
    let dir = support::scratch().join("a-directory.png");
    std::fs::create_dir_all(&dir).unwrap();
    assert_fails_with(&run_tiny(&["--image", &s(&dir), "-p", "hi"]), "image");
}

#[test]
fn prompt_longer_than_context() {
    let imgs: Vec<String> = (0..3).map(|i| s(&support::image(i))).collect();
    let out = run_tiny(&["--image", &imgs[0], "--image", &imgs[1], "--image", &imgs[2], "-p", "hi", "-c", "128"]);
    assert_fails_with(&out, "but the context holds 128");
}

#[test]
fn n_predict_below_minus_one() {
    assert_fails_with(&run_tiny(&["-p", "hi", "-n", "-2"]), "-n/--n-predict");
}

#[test]
fn empty_prompt() {
    assert_fails_with(&run_tiny(&["-p", ""]), "prompt is empty");
    assert_fails_with(&run_tiny(&["-p", "   \n"]), "prompt is empty");
}

#[test]
fn marker_count_mismatch() {
    let img = s(&support::image(0));
    assert_fails_with(&run_tiny(&["--image", &img, "-p", "<image> and <image>"]), "2 image marker(s)");
}

#[test]
fn quantized_v_cache_without_flash_attention() {
    assert_fails_with(&run_tiny(&["-p", "hi", "-ctv", "q8_0", "-fa", "off"]), "needs flash attention");
}

#[test]
fn unknown_cache_type_is_a_usage_error() {
    let out = run_tiny(&["-p", "hi", "-ctk", "q3"]);
    assert_eq!(out.status.code(), Some(2), "clap usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown cache type"));
}
