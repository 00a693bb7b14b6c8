//! GGUF files whose metadata contradicts their tensors, models that are not regular files, and
//! out-of-range context sizes: each must be one `csp-llava: error:` line and exit code 1 — never
//! an abort inside llama.cpp (exit 134), a panic, or a hang. The variants are the tiny model with
//! one metadata entry or tensor shape changed ([`GgufWriter::set`], [`GgufWriter::reshape`]).

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use csp_llava::gguf::{tiny, GgufWriter, TensorType, Value};

/// What a run left: exit status and stderr.
struct Run {
    status: ExitStatus,
    stderr: String,
}

/// Runs the binary, killing it (and failing the test) if it has not exited within `limit`.
fn run_within(args: &[&str], limit: Duration) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_csp-llava"))
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary starts");
    let mut pipe = child.stderr.take().expect("stderr is piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = pipe.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("csp-llava {args:?} still running after {limit:?}: it hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run { status, stderr: reader.join().expect("stderr reader") }
}

fn run(args: &[&str]) -> Run {
    run_within(args, Duration::from_secs(120))
}

/// Exit code 1, exactly one stderr line starting `csp-llava: error: ` and containing every
/// needle, no panic.
#[track_caller]
fn assert_refused(r: &Run, needles: &[&str]) {
    assert_refused_with(r, 1, needles);
}

/// As [`assert_refused`], with exit code `code`.
#[track_caller]
fn assert_refused_with(r: &Run, code: i32, needles: &[&str]) {
    let err = &r.stderr;
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(r.status.code(), Some(code), "exit status {:?}, stderr: {err}", r.status);
    let lines: Vec<_> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {err}");
    assert!(lines[0].starts_with("csp-llava: error: "), "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "expected '{n}' in: {err}");
    }
}

fn s(p: &Path) -> String {
    p.to_str().expect("UTF-8 path").to_owned()
}

/// Writes `w` into the scratch directory as `name`.
fn write(w: &GgufWriter, name: &str) -> PathBuf {
    let p = support::scratch().join(name);
    w.write_file(&p).expect("write variant");
    p
}

/// The tiny text model (seed 0) with metadata `key` set to `v`.
fn text_with(key: &str, v: Value, name: &str) -> PathBuf {
    let mut w = tiny::text_model(0);
    w.set(key, v);
    write(&w, name)
}

/// The tiny mmproj (seed 0) with metadata `key` set to `v`.
fn mmproj_with(key: &str, v: Value, name: &str) -> PathBuf {
    let mut w = tiny::mmproj(0);
    w.set(key, v);
    write(&w, name)
}

/// Runs a prompt with one image through `model` and `mmproj`, so that what llama.cpp only
/// checks while encoding an image or decoding is reached too.
fn run_pair(model: &Path, mmproj: &Path, extra: &[&str]) -> Run {
    let (m, p, img) = (s(model), s(mmproj), s(&support::image(0)));
    let mut args = vec!["-m", m.as_str(), "--mmproj", p.as_str(), "--image", img.as_str(), "-p", "hi", "-n", "2"];
    args.extend_from_slice(extra);
    run(&args)
}

fn run_text(model: &Path, extra: &[&str]) -> Run {
    run_pair(model, &support::mmproj(), extra)
}

fn run_mmproj(mmproj: &Path) -> Run {
    run_pair(&support::model(), mmproj, &["-c", "512"])
}

#[test]
fn the_unchanged_tiny_model_still_runs() {
    // the variants below differ from this in one entry only
    let same = write(&tiny::text_model(0), "same-text.gguf");
    let same_proj = write(&tiny::mmproj(0), "same-mmproj.gguf");
    let r = run_pair(&same, &same_proj, &["-c", "512"]);
    assert!(r.status.success(), "{}", r.stderr);
    let cls = write(&tiny::mmproj_with(0, tiny::text::N_EMBD, true), "class-mmproj.gguf");
    let r = run_pair(&same, &cls, &["-c", "512"]);
    assert!(r.status.success(), "{}", r.stderr);
}

#[test]
fn block_count_must_match_the_layers() {
    // 0 and 1,000,000 abort in llama.cpp (GGML_ASSERT n_layer_all > 0 && <= LLAMA_MAX_LAYERS)
    for (n, needle) in [(0, "between 1 and 512"), (1_000_000, "between 1 and 512"), (3, "2 layers"), (1, "2 layers")] {
        let p = text_with("llama.block_count", Value::U32(n), &format!("block-count-{n}.gguf"));
        assert_refused(&run_text(&p, &["-c", "512"]), &["model", "llama.block_count", &n.to_string(), needle]);
    }
}

