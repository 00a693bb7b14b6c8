//! Per-layer and per-head retention on the tiny model (llama.cpp patch 0003): each (layer, head)
//! attends to exactly what it selected, budgets per granularity, masks surviving decode, n-softmax
//! sinks at decode, flash attention resumed after the observed prefill, PrefixKV and AirCache
//! end to end (library and CLI).

mod support;

use std::process::Command;

use csp_llava::config::{ContextConfig, FlashAttn, Request, SamplingConfig};
use csp_llava::engine::{PrefillMode, Session};
use csp_llava::llama;
use csp_llava::policy::{Budget, Csp, Granularity, Params, PolicyConfig, PolicyKind, Retention};
use csp_llava::{Engine, RunReport};

use support::engine;

fn four_images() -> Request {
    Request { images: (0..4).map(support::image).collect(), prompt: "Which image shows a circle?".into(), ..Default::default() }
}

fn ctx(fa: FlashAttn) -> ContextConfig {
    ContextConfig { n_ctx: 1024, flash_attn: fa, ..Default::default() }
}

fn greedy(n: i32) -> SamplingConfig {
    SamplingConfig { n_predict: n, temp: 0.0, ignore_eos: true, seed: Some(1), ..Default::default() }
}

/// Prefill, prune; returns the session ready to decode and the retention.
fn pruned<'e>(e: &'e Engine, cfg: &PolicyConfig, fa: FlashAttn) -> (Session<'e>, Retention, csp_llava::engine::Prompt) {
    let prompt = e.prepare(&four_images()).unwrap();
    let plan = e.plan(&prompt, cfg).unwrap();
    let mut s = e.session(&prompt, &ctx(fa), plan.request.into_iter().collect()).unwrap();
    s.prefill(&prompt, PrefillMode::Chunked, &mut |_| {}).unwrap();
    let stats = s.take_stats(&prompt).unwrap();
    let pruning = plan.apply(&mut s, &prompt, stats.first(), 8).unwrap();
    (s, pruning.retention.expect("pruned"), prompt)
}

/// One decoded token's attention per layer: raw logits, masked logits (when the layer has a
/// mask) and probabilities, each `[head][cell]` — `None` where the masked layers ran flash
/// attention with a per-head mask (patch 0007), which never materialises them — and the
/// token's output logits.
struct Attention {
    raw: Vec<Vec<Vec<f32>>>,
    masked: Vec<Option<Vec<Vec<f32>>>>,
    probs: Vec<Vec<Vec<f32>>>,
}

fn decode_attention(s: &mut Session<'_>, n_layer: usize) -> (Option<Attention>, Vec<f32>) {
    s.observer().expect("observed session").capture_attention(n_layer);
    let logits = s.teacher_forced(&[5]).unwrap().remove(0);
    let caps = s.observer().unwrap().take_captured();
    if !caps.iter().any(|c| c.name == "kq-0") {
        return (None, logits);
    }
    let get = |name: String| {
        caps.iter().find(|c| c.name == name).map(|c| {
            let [n_kv, rows, n_head, _] = c.ne;
            assert_eq!(rows, 1);
            (0..n_head).map(|h| c.data[h * n_kv..(h + 1) * n_kv].to_vec()).collect::<Vec<_>>()
        })
    };
    let att = Attention {
        raw: (0..n_layer).map(|il| get(format!("kq-{il}")).expect("raw logits")).collect(),
        masked: (0..n_layer).map(|il| get(format!("kq_plus_kq_b-{il}"))).collect(),
        probs: (0..n_layer).map(|il| get(format!("kq_soft_max-{il}")).expect("softmax")).collect(),
    };
    (Some(att), logits)
}

