//! `gen-model`: random-weight models in real shapes, and the memory plan (`--dry-run`,
//! `--kv-max-cells auto`) llama.cpp gives for them. The test writes 2 layers of LLaVA-1.5-7B's
//! width (0.45 GB Q4_0 text model, 0.6 GB F16 CLIP ViT-L/14-336 mmproj) into a temporary
//! directory, checks every tensor's shape and type against the 7B's, plans, and answers one
//! question about one image with it (576 image tokens through llama.cpp).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use csp_llava::gguf::GgufHeader;

fn csp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_csp-llava")).args(args).output().expect("csp-llava runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The two files, written once per test process.
fn model() -> &'static (PathBuf, PathBuf, tempfile::TempDir) {
    static M: std::sync::OnceLock<(PathBuf, PathBuf, tempfile::TempDir)> = std::sync::OnceLock::new();
    M.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let out = csp(&["gen-model", d, "--shape", "llava-1.5-7b", "--quant", "q4_0", "--layers", "2"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let files: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout).lines().map(PathBuf::from).collect();
        assert_eq!(files.len(), 2, "two paths on stdout");
        assert!(files[0].to_str().unwrap().contains("text") && files[1].to_str().unwrap().contains("mmproj"));
        (files[0].clone(), files[1].clone(), dir)
    })
}

fn bytes(ty: u32, n: u64) -> u64 {
    match ty {
        0 => 4 * n,
        1 => 2 * n,
        2 => n / 32 * 18,
        8 => n / 32 * 34,
        _ => panic!("type {ty}"),
    }
}

#[test]
fn the_7b_shape_is_written_with_its_tensor_sizes() {
    let (text, mmproj, _) = model();
    let h = GgufHeader::read(text).unwrap();
    assert_eq!(h.get_u64("llama.embedding_length"), Some(4096));
    assert_eq!(h.get_u64("llama.feed_forward_length"), Some(11008));
    assert_eq!(h.get_u64("llama.attention.head_count"), Some(32));
    assert_eq!(h.get_u64("llama.block_count"), Some(2));
    let t = |n: &str| h.tensor(n).unwrap_or_else(|| panic!("{n}"));
    assert_eq!((t("token_embd.weight").ne.clone(), t("token_embd.weight").ggml_type), (vec![4096, 32000], 2));
    assert_eq!((t("output.weight").ne.clone(), t("output.weight").ggml_type), (vec![4096, 32000], 8));
    for i in 0..2 {
        for (n, ne) in [
            ("attn_q", [4096, 4096]),
            ("attn_k", [4096, 4096]),
            ("attn_v", [4096, 4096]),
            ("attn_output", [4096, 4096]),
            ("ffn_gate", [4096, 11008]),
            ("ffn_up", [4096, 11008]),
            ("ffn_down", [11008, 4096]),
        ] {
            let x = t(&format!("blk.{i}.{n}.weight"));
            assert_eq!((x.ne.as_slice(), x.ggml_type), (&ne[..], 2), "blk.{i}.{n}");
        }
    }
    // the data section holds exactly the tensors (each padded to 32 bytes)
    let data: u64 = h.tensors.iter().map(|x| bytes(x.ggml_type, x.ne.iter().product()).next_multiple_of(32)).sum();
    assert_eq!(std::fs::metadata(text).unwrap().len(), h.data_start + data);
    let m = GgufHeader::read(mmproj).unwrap();
    assert_eq!(m.get_u64("clip.vision.image_size"), Some(336));
    assert_eq!(m.get_u64("clip.vision.block_count"), Some(23));
    assert_eq!(m.tensor("mm.2.weight").unwrap().ne, vec![4096, 4096]);
    assert_eq!(m.tensor("v.position_embd.weight").unwrap().ne, vec![1024, 577]);
    // an unknown shape is refused with the known ones, and nothing is written
    let out = csp(&["gen-model", "/tmp/never-written", "--shape", "llava-1.5-70b"]);
    assert!(!out.status.success() && stderr(&out).contains("gemma3-4b") && stderr(&out).contains("qwen2.5-vl-7b"), "{}", stderr(&out));
    assert!(!Path::new("/tmp/never-written").exists());
}