#[test]
fn trained_context_of_two_to_the_31_or_more() {
    // llama-cpp-2 panics ("n_ctx_train fits into an u32") however small -c is
    let p = text_with("llama.context_length", Value::U32(1 << 31), "ctx-2-31.gguf");
    assert_refused(&run_text(&p, &["-c", "512"]), &["llama.context_length", "2147483648"]);
    let p = text_with("llama.context_length", Value::U64((1 << 32) + 5), "ctx-2-32.gguf");
    assert_refused(&run_text(&p, &["-c", "512"]), &["llama.context_length", "4294967301"]);
}

#[test]
fn context_size_flag_of_two_to_the_31_or_more() {
    // a flag value out of range: one line, and the binary's exit code for flag values (2, a
    // usage error, as main.rs treats every failed `validate()` of the flags)
    let r = run_text(&support::model(), &["-c", "4000000000"]);
    assert_refused_with(&r, 2, &["invalid -c/--ctx-size", "4000000000", "2147483647"]);
}

#[test]
fn text_attention_settings_that_contradict_the_tensors() {
    // 64 / 3 is no head size; 4 query heads cannot share 3 KV heads (ggml_can_mul_mat)
    let p = text_with("llama.attention.head_count", Value::U32(3), "text-heads-3.gguf");
    assert_refused(&run_text(&p, &["-c", "512"]), &["llama.attention.head_count", "3"]);
    let p = text_with("llama.attention.head_count_kv", Value::U32(3), "text-kv-heads-3.gguf");
    assert_refused(&run_text(&p, &["-c", "512"]), &["llama.attention.head_count_kv", "3"]);
    // key and value head sizes must agree (GGML_ASSERT in the llama graph)
    let mut w = tiny::text_model(0);
    w.set("llama.attention.value_length", Value::U32(32));
    let p = write(&w, "text-value-length.gguf");
    assert_refused(&run_text(&p, &["-c", "512"]), &["llama.attention.value_length"]);
    // a negative epsilon is a GGML_ASSERT in ggml's RMS norm
    let p = text_with("llama.attention.layer_norm_rms_epsilon", Value::F32(-1e-5), "text-eps.gguf");
    assert_refused(&run_text(&p, &["-c", "512"]), &["llama.attention.layer_norm_rms_epsilon"]);
    // an unknown RoPE scaling type is a GGML_ASSERT in load_hparams
    let p = text_with("llama.rope.scaling.type", Value::String("sideways".into()), "text-rope-type.gguf");
    assert_refused(&run_text(&p, &["-c", "512"]), &["llama.rope.scaling.type", "sideways"]);
}

#[test]
fn text_tensors_that_contradict_the_metadata() {
    // a transposed attention matrix
    let mut w = tiny::text_model(0);
    w.reshape("blk.1.attn_k.weight", &[32, 64]);
    let p = write(&w, "text-attn-k-transposed.gguf");
    assert_refused(&run_text(&p, &["-c", "512"]), &["blk.1.attn_k.weight", "[32, 64]", "[64, 32]"]);
    // an F16 norm: ggml's CPU add/mul cannot combine f32 activations with f16 weights (abort)
    let mut w = tiny::text_model(0);
    w.remove_tensor("blk.0.attn_norm.weight").tensor("blk.0.attn_norm.weight", &[64], TensorType::F16, &[1.0; 64]);
    let p = write(&w, "text-f16-norm.gguf");
    assert_refused(&run_text(&p, &["-c", "512"]), &["blk.0.attn_norm.weight", "F32"]);
}

#[test]
fn duplicate_vocabulary_entries() {
    // GGML_ASSERT(id_to_token.size() == token_to_id.size()) in llama-vocab.cpp
    let mut w = tiny::text_model(0);
    let h = {
        let p = write(&w, "dup-probe.gguf");
        csp_llava::gguf::GgufHeader::read(&p).unwrap()
    };
    let Value::Array(mut tokens) = h.kv["tokenizer.ggml.tokens"].clone() else { panic!("tokens") };
    tokens[300] = tokens[299].clone();
    w.set("tokenizer.ggml.tokens", Value::Array(tokens));
    let p = write(&w, "text-dup-token.gguf");
    assert_refused(&run_text(&p, &["-c", "512"]), &["tokenizer.ggml.tokens", "299", "300"]);
}

#[test]
fn projector_head_count_zero_or_not_dividing_the_width() {
    for n in [0, 3] {
        let p = mmproj_with("clip.vision.attention.head_count", Value::U32(n), &format!("mmproj-heads-{n}.gguf"));
        assert_refused(&run_mmproj(&p), &["mmproj", "clip.vision.attention.head_count", &n.to_string()]);
    }
}

#[test]
fn projector_width_other_than_the_tensors() {
    let p = mmproj_with("clip.vision.embedding_length", Value::U32(48), "mmproj-width-key-48.gguf");
    assert_refused(&run_mmproj(&p), &["clip.vision.embedding_length", "48", "v.patch_embd.weight"]);
}

