//! Bounded prefill (`--kv-max-cells`) on the tiny model: many images through a small cache,
//! every policy, the cap read from llama.cpp itself, the observer's windows across evictions,
//! `--kv-shift`, and the errors.

mod support;

use std::process::Command;

use csp_llava::config::{CacheType, ContextConfig, FlashAttn, KvCap, Request, SamplingConfig};
use csp_llava::gguf::tiny;
use csp_llava::stats::Bucket;
use csp_llava::policy::{Budget, Granularity, PolicyConfig, PolicyKind};
use csp_llava::span::Modality;
use csp_llava::{Engine, RunReport};

use support::engine;

/// `n` images and a prompt, without "Image k:" labels: the sizes below (prompt vs cap, where
/// the last eviction falls) were worked out for the images alone.
fn images(n: usize, prompt: &str) -> Request {
    Request { images: (0..n).map(|i| support::image(i % 4)).collect(), prompt: prompt.into(), image_label: Some(String::new()), ..Default::default() }
}

fn greedy(n: i32) -> SamplingConfig {
    SamplingConfig { n_predict: n, temp: 0.0, ignore_eos: true, seed: Some(1), ..Default::default() }
}

fn capped(cap: Option<u32>) -> ContextConfig {
    ContextConfig { kv_max_cells: cap.map(KvCap::Cells), ..Default::default() }
}

fn run(e: &Engine, req: &Request, ctx: &ContextConfig, policy: &PolicyConfig, n: i32) -> RunReport {
    e.run(req, ctx, &greedy(n), policy, &mut |_| {}).unwrap_or_else(|err| panic!("{} {:?}: {err}", policy.kind, policy.granularity))
}

/// The accounting every bounded run must satisfy.
fn check_cap(r: &RunReport, cap: u32, what: &str) {
    assert_eq!(r.kv_max_cells, Some(cap), "{what}");
    assert!(r.kv_cells_peak <= cap, "{what}: peak {} > cap {cap}", r.kv_cells_peak);
    assert!(!r.evictions.is_empty(), "{what}: no eviction");
    let removed: usize = r.evictions.iter().map(|e| e.removed).sum();
    assert_eq!(r.n_prompt_tokens, r.kv_cells_after as usize + removed, "{what}: every prompt token is cached or was removed once");
    for w in r.evictions.windows(2) {
        assert!(w[0].at_token < w[1].at_token || w[1].at_token == r.n_prompt_tokens, "{what}: evictions in reading order");
    }
    assert!(r.evictions.iter().all(|e| e.removed > 0 && e.kept > 0 && e.kept + e.removed <= cap as usize), "{what}: {:?}", r.evictions);
}

#[test]
fn sixteen_images_through_a_quarter_size_cache_with_every_policy() {
    let e = engine();
    let req = images(16, "Which images show a circle?");
    let cap = 256;
    // the uncapped run needs a context for the whole prompt
    let policy = PolicyConfig { kind: PolicyKind::Csp, ..Default::default() };
    let full = run(&e, &req, &ContextConfig { n_ctx: 1280, ..Default::default() }, &policy, 8);
    assert!(full.n_prompt_tokens >= 4 * cap as usize, "{} prompt tokens", full.n_prompt_tokens);
    assert!(full.kv_cells_peak as usize >= full.n_prompt_tokens, "the uncapped cache held the whole prompt");
    let specs: [(PolicyKind, Option<Granularity>); 16] = [
        (PolicyKind::Csp, None),
        (PolicyKind::Csp, Some(Granularity::Head)),
        (PolicyKind::H2o, None),
        (PolicyKind::SnapKv, None),
        (PolicyKind::PrefixKv, None),
        (PolicyKind::AirCache, None),
        (PolicyKind::Streaming, None),
        (PolicyKind::Random, None),
        (PolicyKind::H2o, Some(Granularity::Layer)),
        (PolicyKind::KNorm, None),
        (PolicyKind::VNorm, Some(Granularity::Head)),
        (PolicyKind::KeyDiff, None),
        (PolicyKind::LookM, None),
        (PolicyKind::LookM, Some(Granularity::Head)),
        (PolicyKind::Expected, None),
        (PolicyKind::Expected, Some(Granularity::Head)),
    ];
    for (kind, granularity) in specs {
        let policy = PolicyConfig { kind, granularity, ..Default::default() };
        let what = format!("{kind}@{granularity:?}");
        let r = run(&e, &req, &capped(Some(cap)), &policy, 8);
        check_cap(&r, cap, &what);
        assert_eq!(r.n_generated, 8, "{what}");
        assert!(r.kv_bytes_allocated < full.kv_bytes_allocated, "{what}: {} vs {}", r.kv_bytes_allocated, full.kv_bytes_allocated);
        assert_eq!(r.n_ctx, cap, "{what}: -c defaults to the cap");
        assert!(!r.past_trained_ctx && r.max_pos as usize >= r.n_prompt_tokens, "{what}: positions keep growing");
        if granularity.is_none() && !matches!(kind, PolicyKind::AirCache | PolicyKind::PrefixKv) {
            // the prompt-end pass applies the normal budget: 0.2 of the whole prompt
            assert_eq!(r.kv_cells_after as usize, (r.n_prompt_tokens as f64 * 0.2) as usize, "{what}");
        }
    }
}