#[test]
fn each_head_attends_to_exactly_its_selection() {
    let e = engine();
    let n_layer = e.model().n_layer() as usize;
    let n_head = e.model().n_head() as usize;
    let cases = [
        (PolicyKind::Csp, Granularity::Head),
        (PolicyKind::H2o, Granularity::Head),
        (PolicyKind::SnapKv, Granularity::Head),
        (PolicyKind::Csp, Granularity::Layer),
        (PolicyKind::PrefixKv, Granularity::Layer),
        (PolicyKind::AirCache, Granularity::Layer),
    ];
    for (kind, g) in cases {
        // the masked flash-attention path's logits, compared below with the non-flash path's
        let mut flash_logits: Option<Vec<f32>> = None;
        for fa in [FlashAttn::Auto, FlashAttn::Off] {
            let cfg = PolicyConfig { kind, budget: Budget::Fraction(0.2), granularity: Some(g), ..Default::default() };
            let (mut s, ret, _) = pruned(&e, &cfg, fa);
            let heads = ret.per_head.as_ref().expect("per-head retention");
            assert_eq!(ret.granularity, g);
            let union: Vec<usize> = (0..ret.keep.len()).filter(|&t| ret.keep[t]).collect();
            assert_eq!(s.kv_info().n_used as usize, union.len(), "{kind}@{g}: the physical cache is the union");
            let group = n_head / heads.n_head_kv;
            let mut hidden_total = 0;
            for il in 0..n_layer {
                for h in 0..n_head {
                    let want = heads.get(il, h / group);
                    let hidden = union.iter().filter(|&&t| !want[t]).count();
                    hidden_total += hidden;
                    assert_eq!(s.context().layer_mask_count(il, h), Some(hidden), "{kind}@{g} layer {il} head {h}");
                }
            }
            assert!(hidden_total > 0, "{kind}@{g}: some head must drop part of the union");
            let (att, logits) = decode_attention(&mut s, n_layer);
            let Some(att) = att else {
                // patch 0007: masked layers ran flash attention with a per-head mask (CPU, Metal)
                assert!(s.flash_attn(), "{kind}@{g}: no attention logits although flash attention is off");
                flash_logits = Some(logits);
                continue;
            };
            if let Some(fl) = flash_logits.take() {
                // the same masks through flash attention give the non-flash masked path's logits
                // (up to flash attention's own rounding: F16 Q and V accumulation on the CPU)
                let scale = logits.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
                let diff = fl.iter().zip(&logits).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                eprintln!("{kind}@{g}: masked flash vs non-flash decode logits: max |Δ| {diff:e} (max |logit| {scale})");
                assert!(diff <= 2e-2 * scale, "{kind}@{g}: masked flash logits differ by {diff} (max |logit| {scale})");
            }
            for il in 0..n_layer {
                let masked = att.masked[il].as_ref().unwrap_or_else(|| panic!("{kind}@{g}: layer {il} has no mask"));
                for h in 0..n_head {
                    let want = heads.get(il, h / group);
                    for (cell, &t) in union.iter().enumerate() {
                        let x = masked[h][cell];
                        assert_eq!(x.is_finite(), want[t], "{kind}@{g} fa {fa:?} layer {il} head {h} token {t} (cell {cell}): {x}");
                        if want[t] {
                            assert_eq!(x, att.raw[il][h][cell], "kept keys keep their logits");
                        } else {
                            assert_eq!(att.probs[il][h][cell], 0.0, "a masked key gets no attention");
                        }
                    }
                    assert!(masked[h][union.len()].is_finite(), "the decoded token sees itself");
                    let sum: f32 = att.probs[il][h].iter().sum();
                    assert!((sum - 1.0).abs() < 1e-4, "plain softmax sums to 1: {sum}");
                }
            }
        }
    }
}

fn run(e: &Engine, cfg: &PolicyConfig, fa: FlashAttn) -> RunReport {
    e.run(&four_images(), &ctx(fa), &greedy(12), cfg, &mut |_| {}).unwrap_or_else(|err| panic!("{}: {err}", cfg.kind))
}

#[test]
fn budgets_per_granularity_and_reporting() {
    let e = engine();
    for kind in [PolicyKind::Csp, PolicyKind::H2o, PolicyKind::SnapKv] {
        let base = PolicyConfig { kind, budget: Budget::Fraction(0.2), ..Default::default() };
        let global = run(&e, &base, FlashAttn::Auto);
        let b = global.kv_budget.unwrap();
        assert_eq!(global.kv_granularity, "global");
        assert_eq!((global.kv_cells_physical, global.kv_cells_after as usize), (b, b));
        assert_eq!(global.kv_cells_effective, b as f64);
        assert_eq!(global.flash_attn, "on", "{kind}: flash attention resumes for decoding after the observed prefill");
        for g in [Granularity::Layer, Granularity::Head] {
            let r = run(&e, &PolicyConfig { granularity: Some(g), ..base.clone() }, FlashAttn::Auto);
            assert_eq!(r.kv_granularity, g.name());
            assert_eq!(r.kv_cells_after as usize, r.kv_cells_physical, "{kind}@{g}");
            assert!(r.kv_cells_physical >= b, "{kind}@{g}: the union holds at least B");
            assert!(r.kv_cells_effective <= b as f64 + 1e-9, "{kind}@{g}: ≤ B per (layer, head)");
            if kind != PolicyKind::Csp {
                // H2O / SnapKV keep exactly B per head (CSP's self ∪ cross may overlap)
                assert_eq!(r.kv_cells_effective, b as f64, "{kind}@{g}");
            }
            assert_eq!(r.n_generated, 12);
        }
    }
}

