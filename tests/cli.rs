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

/// PrefixKV without its calibrated profile runs, with one warning line that says what to do.
#[test]
fn prefixkv_without_a_profile_warns() {
    let img = s(&support::image(0));
    let out = run_tiny(&["--image", &img, "-p", "What is this?", "--kv-policy", "prefixkv", "-n", "2", "-c", "512"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(err.matches("without --prefixkv-profile").count(), 1, "{err}");
    assert!(err.contains("csp-llava calibrate"), "{err}");
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

#[test]
fn llama_cpp_multi_letter_flags() {
    // -sys is the system prompt (not -s ys), as in llama.cpp
    let with = |flag: &str| {
        let out = run_tiny(&["-p", "hi", flag, "Answer briefly.", "-n", "1", "--json", "-c", "512"]);
        assert!(out.status.success(), "{flag}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["n_prompt_tokens"].as_u64().unwrap()
    };
    let plain = run_tiny(&["-p", "hi", "-n", "1", "--json", "-c", "512"]);
    let plain = serde_json::from_slice::<serde_json::Value>(&plain.stdout).unwrap()["n_prompt_tokens"].as_u64().unwrap();
    assert_eq!(with("-sys"), with("--system"));
    assert!(with("-sys") > plain);
    // llama.cpp flags csp-llava lacks: one line, exit 2, whatever else is on the line
    for args in [&["-i"][..], &["-p", "hi", "-if"], &["-dev", "CUDA0"], &["-ot", "exps=CPU"], &["--no-mmproj-offload"], &["-p", "x", "--mlock"]] {
        let out = run_tiny(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("csp-llava: error: csp-llava does not support ") && err.trim_end().ends_with("(yet)"), "{err}");
    }
    // -cnv / -no-cnv are csp-llava's chat switches: -no-cnv with -p is the one-shot answer
    let out = run_tiny(&["-p", "hi", "-no-cnv", "-n", "1", "-c", "512"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // as a prompt, such a flag is just text
    let out = run_tiny(&["-p", "-cnv", "-n", "1", "-c", "512"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn json_of(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn pruning_saves_memory_by_default() {
    let imgs: Vec<String> = (0..3).map(|i| s(&support::image(i))).collect();
    let base = ["--image", imgs[0].as_str(), "--image", &imgs[1], "--image", &imgs[2], "-p", "Compare the images.", "-n", "8", "--temp", "0", "--ignore-eos", "--json"];
    let args = |extra: &[&'static str]| base.iter().copied().chain(extra.iter().copied()).collect::<Vec<_>>();
    let full = json_of(&run_tiny(&args(&[])));
    let n_ctx_train = full["n_ctx_train"].as_u64().unwrap();
    // no pruning: llama.cpp's -c 0, the trained context
    assert_eq!(full["kv_cells_allocated"].as_u64().unwrap(), n_ctx_train);
    let csp = json_of(&run_tiny(&args(&["--kv-policy", "csp", "--kv-budget", "0.2"])));
    let (kept, alloc) = (csp["kv_cells_after"].as_u64().unwrap(), csp["kv_cells_allocated"].as_u64().unwrap());
    assert!(csp["pruned"].as_bool().unwrap());
    // the kept cells + -n (8), and llama.cpp's padding of the buffer to 256 cells
    assert!(alloc >= kept + 8 && alloc <= (kept + 8).next_multiple_of(256), "kept {kept}, allocated {alloc}");
    assert!(csp["kv_bytes_allocated"].as_u64() < full["kv_bytes_allocated"].as_u64());
    // the buffer the prompt was read into was sized to the prompt, not the trained context
    let peak = csp["kv_bytes_allocated_peak"].as_u64().unwrap();
    assert!(peak < full["kv_bytes_allocated"].as_u64().unwrap(), "{peak}");
    // the same text as keeping the old buffer
    let kept_buffer = json_of(&run_tiny(&args(&["--kv-policy", "csp", "--kv-budget", "0.2", "--no-kv-shrink"])));
    assert_eq!(kept_buffer["kv_cells_allocated"].as_u64().unwrap(), n_ctx_train);
    assert_eq!(kept_buffer["text"], csp["text"]);
    // an explicit -c is respected
    let c = json_of(&run_tiny(&args(&["--kv-policy", "csp", "--kv-budget", "0.2", "-c", "1024"])));
    assert_eq!(c["kv_cells_allocated"], 1024);
    // --kv-reserve sets the room after the kept cells
    let r = json_of(&run_tiny(&args(&["--kv-policy", "csp", "--kv-budget", "0.2", "--kv-reserve", "300"])));
    assert!(r["kv_cells_allocated"].as_u64().unwrap() >= kept + 300);
}

#[test]
fn json_reports_ttft_rss_and_device() {
    let img = s(&support::image(0));
    let v = json_of(&run_tiny(&["--image", &img, "-p", "hi", "-n", "2", "--json", "-c", "512", "--kv-policy", "csp"]));
    let ttft = v["ttft_ms"].as_f64().unwrap();
    let parts = v["encode_ms"].as_f64().unwrap() + v["prefill_ms"].as_f64().unwrap();
    assert!(ttft >= parts * 0.99 && ttft > 0.0, "ttft {ttft} < encode + prefill {parts}");
    assert!(v["peak_rss_bytes"].as_u64().unwrap() > 10 << 20);
    assert!(!v["backend"].as_str().unwrap().is_empty());
    assert!(v.get("device").is_some());
    // the timing line says the same
    let out = run_tiny(&["--image", &img, "-p", "hi", "-n", "2", "-c", "512"]);
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().last().unwrap();
    for field in ["TTFT ", "encode ", "prefill ", "gen ", "KV ", "buffer ", "RSS ", "flash-attn "] {
        assert!(line.contains(field), "{field} missing in: {line}");
    }
}

#[test]
fn ctrl_c_stops_generation_prints_the_timing_line_and_exits_130() {
    let img = s(&support::image(0));
    let (m, p) = (s(&support::model()), s(&support::mmproj()));
    let child = Command::new(env!("CARGO_BIN_EXE_csp-llava"))
        .args(["-m", &m, "--mmproj", &p, "--image", &img, "-p", "hello", "-n", "-1", "--ignore-eos", "-c", "100000", "--temp", "0", "-t", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let sent = std::time::Instant::now();
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let took = sent.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(took < std::time::Duration::from_millis(1500), "stopped after {took:?}");
    assert!(!out.stdout.is_empty(), "what was generated is printed");
    assert!(err.contains("TTFT") && err.contains("interrupted"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Runs `csp-llava ARGS` with the tiny model, `input` on a piped standard input.
fn chat_tiny(args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let (m, p) = (s(&support::model()), s(&support::mmproj()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_csp-llava"))
        .args(args)
        .args(["-m", m.as_str(), "--mmproj", p.as_str(), "-n", "4", "--temp", "0", "-c", "1024"])
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("binary runs");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn chat_reads_questions_and_commands_from_a_pipe() {
    let (i0, i1) = (s(&support::image(0)), s(&support::image(1)));
    let out = chat_tiny(&["chat", "--image", &i0, "--image", &i1, "--kv-policy", "csp"], "Which image is red?\n/stats\nAnd the other one?\n/quit\nnever read\n");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"));
    // pruned once, two answers (one line each), the stats line between them
    assert_eq!(stderr.matches("images read and pruned").count(), 1, "{stderr}");
    assert_eq!(stderr.matches("question tokens").count(), 2, "{stderr}");
    assert!(stderr.contains("[2 images, 1 turns; cache"), "{stderr}");
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    // -cnv is the same chat; -p asks the first question
    let out = chat_tiny(&["-cnv", "--image", &i0, "-p", "Colour?"], "Shape?\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stderr).matches("question tokens").count(), 2);
}

#[test]
fn chat_errors_are_one_line_each_and_fail_the_script() {
    let i0 = s(&support::image(0));
    let out = chat_tiny(&["chat", "--image", &i0], "/bogus\nColour?\n/image\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("csp-llava: error: unknown command /bogus"), "{stderr}");
    assert!(stderr.contains("csp-llava: error: /image needs a file"), "{stderr}");
    assert!(stderr.contains("question tokens"), "the question between them was answered: {stderr}");
    // without a terminal and without -p, the one-shot command keeps its one-line error
    let out = chat_tiny(&["--image", &i0], "");
    assert_fails_with(&out, "missing prompt");
}

#[test]
fn a_chat_saved_by_one_process_continues_in_another() {
    let dir = tempfile::tempdir().unwrap();
    let file = s(&dir.path().join("c.chat"));
    let (i0, i1) = (s(&support::image(0)), s(&support::image(1)));
    let first = chat_tiny(&["chat", "--image", &i0, "--image", &i1, "--kv-policy", "csp"], &format!("Which is red?\n/save {file}\nAnd blue?\n"));
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let second = chat_tiny(&["chat"], &format!("/load {file}\nAnd blue?\n"));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{stderr}");
    assert!(stderr.contains("[loaded") && stderr.contains("1 turns"), "{stderr}");
    let last = |o: &Output| String::from_utf8_lossy(&o.stdout).lines().last().unwrap_or_default().to_owned();
    assert_eq!(last(&second), last(&first), "the same next answer");
    let bad = chat_tiny(&["chat"], &format!("/load {}\n", s(&support::image(0))));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a csp-llava chat file"));
    assert!(!bad.status.success());
}