#[test]
fn a_cap_large_enough_for_everything_changes_nothing() {
    let e = engine();
    let req = images(4, "Which image shows a circle?");
    for kind in [PolicyKind::Csp, PolicyKind::H2o, PolicyKind::Streaming] {
        let policy = PolicyConfig { kind, ..Default::default() };
        let plain = run(&e, &req, &ContextConfig { n_ctx: 1024, ..Default::default() }, &policy, 12);
        let bounded = run(&e, &req, &ContextConfig { n_ctx: 1024, kv_max_cells: Some(KvCap::Cells(1024)), ..Default::default() }, &policy, 12);
        assert!(bounded.evictions.iter().all(|e| e.at_token == bounded.n_prompt_tokens), "{kind}: nothing evicted while reading");
        assert_eq!(bounded.text, plain.text, "{kind}");
        assert_eq!(bounded.kv_cells_after, plain.kv_cells_after, "{kind}");
        let kept = |r: &RunReport| r.retention.iter().map(|t| t.kept).collect::<Vec<_>>();
        assert_eq!(kept(&bounded), kept(&plain), "{kind}: the same tokens kept");
    }
}

/// `-n` larger than the default reserve (a quarter of the cap): the prompt-end pass leaves room
/// for every generated token, so the cache stays under the cap while generating too.
#[test]
fn generation_stays_under_the_cap() {
    let e = engine();
    let req = images(8, "Which images show a circle?");
    let cap = 256;
    // budget 1.0: the prompt-end pass keeps all the cap allows
    let policy = PolicyConfig { kind: PolicyKind::Csp, budget: Budget::Fraction(1.0), ..Default::default() };
    let r = run(&e, &req, &capped(Some(cap)), &policy, 100);
    assert_eq!(r.n_generated, 100);
    check_cap(&r, cap, "csp, -n 100");
    assert!(r.kv_cells_after as usize + 100 <= cap as usize, "{} kept + 100 generated > {cap}", r.kv_cells_after);
}

#[test]
fn a_text_only_prompt_is_capped_too() {
    let e = engine();
    let words = "red green blue circle square triangle shape colour ".repeat(40);
    let req = Request { prompt: format!("Count the shapes: {words}"), ..Default::default() };
    let cap = 128;
    for kind in [PolicyKind::Csp, PolicyKind::H2o, PolicyKind::Streaming] {
        let policy = PolicyConfig { kind, budget: Budget::Fraction(1.0), ..Default::default() };
        let r = run(&e, &req, &capped(Some(cap)), &policy, 4);
        assert!(r.n_prompt_tokens > 2 * cap as usize);
        check_cap(&r, cap, kind.name());
        assert_eq!(r.n_generated, 4);
    }
}