#[test]
fn budget_one_at_head_granularity_is_the_full_cache() {
    let e = engine();
    let full = run(&e, &PolicyConfig::default(), FlashAttn::Off);
    for kind in [PolicyKind::Csp, PolicyKind::H2o, PolicyKind::PrefixKv, PolicyKind::AirCache] {
        let cfg = PolicyConfig { kind, budget: Budget::Fraction(1.0), granularity: Some(Granularity::Head), ..Default::default() };
        let r = run(&e, &cfg, FlashAttn::Off);
        assert_eq!(r.text, full.text, "{kind}");
    }
}

#[test]
fn masks_survive_decoding_and_sinks_apply_n_softmax() {
    let e = engine();
    let n_layer = e.model().n_layer() as usize;
    let cfg = PolicyConfig { kind: PolicyKind::Csp, budget: Budget::Fraction(0.2), granularity: Some(Granularity::Head), ..Default::default() };
    let (mut s, _, _) = pruned(&e, &cfg, FlashAttn::Auto);
    let before: Vec<usize> = (0..n_layer).map(|il| s.context().layer_mask_count(il, 0).unwrap()).collect();
    s.generate(&greedy(6), &mut |_| {}).unwrap();
    let after: Vec<usize> = (0..n_layer).map(|il| s.context().layer_mask_count(il, 0).unwrap()).collect();
    assert_eq!(before, after, "masks stay in force while decoding");

    // n-softmax at decode: each row sums to S/(S+n), S = Σ exp(scale·x) over the visible keys.
    // The tiny model's logits are large, so n is large enough to take visible mass.
    let n = 1e12f32;
    let cfg = PolicyConfig { kind: PolicyKind::Csp, budget: Budget::Fraction(0.2), decode_sink: true, params: Params { csp: Csp { n, ..Default::default() }, ..Default::default() }, ..Default::default() };
    let (mut s, ret, _) = pruned(&e, &cfg, FlashAttn::Off);
    let visible = ret.kept() + 1;
    let scale = 1.0 / 16f64.sqrt();
    let att = decode_attention(&mut s, n_layer).0.expect("flash attention off: probabilities materialised");
    let mut smallest = 1f64;
    for il in 0..n_layer {
        for (raw, probs) in att.raw[il].iter().zip(&att.probs[il]) {
            let big_s: f64 = raw[..visible].iter().map(|&x| (scale * f64::from(x)).exp()).sum();
            let want = big_s / (big_s + f64::from(n));
            let sum: f64 = probs.iter().map(|&p| f64::from(p)).sum();
            assert!((sum / want - 1.0).abs() < 1e-3, "layer {il}: row sums to {sum}, n-softmax wants {want}");
            smallest = smallest.min(sum);
        }
    }
    assert!(smallest < 0.99, "the sink takes visible mass somewhere ({smallest})");
    let cfg = PolicyConfig { params: Params { csp: Csp { n: 1.0, ..cfg.params.csp }, ..cfg.params.clone() }, ..cfg };
    let plain = run(&e, &PolicyConfig { decode_sink: false, ..cfg.clone() }, FlashAttn::Off);
    let sunk = run(&e, &cfg, FlashAttn::Off);
    assert_eq!(plain.n_generated, sunk.n_generated);
}

