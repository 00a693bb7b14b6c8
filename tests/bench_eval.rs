//! `csp-llava bench` and `csp-llava eval` on the tiny model: their outputs parse and hold the
//! rows and metrics they promise.

mod support;

use std::process::{Command, Output};

fn csp(args: &[&str]) -> Output {
    let (m, p) = (support::model(), support::mmproj());
    let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    a.extend(["-m".into(), m.to_str().unwrap().into(), "--mmproj".into(), p.to_str().unwrap().into(), "-t".into(), "1".into()]);
    Command::new(env!("CARGO_BIN_EXE_csp-llava")).args(&a).env_remove("RUST_LOG").output().unwrap()
}

#[test]
fn bench_rows_and_formats() {
    let plot = support::scratch().join("bench.svg");
    let out = csp(&["bench", "--images", "1,2", "-r", "2", "-n", "4", "--kv-policy", "csp,streaming", "--kv-budget", "0.2,0.5", "-o", "json", "--plot", plot.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let prov = &doc["provenance"];
    for key in ["version", "commit", "model", "model_bytes", "device", "cpu", "threads", "n_gpu_layers", "flash_attn", "type_k", "type_v"] {
        assert!(prov.get(key).is_some(), "provenance.{key}: {prov}");
    }
    assert!(prov["model_bytes"].as_u64().unwrap() > 0);
    let rows: Vec<serde_json::Value> = serde_json::from_value(doc["rows"].clone()).expect("rows");
    // per image count: reference, full (fa off), 2 policies × 2 budgets
    assert_eq!(rows.len(), 2 * (2 + 4));
    for n in [1, 2] {
        let group: Vec<&serde_json::Value> = rows.iter().filter(|r| r["n_images"] == n).collect();
        let reference: Vec<_> = group.iter().filter(|r| r["reference"] == true).collect();
        assert_eq!(reference.len(), 1, "one reference row per image count");
        assert_eq!(reference[0]["ratio_decode"], 1.0);
        assert_eq!(reference[0]["ratio_ttft"], 1.0);
        assert_eq!(reference[0]["ratio_prefill"], 1.0);
        // every row, the reference included, times its image encoding apart from the prefill,
        // and its time to first token covers both
        for r in &group {
            let (enc, pre, ttft) = (r["encode_ms"]["median"].as_f64().unwrap(), r["prefill_ms"]["median"].as_f64().unwrap(), r["ttft_ms"]["median"].as_f64().unwrap());
            assert!(enc > 0.0, "{} encodes {n} image(s) in {enc} ms", r["policy"]);
            assert!(ttft >= enc + pre, "{}: ttft {ttft} < encode {enc} + prefill {pre}", r["policy"]);
            let t = &r["ttft_ms"];
            assert!(t["min"].as_f64().unwrap() <= t["median"].as_f64().unwrap() && t["median"].as_f64().unwrap() <= t["max"].as_f64().unwrap());
            // llama-bench's mean ± sd with the raw samples, one per measured repetition
            let samples: Vec<f64> = t["samples"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert_eq!(samples.len(), 2);
            assert!((t["mean"].as_f64().unwrap() - (samples[0] + samples[1]) / 2.0).abs() < 1e-9);
            assert!((t["sd"].as_f64().unwrap() - (samples[0] - samples[1]).abs() / 2f64.sqrt()).abs() < 1e-9);
        }
        let full = group.iter().find(|r| r["policy"] == "full").expect("full row");
        assert_eq!(full["flash_attn"], "off");
        let l = full["n_prompt_tokens"].as_u64().unwrap();
        for r in group.iter().filter(|r| r["policy"] == "csp") {
            let b: f64 = r["kv_budget"].as_str().unwrap().parse().unwrap();
            assert_eq!(r["kv_cells"].as_u64().unwrap(), (b * l as f64).floor() as u64);
            assert!(r["ratio_kv_bytes"].as_f64().unwrap() < 0.6);
            assert_eq!(r["reps"], 2);
            let d = &r["decode_tok_s"];
            assert!(d["min"].as_f64().unwrap() <= d["median"].as_f64().unwrap() && d["median"].as_f64().unwrap() <= d["max"].as_f64().unwrap());
        }
        for key in ["encode_ms", "prefill_ms", "ttft_ms", "ratio_ttft", "prefill_tok_s", "score_ms", "evict_ms", "decode_tok_s", "kv_cells", "kv_bytes", "kv_bytes_allocated", "peak_rss_bytes", "ratio_prefill", "ratio_decode", "ratio_kv_bytes"] {
            assert!(group.iter().all(|r| r.get(key).is_some()), "{key}");
        }
    }
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline"));
    // plotters: axis labels, a legend, the caption with the model and machine
    for text in ["kept fraction of the prompt", "decode tok/s", "KV bytes", "reference (llama.cpp, full)", "csp", "streaming", "tiny-text.gguf", "2 image(s)"] {
        assert!(svg.contains(text), "{text} in the plot");
    }

    let out = csp(&["bench", "--images", "1", "-r", "1", "-n", "2", "--kv-policy", "random", "--kv-budget", "0.5", "-o", "jsonl"]);
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4, "provenance, then 3 rows");
    assert!(lines[0].get("provenance").is_some());
    let out = csp(&["bench", "--images", "1", "-r", "1", "-n", "2", "--kv-policy", "random", "--kv-budget", "0.5", "-o", "sql"]);
    let sql = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(sql.starts_with("CREATE TABLE IF NOT EXISTS csp_llava_bench ("), "{sql}");
    assert_eq!(sql.matches("INSERT INTO csp_llava_bench VALUES (").count(), 3);
    assert!(String::from_utf8_lossy(&out.stderr).contains("bench: 6 runs"), "the run count before it starts");
    let out = csp(&["bench", "--images", "1", "-r", "1", "-n", "2", "--kv-policy", "random", "--kv-budget", "0.5", "-o", "csv"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let header_cols = text.lines().next().unwrap().split(',').count();
    assert_eq!(text.lines().count(), 4);
    assert!(text.lines().all(|l| l.split(',').count() == header_cols));
    let out = csp(&["bench", "--images", "1", "-r", "1", "-n", "2", "--kv-policy", "random", "--kv-budget", "0.5"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("| reference |"));
}

fn write_cases(name: &str, lines: &[String]) -> std::path::PathBuf {
    let dir = support::scratch().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..4 {
        std::fs::copy(support::image(i), dir.join(format!("img-{i}.png"))).unwrap();
    }
    let p = dir.join("cases.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

#[test]
fn eval_summary_failures_and_resume() {
    let data = write_cases(
        "eval1",
        &[
            r#"{"id": 1, "images": ["img-0.png", "img-1.png"], "prompt": "Which image shows a circle?", "answer": "first"}"#.into(),
            r#"{"id": "two", "images": ["img-2.png", "img-3.png", "img-0.png"], "prompt": "What colour is image 2?"}"#.into(),
            r#"{"id": 3, "images": ["no-such.png"], "prompt": "x"}"#.into(),
        ],
    );
    let cases_out = data.with_file_name("out.jsonl");
    let args = ["eval", "--data", data.to_str().unwrap(), "-n", "8", "--kv-policy", "full,csp,snapkv", "--kv-budget", "0.2", "-o", "json", "--cases-out", cases_out.to_str().unwrap()];
    let out = csp(&args);
    assert!(!out.status.success(), "a failed case makes the exit code non-zero");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("case 3 failed") && !err.contains("panicked"), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
    assert_eq!(v["failed"], 1);
    let summary = v["summary"].as_array().unwrap();
    assert_eq!(summary.len(), 3);
    let full = &summary[0];
    assert_eq!(full["policy"], "full");
    assert_eq!(full["n_cases"], 2);
    assert_eq!(full["kl"], 0.0);
    assert_eq!(full["top1_agreement"], 1.0);
    assert_eq!(full["rouge_l"], 1.0);
    assert!(full["accuracy"].is_number(), "one case has an answer");
    for row in summary {
        for key in ["policy", "budget", "n_cases", "kl", "top1_agreement", "rouge_l", "accuracy", "contains"] {
            assert!(row.get(key).is_some(), "{key}");
        }
    }
    let csp_row = summary.iter().find(|r| r["policy"] == "csp").unwrap();
    assert_eq!(csp_row["budget"], "0.2");
    assert!(csp_row["kl"].as_f64().unwrap() > 0.0, "pruning 80% of the cache moves the distribution");
    let lines_before = std::fs::read_to_string(&cases_out).unwrap().lines().count();
    assert_eq!(lines_before, 3);

    // resume: the two good cases are not run again, the failed one is retried — and replaces
    // its earlier line (one line per case: no duplicates, issue 13)
    let out = csp(&[&args[..], &["--resume"]].concat());
    assert!(!out.status.success());
    let text = std::fs::read_to_string(&cases_out).unwrap();
    assert_eq!(text.lines().count(), 3);
    assert_eq!(text.lines().filter(|l| l.contains("\"ok\":true")).count(), 2);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["summary"][0]["n_cases"], 2);
}

#[test]
fn eval_with_the_question_after_pruning() {
    let data = write_cases("eval3", &[r#"{"id": "q", "images": ["img-1.png", "img-2.png", "img-3.png", "img-0.png"], "prompt": "Which image has a circle?", "answer": "first"}"#.into()]);
    let out = csp(&["eval", "--data", data.to_str().unwrap(), "-n", "6", "--kv-policy", "full,csp,streaming", "--kv-budget", "0.1,1.0", "--question-after-pruning", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for row in v["summary"].as_array().unwrap() {
        let kl = row["kl"].as_f64().unwrap();
        if row["budget"] == "0.1" {
            // the question is read from a cache holding a tenth of the images' tokens
            assert!(kl > 0.0, "{row}");
            assert!(row["kv_cells_after"].as_f64().unwrap() < 40.0, "{row}");
        } else {
            assert_eq!(kl, 0.0, "{row}");
            assert_eq!(row["top1_agreement"], 1.0);
        }
    }
}

#[test]
fn eval_at_budget_one_matches_the_full_cache() {
    let data = write_cases("eval2", &[r#"{"id": "a", "images": ["img-1.png", "img-2.png", "img-3.png"], "prompt": "Compare the shapes."}"#.into()]);
    let out = csp(&["eval", "--data", data.to_str().unwrap(), "-n", "8", "--kv-policy", "csp,h2o,snapkv,streaming,random", "--kv-budget", "1.0", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for row in v["summary"].as_array().unwrap() {
        assert_eq!(row["kl"], 0.0, "{row}");
        assert_eq!(row["top1_agreement"], 1.0);
        assert_eq!(row["rouge_l"], 1.0);
        assert!(row["accuracy"].is_null(), "no answers: accuracy does not apply");
    }
}

#[test]
fn eval_asks_several_questions_of_one_pruned_cache() {
    let data = write_cases(
        "eval-multi",
        &[r#"{"id": "m", "images": ["img-1.png", "img-2.png", "img-3.png"], "questions": [{"prompt": "In image 1, what shape is it?", "answer": "circle"}, {"prompt": "Describe each image.", "answer": "Image 1: red circle. Image 2: blue square. Image 3: red circle."}, {"prompt": "How many images are there?", "answer": "3"}]}"#.into()],
    );
    let cases_out = data.with_file_name("out.jsonl");
    let out = csp(&["eval", "--data", data.to_str().unwrap(), "-n", "6", "--kv-policy", "full,csp,h2o", "--kv-budget", "0.5", "-o", "json", "--cases-out", cases_out.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["protocol"], "multi-question");
    let line: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&cases_out).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(line["full_answers"].as_array().unwrap().len(), 3, "{line}");
    let results = line["results"].as_array().unwrap();
    assert_eq!(results.len(), 3 * 3, "three policies × three questions");
    for q in 0..3u64 {
        let of_q: Vec<&serde_json::Value> = results.iter().filter(|r| r["question"].as_u64().unwrap_or(0) == q).collect();
        assert_eq!(of_q.len(), 3, "question {q}");
        let full = of_q.iter().find(|r| r["policy"] == "full").unwrap();
        // the full cache answers each question as its own reference
        assert_eq!(full["kl"], 0.0, "{full}");
        assert_eq!(full["prediction"], line["full_answers"][q as usize]);
        // only the enumeration has a per-image accuracy; every question a perplexity
        assert_eq!(full["per_image_accuracy"].is_null(), q != 1, "{full}");
        assert!(full["perplexity"].as_f64().unwrap() >= 1.0, "{full}");
    }
    // pruned once, asked three times: the cells kept are the same for every question
    let kept: Vec<u64> = results.iter().filter(|r| r["policy"] == "csp").map(|r| r["kv_cells_after"].as_u64().unwrap()).collect();
    assert!(kept.windows(2).all(|w| w[0] == w[1]), "{kept:?}");
    // paired comparisons: every policy against full and each other, over the 3 questions
    let paired = v["paired"].as_array().unwrap();
    let find = |a: &str, b: &str, m: &str| paired.iter().find(|p| p["a"] == a && p["b"] == b && p["metric"] == m).unwrap_or_else(|| panic!("{a} vs {b} {m}: {paired:?}"));
    let p = find("csp", "full", "accuracy");
    assert_eq!(p["n"], 3);
    assert_eq!(p["budget"], "0.5");
    assert_eq!(p["wins_a"].as_u64().unwrap() + p["wins_b"].as_u64().unwrap() + p["ties"].as_u64().unwrap(), 3);
    assert_eq!(find("csp", "h2o", "kl")["n"], 3);
    assert_eq!(find("h2o", "full", "per_image_accuracy")["n"], 1);
    // markdown names the protocol and shows the paired table
    let md = csp(&["eval", "--data", data.to_str().unwrap(), "-n", "4", "--kv-policy", "full,csp", "--kv-budget", "0.5"]);
    let text = String::from_utf8_lossy(&md.stdout);
    assert!(text.starts_with("Protocol: multi-question"), "{text}");
    assert!(text.contains("| csp | full | 0.5 | accuracy | 3 |"), "{text}");
}

#[test]
fn eval_refuses_malformed_multi_question_cases() {
    let data = write_cases(
        "eval-multi-bad",
        &[
            r#"{"id": "both", "images": ["img-1.png"], "prompt": "What?", "questions": [{"prompt": "a"}, {"prompt": "b"}]}"#.into(),
            r#"{"id": "none", "images": ["img-1.png"]}"#.into(),
            r#"{"id": "markers", "images": ["img-1.png"], "questions": [{"prompt": "Look: <image> what is it?"}, {"prompt": "What color?"}]}"#.into(),
        ],
    );
    let out = csp(&["eval", "--data", data.to_str().unwrap(), "-n", "2", "--kv-policy", "full", "-o", "json"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not both"), "{err}");
    assert!(err.contains("neither a prompt nor questions"), "{err}");
    assert!(err.contains("images before each question") || err.contains("share everything before them"), "{err}");
    assert!(err.contains("3 of 3 case(s) failed"), "{err}");
}

/// `eval -o json` → `plot`: the SVG holds a panel per file × metric and every policy's line;
/// the x axis is bytes (the summary carries `kv_bytes_after`, the full cache the most); bad
/// inputs are one-line errors.
#[test]
fn eval_json_plots_against_kv_bytes() {
    let data = write_cases(
        "plot",
        &[
            r#"{"id": 1, "images": ["img-0.png", "img-1.png"], "prompt": "Which image shows a circle?", "answer": "first"}"#.into(),
            r#"{"id": 2, "images": ["img-2.png", "img-3.png"], "prompt": "What colour is image 2?", "answer": "red"}"#.into(),
        ],
    );
    let out = csp(&["eval", "--data", data.to_str().unwrap(), "-n", "4", "--kv-policy", "full,csp,h2o", "--kv-budget", "0.2,0.5", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v["summary"].as_array().unwrap();
    let bytes = |p: &str, b: Option<&str>| {
        rows.iter().find(|r| r["policy"] == p && r["budget"].as_str() == b).unwrap()["kv_bytes_after"].as_f64().unwrap()
    };
    assert!(bytes("csp", Some("0.2")) > 0.0);
    assert!(bytes("csp", Some("0.2")) < bytes("csp", Some("0.5")) && bytes("csp", Some("0.5")) < bytes("full", None));
    let json = data.with_file_name("eval.json");
    std::fs::write(&json, &out.stdout).unwrap();
    let svg = data.with_file_name("fig.svg");
    let plot = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_csp-llava")).arg("plot").args(args).output().unwrap();
    let spec = format!("K2={}", json.display());
    let out = plot(&[&spec, json.to_str().unwrap(), "--metric", "accuracy,kl,rouge_l", "-o", svg.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg"), "an SVG");
    for needle in ["K2 — question-in-prompt · exact match", "eval — question-in-prompt · ROUGE-L vs full", "KV cache kept (MiB)", "\ncsp\n", "\nh2o\n", "\nfull\n"] {
        assert!(text.contains(needle), "{needle} missing");
    }
    // errors: an unknown metric (usage, exit 2), a file that is not eval output, a missing file
    let out = plot(&[json.to_str().unwrap(), "--metric", "speed", "-o", svg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown metric `speed`"));
    let out = plot(&[data.to_str().unwrap(), "-o", svg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not an `eval -o json` output") && !err.contains("panicked"), "{err}");
    let out = plot(&["/no/such/eval.json", "-o", svg.to_str().unwrap()]);
    assert!(!out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

#[test]
fn bench_sweeps_threads_batches_and_depth_and_streams_rows() {
    let (m, p) = (support::model(), support::mmproj());
    let out = Command::new(env!("CARGO_BIN_EXE_csp-llava"))
        .args(["bench", "--images", "1", "-r", "1", "-n", "2", "--kv-policy", "random", "--kv-budget", "0.5", "-t", "1,2", "-ub", "32,64", "-d", "0,8", "-o", "jsonl", "-m"])
        .arg(&m)
        .arg("--mmproj")
        .arg(&p)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout).lines().skip(1).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2 * 2 * 2 * 3, "-t × -ub × -d × (reference, full, random)");
    for t in [1, 2] {
        for ub in [32, 64] {
            for d in [0, 8] {
                let group: Vec<_> = rows.iter().filter(|r| r["threads"] == t && r["n_ubatch"] == ub && r["depth"] == d).collect();
                assert_eq!(group.len(), 3, "t {t} ub {ub} d {d}");
                assert!(group.iter().all(|r| r["n_generated"] == 2));
                // ratios against the reference of the same group
                let random = group.iter().find(|r| r["policy"] == "random").unwrap();
                assert!(random["ratio_kv_bytes"].as_f64().unwrap() > 0.0 && random["ratio_kv_bytes"].as_f64().unwrap() < 1.0, "{random}");
            }
        }
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("sweep point 1/2") && stderr.contains("sweep point 2/2"), "{stderr}");
    // lists belong to bench
    let out = csp(&["-t", "1,2", "-p", "x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("-t: a comma-separated list is a bench sweep"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = csp(&["-p", "x", "--kv-max-cells", "auto"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--mem"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Rows reach the caller as they are measured (in the last pass), not all at the end.
#[test]
fn bench_rows_stream_before_the_run_ends() {
    let engine = support::engine();
    let cfg = csp_llava::bench::BenchConfig {
        images: vec![1, 2],
        image_files: vec![support::image(0), support::image(1)],
        policies: vec!["streaming".parse().unwrap()],
        budgets: vec![csp_llava::Budget::Fraction(0.5)],
        reps: 2,
        n_predict: 2,
        prompt: "Describe.".into(),
        ctx: Default::default(),
        policy: Default::default(),
        batch_sizes: vec![],
        ubatch_sizes: vec![],
        depths: vec![],
    };
    let events = std::cell::RefCell::new(Vec::new());
    let rows =
        csp_llava::bench::run(&engine, &cfg, support::scratch(), &mut |done, _| events.borrow_mut().push((done, false)), &mut |r| events.borrow_mut().push((r.n_images, true)), &|| false).unwrap();
    let events = events.into_inner();
    assert_eq!(events.iter().filter(|e| e.1).count(), rows.len());
    let first_row = events.iter().position(|e| e.1).unwrap();
    let last_progress = events.iter().rposition(|e| !e.1).unwrap();
    assert!(first_row < last_progress, "the first row came before the last run: {events:?}");
}