/// The observer's window across evictions: after the prefill, CSP's statistics (last O rows,
/// n-softmax, by query modality) cover only the rows read since the last eviction and only the
/// keys each row could see in the bounded cache — checked against an f64 recomputation from the
/// captured queries and keys.
#[test]
fn observed_window_after_evictions_matches_recomputation() {
    let e = engine();
    let req = images(6, "Which of these images has a red shape?");
    let prompt = e.prepare(&req).unwrap();
    let l = prompt.n_tokens();
    let modality = prompt.token_modalities();
    let window = 100;
    let ctx = ContextConfig {
        n_ubatch: 128,
        flash_attn: FlashAttn::Off,
        type_k: CacheType::F32,
        type_v: CacheType::F32,
        kv_max_cells: Some(KvCap::Cells(160)),
        kv_reserve: Some(16),
        ..Default::default()
    };
    let policy = PolicyConfig { kind: PolicyKind::Csp, obs_window: Some(window), ..Default::default() };
    let plan = e.plan(&prompt, &policy).unwrap();
    let req_stats = plan.stream_request.expect("csp observes");
    let mut session = e.session(&prompt, &ctx, vec![req_stats]).unwrap();
    let n_layer = tiny::text::N_LAYER as usize;
    session.observer().unwrap().capture_qk(n_layer);
    session.prefill_bounded(&prompt, &plan, &mut |_| {}).unwrap();
    let evictions = session.evictions().to_vec();
    assert!(evictions.len() >= 2, "{evictions:?}");
    assert!(session.kv_cells_peak() <= 160);
    let cached = session.cached_tokens();
    let captured = session.observer().unwrap().take_captured();
    let stats = session.take_stats(&prompt).unwrap().remove(0);

    let last_ev = evictions.last().unwrap().at_token;
    let first_row = (l - window).max(last_ev);
    assert!(last_ev > l - window, "the window restarted at the last eviction (test layout)");
    let (n_head, n_head_kv) = (tiny::text::N_HEAD as usize, tiny::text::N_HEAD_KV as usize);
    let head_dim = (tiny::text::N_EMBD / tiny::text::N_HEAD) as usize;
    let group = n_head / n_head_kv;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let mut max_err = 0f64;
    for il in 0..n_layer {
        let gather = |name: &str| -> Vec<f32> { captured.iter().filter(|c| c.name == name).flat_map(|c| c.data.iter().copied()).collect() };
        let (q, k) = (gather(&format!("Qcur-{il}")), gather(&format!("Kcur-{il}")));
        assert_eq!(q.len(), l * n_head * head_dim, "every prompt token captured once");
        let mut want = vec![vec![vec![0f64; l]; n_head_kv]; 2];
        for h in 0..n_head {
            let g = h / group;
            for t in first_row..l {
                let qv = &q[(t * n_head + h) * head_dim..][..head_dim];
                let keys: Vec<usize> = cached.iter().copied().filter(|&u| u <= t).collect();
                let x: Vec<f64> = keys
                    .iter()
                    .map(|&u| qv.iter().zip(&k[(u * n_head_kv + g) * head_dim..][..head_dim]).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>() * scale)
                    .collect();
                let z: f64 = x.iter().map(|v| v.exp()).sum::<f64>() + 1.0; // n-softmax, n = 1
                let b = usize::from(modality[t] != Modality::Text);
                for (&u, v) in keys.iter().zip(&x) {
                    want[b][g][u] += v.exp() / z / group as f64;
                }
            }
        }
        for (b, bucket) in [Bucket::Text, Bucket::Media].into_iter().enumerate() {
            for g in 0..n_head_kv {
                let got = stats.column(bucket, il, g);
                for u in 0..l {
                    max_err = max_err.max((f64::from(got[u]) - want[b][g][u]).abs());
                }
            }
        }
    }
    eprintln!("bounded window: max err {max_err:e}, rows {:?}", stats.n_rows);
    assert_eq!(stats.n_rows.iter().sum::<usize>(), l - first_row, "rows since the last eviction");
    assert!(max_err <= 1e-4, "max |Δ column sum| = {max_err}");
}

#[test]
fn kv_shift_keeps_positions_inside_the_trained_context() {
    let e = engine();
    let n_ctx_train = e.model().n_ctx_train() as usize;
    // more image tokens than the model was trained for
    let n_images = n_ctx_train / 64 + 4;
    let req = images(n_images, "Describe the last image.");
    let policy = PolicyConfig { kind: PolicyKind::Streaming, ..Default::default() };
    let cap = 512;
    let grow = run(&e, &req, &capped(Some(cap)), &policy, 8);
    assert!(grow.n_prompt_tokens > n_ctx_train);
    assert!(grow.past_trained_ctx && grow.max_pos as usize >= n_ctx_train, "positions grow: {}", grow.max_pos);
    let ctx = ContextConfig { kv_shift: true, ..capped(Some(cap)) };
    for kind in [PolicyKind::Streaming, PolicyKind::Csp] {
        let policy = PolicyConfig { kind, ..Default::default() };
        let r = run(&e, &req, &ctx, &policy, 8);
        check_cap(&r, cap, kind.name());
        assert!(!r.past_trained_ctx && (r.max_pos as u32) < cap, "{kind}: max_pos {}", r.max_pos);
        assert_eq!(r.n_generated, 8, "{kind}: still decodes");
        assert_eq!(r.max_pos as usize, r.kv_cells_after as usize + 8 - 2, "{kind}: positions are 0..cells, then the generated tokens");
    }
}