#[test]
fn prefixkv_evicts_while_decoding_and_aircache_keeps_all_text() {
    let e = engine();
    let r = run(&e, &PolicyConfig { kind: PolicyKind::PrefixKv, budget: Budget::Fraction(0.2), ..Default::default() }, FlashAttn::Auto);
    assert_eq!(r.kv_granularity, "layer");
    assert!(r.decode_evicted > 0, "fixed-point eviction fires during 12 decode steps");
    let l = r.n_prompt_tokens as f64;
    assert!((r.kv_cells_effective - (0.2 * l).floor()).abs() <= 1.0, "uniform profile: B per layer ({})", r.kv_cells_effective);

    let r = run(&e, &PolicyConfig { kind: PolicyKind::AirCache, budget: Budget::Fraction(0.1), ..Default::default() }, FlashAttn::Auto);
    let n_text = r.n_prompt_tokens - r.image_tokens.iter().sum::<usize>();
    assert_eq!(r.kept_per_modality.text, n_text, "AirCache compresses visual tokens only");
    let n_v = r.image_tokens.iter().sum::<usize>() as f64;
    let mean_v = r.kv_cells_effective - n_text as f64;
    assert!((mean_v - (0.1 * n_v).ceil()).abs() <= 2.0, "mean visual kept per layer ≈ r·N_v: {mean_v}");
    let e2 = PolicyConfig { kind: PolicyKind::AirCache, granularity: Some(Granularity::Global), budget: Budget::Fraction(0.1), ..Default::default() };
    let g = run(&e, &e2, FlashAttn::Auto);
    assert_eq!(g.kv_cells_physical, n_text + (0.1 * n_v).ceil() as usize, "global: all text + ⌈r·N_v⌉");
}

#[test]
fn calibrate_writes_a_profile_prefixkv_uses() {
    let dir = support::scratch().join("calibrate");
    std::fs::create_dir_all(&dir).unwrap();
    let mut lines = String::new();
    for i in 0..3 {
        let imgs: Vec<String> = (0..=i).map(|k| format!("\"{}\"", support::image(k).display())).collect();
        lines += &format!("{{\"id\": {i}, \"images\": [{}], \"prompt\": \"What is shown?\"}}\n", imgs.join(", "));
    }
    let data = dir.join("cases.jsonl");
    std::fs::write(&data, lines).unwrap();
    let profile = dir.join("profile.json");
    let bin = env!("CARGO_BIN_EXE_csp-llava");
    let m = support::model();
    let mm = support::mmproj();
    let out = Command::new(bin)
        .args(["calibrate", "-m"])
        .arg(&m)
        .arg("--mmproj")
        .arg(&mm)
        .args(["-t", "1", "--kv-budget", "0.2,0.5", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&profile)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let p = csp_llava::policy::Profile::load(&profile).unwrap();
    assert_eq!(p.samples, 3);
    for entry in &p.budgets {
        let mean = entry.retain.iter().sum::<f64>() / entry.retain.len() as f64;
        assert!((mean - entry.budget).abs() < 0.02, "mean retained {mean} ≈ {}", entry.budget);
        assert!(entry.forget.iter().zip(&entry.retain).all(|(f, r)| (f + r - 1.0).abs() < 1e-12));
    }
    let run = |budget: &str| {
        Command::new(bin)
            .arg("-m")
            .arg(&m)
            .arg("--mmproj")
            .arg(&mm)
            .args(["--image"])
            .arg(support::image(0))
            .args(["-p", "Describe.", "-n", "4", "--temp", "0", "-t", "1", "--json", "--kv-policy", "prefixkv", "--kv-budget", budget, "--prefixkv-profile"])
            .arg(&profile)
            .output()
            .unwrap()
    };
    let ok = run("0.2");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let bad = run("0.3");
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("calibrate") && err.lines().count() == 1, "one clear line: {err}");
}

#[test]
fn granularity_flag_and_bad_values() {
    let fails_with = |extra: &[&str], needle: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_csp-llava"))
            .arg("-m")
            .arg(support::model())
            .arg("--mmproj")
            .arg(support::mmproj())
            .arg("--image")
            .arg(support::image(0))
            .args(["-p", "x", "-n", "2", "-t", "1"])
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{extra:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(needle), "{extra:?}");
    };
    fails_with(&["--kv-policy", "csp", "--kv-granularity", "diagonal"], "global, layer, head");
    fails_with(&["--kv-policy", "h2o", "--csp-decode-sink"], "--csp-decode-sink");
}