#[test]
fn projector_image_and_patch_sizes() {
    let p = mmproj_with("clip.vision.image_size", Value::U32(0), "mmproj-image-0.gguf");
    assert_refused(&run_mmproj(&p), &["clip.vision.image_size", "0"]);
    for n in [7, 1000] {
        let p = mmproj_with("clip.vision.patch_size", Value::U32(n), &format!("mmproj-patch-{n}.gguf"));
        assert_refused(&run_mmproj(&p), &["clip.vision.patch_size", &n.to_string(), "v.patch_embd.weight"]);
    }
    // a valid patch grid, but 16 positions where the position embedding has 64
    let p = mmproj_with("clip.vision.image_size", Value::U32(32), "mmproj-image-32.gguf");
    assert_refused(&run_mmproj(&p), &["v.position_embd.weight", "16"]);
}

#[test]
fn projector_negative_epsilon() {
    // a GGML_ASSERT in ggml's layer norm while encoding
    let p = mmproj_with("clip.vision.attention.layer_norm_epsilon", Value::F32(-1.0), "mmproj-eps.gguf");
    assert_refused(&run_mmproj(&p), &["clip.vision.attention.layer_norm_epsilon", "-1"]);
}

#[test]
fn projector_block_count() {
    for n in [0, 3, 1_000_000] {
        let p = mmproj_with("clip.vision.block_count", Value::U32(n), &format!("mmproj-blocks-{n}.gguf"));
        assert_refused(&run_mmproj(&p), &["clip.vision.block_count", &n.to_string()]);
    }
}

#[test]
fn projector_matrices_transposed_or_missing() {
    let mut w = tiny::mmproj(0);
    w.reshape("mm.0.weight", &[64, 32]);
    let p = write(&w, "mmproj-mm0-transposed.gguf");
    assert_refused(&run_mmproj(&p), &["mm.0.weight", "[64, 32]"]);
    let mut w = tiny::mmproj(0);
    w.reshape("v.blk.0.ffn_up.weight", &[64, 32]);
    let p = write(&w, "mmproj-ffn-up-transposed.gguf");
    assert_refused(&run_mmproj(&p), &["v.blk.0.ffn_up.weight", "[64, 32]"]);
    // the last layer is not run by the mlp projector (it takes the second-to-last layer's
    // output), so llama.cpp does not care about its shapes and neither does csp-llava
    let mut w = tiny::mmproj(0);
    w.reshape("v.blk.1.ffn_up.weight", &[64, 32]);
    let p = write(&w, "mmproj-last-layer-unused.gguf");
    let r = run_mmproj(&p);
    assert!(r.status.success(), "{}", r.stderr);
    // llama.cpp reads mm.2.weight's width unconditionally and adds mm.2.bias unchecked
    for t in ["mm.2.bias", "mm.2.weight", "v.blk.0.attn_q.weight", "v.position_embd.weight"] {
        let mut w = tiny::mmproj(0);
        w.remove_tensor(t);
        let p = write(&w, &format!("mmproj-without-{t}.gguf"));
        assert_refused(&run_mmproj(&p), &[t]);
    }
}

#[cfg(unix)]
fn fifo(name: &str) -> PathBuf {
    let p = support::scratch().join(name);
    if !p.exists() {
        let ok = Command::new("mkfifo").arg(&p).status().expect("mkfifo runs").success();
        assert!(ok, "mkfifo {}", p.display());
    }
    p
}

#[cfg(unix)]
#[test]
fn a_fifo_or_a_device_as_model_or_projector() {
    let (m, p) = (s(&support::model()), s(&support::mmproj()));
    let fast = Duration::from_secs(30);
    let f = s(&fifo("model.fifo"));
    let r = run_within(&["-m", &f, "--mmproj", &p, "-p", "hi"], fast);
    assert_refused(&r, &["model", "model.fifo", "not a regular file"]);
    let f = s(&fifo("mmproj.fifo"));
    let r = run_within(&["-m", &m, "--mmproj", &f, "-p", "hi"], fast);
    assert_refused(&r, &["mmproj", "mmproj.fifo", "not a regular file"]);
    let r = run_within(&["-m", "/dev/zero", "--mmproj", &p, "-p", "hi"], fast);
    assert_refused(&r, &["model", "/dev/zero", "not a regular file"]);
    let r = run_within(&["-m", &m, "--mmproj", "/dev/zero", "-p", "hi"], fast);
    assert_refused(&r, &["mmproj", "/dev/zero", "not a regular file"]);
    let dir = s(support::scratch());
    let r = run_within(&["-m", &dir, "--mmproj", &p, "-p", "hi"], fast);
    assert_refused(&r, &["model", "a directory"]);
}