#[test]
fn the_plan_is_llama_cpps_and_auto_caps_fit_the_budget() {
    let (text, mmproj, _) = model();
    let img = support::image(0);
    let mut args: Vec<String> = [
        "-m",
        text.to_str().unwrap(),
        "--mmproj",
        mmproj.to_str().unwrap(),
        "-p",
        "Describe the images.",
        "-n",
        "16",
        "-ngl",
        "0",
        "--dry-run",
        "--json",
        "--mem",
        "1200MiB",
        "--kv-max-cells",
        "auto",
    ]
    .map(String::from)
    .to_vec();
    for _ in 0..8 {
        args.extend(["--image".into(), img.to_str().unwrap().into()]);
    }
    let out = csp(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["need"]["tokens_per_image"], 576);
    assert_eq!(v["need"]["n_images"], 8);
    let full = &v["full"];
    let n_ctx = full["n_ctx"].as_u64().unwrap();
    assert!(n_ctx >= 8 * 576 + 16 && n_ctx % 256 == 0, "{full}");
    // f16 K and V: 2 layers × 4096 × 2 bytes each, per cell
    assert_eq!(full["llama"]["context_host"].as_u64().unwrap(), n_ctx * 2 * 2 * 4096 * 2, "{full}");
    let weights = full["llama"]["model_host"].as_u64().unwrap();
    let file = std::fs::metadata(text).unwrap().len();
    assert!(weights <= file && weights > file * 99 / 100, "weights {weights} of a {file}-byte file");
    assert!(full["llama"]["compute_host"].as_u64().unwrap() > 0);
    // the auto cap: a multiple of 256 within 1200 MiB (below the trained context: memory binds), and 256 more cells would not fit
    let cap = &v["capped"];
    let total = |p: &serde_json::Value| ["model_host", "context_host", "compute_host"].iter().map(|k| p["llama"][k].as_u64().unwrap()).sum::<u64>() + p["mmproj_weights"].as_u64().unwrap();
    assert!(total(cap) <= 1200 << 20, "{cap}");
    let cells = cap["n_ctx"].as_u64().unwrap();
    assert!(cells % 256 == 0 && cells < n_ctx, "{cap}");
    assert_eq!(v["largest_cap"].as_u64(), Some(cells));
    let per_cell = 2 * 2 * 4096 * 2;
    assert!(total(cap) + 256 * per_cell > 1200 << 20, "256 more cells would fit: {cap}");

    // the table says the same in words; a budget below the weights is a clear error
    let plain: Vec<&str> = args.iter().map(String::as_str).filter(|a| *a != "--json").collect();
    let out = csp(&plain);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("| full |") && table.contains("capped") && table.contains("not planned"), "{table}");
    let mut tiny_budget = plain.clone();
    let i = tiny_budget.iter().position(|a| *a == "1200MiB").unwrap();
    tiny_budget[i] = "512MiB";
    tiny_budget.retain(|a| *a != "--dry-run");
    let out = csp(&tiny_budget);
    assert!(!out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("nothing fits in 512.0 MiB"), "{}", stderr(&out));
    let bad = csp(&["--mem", "8 parsecs", "-p", "x"]);
    assert!(!bad.status.success() && stderr(&bad).contains("unknown unit"), "{}", stderr(&bad));
}

#[test]
fn llama_cpp_runs_the_7b_width() {
    let (text, mmproj, _) = model();
    let img = support::image(1);
    let out = csp(&["-m", text.to_str().unwrap(), "--mmproj", mmproj.to_str().unwrap(), "--image", img.to_str().unwrap(), "-p", "What is it?", "-n", "4", "-ngl", "0", "--no-mmap", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["n_prompt_tokens"].as_u64().unwrap() > 576, "{v}");
    assert_eq!(v["n_generated"].as_u64(), Some(4), "{v}");
}