#[test]
fn shifted_cache_decodes_like_one_read_at_those_positions() {
    // --kv-shrink saves the sequence state right after the prompt-end shift and moves it into a
    // smaller context: the keys must already be rotated to their new positions (patch 0004),
    // or the moved cache would pair new positions with old rotations.
    let e = engine();
    let req = images(24, "Describe the last image.");
    let policy = PolicyConfig { kind: PolicyKind::Streaming, ..Default::default() };
    let base = ContextConfig { kv_shift: true, ..capped(Some(1024)) };
    let lazy = run(&e, &req, &base, &policy, 6);
    let moved = run(&e, &req, &ContextConfig { kv_shrink: true, ..base.clone() }, &policy, 6);
    assert!(moved.kv_cells_allocated < lazy.kv_cells_allocated);
    assert_eq!(moved.text, lazy.text, "the shifted keys travel with the state");
}

#[test]
fn errors_are_one_line_and_name_the_problem() {
    let e = engine();
    let req = images(8, "Which images show a circle?");
    let run_err = |ctx: &ContextConfig, kind: PolicyKind| -> String {
        let policy = PolicyConfig { kind, ..Default::default() };
        e.run(&req, ctx, &greedy(4), &policy, &mut |_| {}).unwrap_err().to_string()
    };
    let err = run_err(&capped(Some(64)), PolicyKind::Csp);
    assert!(err.contains("image 1") && err.contains("64 cells") && err.contains("at least 65"), "{err}");
    let err = run_err(&capped(Some(200)), PolicyKind::Full);
    assert!(err.contains("full evicts nothing"), "{err}");
    let err = run_err(&ContextConfig { n_ctx: 128, ..capped(Some(200)) }, PolicyKind::Csp);
    assert!(err.contains("-c") && err.contains("smaller"), "{err}");
    let err = run_err(&ContextConfig { kv_shift: true, ..Default::default() }, PolicyKind::Csp);
    assert!(err.contains("--kv-max-cells"), "{err}");
    assert!(!err.contains('\n'));
}

#[test]
fn cli_reports_the_cap() {
    let bin = env!("CARGO_BIN_EXE_csp-llava");
    let mut args: Vec<String> = ["-m", support::model().to_str().unwrap(), "--mmproj", support::mmproj().to_str().unwrap()].map(String::from).to_vec();
    for i in 0..8 {
        args.extend(["--image".into(), support::image(i % 4).display().to_string()]);
    }
    args.extend(["-p", "Which image is red?", "-n", "4", "--temp", "0", "--kv-policy", "csp", "--kv-max-cells", "0.3", "--json"].map(String::from));
    let out = Command::new(bin).args(&args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let n = v["n_prompt_tokens"].as_u64().unwrap();
    let cap = v["kv_max_cells"].as_u64().unwrap();
    assert_eq!(cap, (0.3 * n as f64).ceil() as u64, "a fraction of the prompt");
    assert!(v["kv_cells_peak"].as_u64().unwrap() <= cap);
    let ev = v["evictions"].as_array().unwrap();
    assert!(!ev.is_empty() && ev.iter().all(|e| e["at_token"].is_u64() && e["removed"].is_u64() && e["kept"].is_u64() && e["ms"].is_f64()));
    // a flag of the bounded prefill without the cap is refused by the parser
    let out = Command::new(bin).args(&args[..args.len() - 3]).args(["--kv-shift", "--json"]).output().unwrap();
    assert!(!out.status.success());
    let out = Command::new(bin).args(["-m", &args[1], "--mmproj", &args[3], "-p", "x", "--kv-max-cells", "1.5"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("(0, 1]"), "{err}");
}
