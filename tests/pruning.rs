//! Pruning end to end on the tiny model with 4 images: budgets, compaction, shrinking, every
//! policy, flash-attention rules.

mod support;

use std::process::Command;

use csp_llava::config::{CacheType, ContextConfig, FlashAttn, ObserverMode, Request, SamplingConfig};
use csp_llava::policy::{Budget, PolicyConfig, PolicyKind};
use csp_llava::{Engine, RunReport};

use support::engine;

fn four_images() -> Request {
    Request { images: (0..4).map(support::image).collect(), prompt: "Which image shows a circle?".into(), ..Default::default() }
}

fn greedy(n: i32) -> SamplingConfig {
    SamplingConfig { n_predict: n, temp: 0.0, ignore_eos: true, seed: Some(1), ..Default::default() }
}

fn run(e: &Engine, req: &Request, fa: FlashAttn, kind: PolicyKind, budget: Budget, shrink: bool) -> RunReport {
    let ctx = ContextConfig { n_ctx: 1024, flash_attn: fa, kv_shrink: shrink, ..Default::default() };
    let policy = PolicyConfig { kind, budget, ..Default::default() };
    e.run(req, &ctx, &greedy(12), &policy, &mut |_| {}).unwrap_or_else(|err| panic!("{kind} {budget}: {err}"))
}

use support::PRUNING;

#[test]
fn budget_one_reproduces_the_full_cache() {
    let e = engine();
    let req = four_images();
    for fa in [FlashAttn::Off, FlashAttn::Auto] {
        let full = run(&e, &req, fa, PolicyKind::Full, Budget::Fraction(1.0), false);
        for kind in PRUNING {
            let r = run(&e, &req, fa, kind, Budget::Fraction(1.0), false);
            assert_eq!(r.text, full.text, "{kind} at budget 1.0, fa {fa:?}");
            assert!(!r.pruned);
            assert_eq!(r.kv_cells_after, full.kv_cells_after);
            assert_eq!(r.flash_attn, full.flash_attn);
        }
    }
}

#[test]
fn budget_point_two_prunes_compacts_and_still_generates() {
    let e = engine();
    let req = four_images();
    let full = run(&e, &req, FlashAttn::Off, PolicyKind::Full, Budget::Fraction(1.0), false);
    let l = full.n_prompt_tokens;
    assert_eq!(full.image_tokens, vec![64; 4]);
    let b = (0.2 * l as f64).floor() as u32;
    for kind in PRUNING {
        let r = run(&e, &req, FlashAttn::Auto, kind, Budget::Fraction(0.2), false);
        assert!(r.pruned, "{kind}");
        assert_eq!(r.kv_cells_before as usize, l, "{kind}");
        assert_eq!(r.kv_cells_after, b, "{kind}: floor(0.2·{l})");
        assert_eq!(r.kv_cells, r.kv_cells_after);
        assert_eq!(r.kept_per_modality.text + r.kept_per_modality.image, b as usize);
        assert_eq!(r.kv_attended, b, "{kind}: compaction packs the kept cells to the front");
        assert!(r.kv_bytes_after * 4 < r.kv_bytes_before, "{kind}");
        assert_eq!(r.n_generated, 12, "{kind}");
        assert_eq!(r.kv_budget, Some(b as usize));
        // the prefill attends over the full prompt: the first token is the full cache's
        let first = |t: &str| t.chars().next();
        assert_eq!(first(&r.text), first(&full.text), "{kind}: first token");

        // LOOK-M folds every evicted (layer, KV head, token) into a kept row; the others merge nothing
        let n_layer_heads = (csp_llava::gguf::tiny::text::N_LAYER * csp_llava::gguf::tiny::text::N_HEAD_KV) as usize;
        assert_eq!(r.kv_merged, if kind == PolicyKind::LookM { (l - b as usize) * n_layer_heads } else { 0 }, "{kind}");
        let shrunk = run(&e, &req, FlashAttn::Auto, kind, Budget::Fraction(0.2), true);
        assert_eq!(shrunk.text, r.text, "{kind}: --kv-shrink changes nothing but the buffer");
        assert_eq!(shrunk.kv_cells_after, b);
        assert!(shrunk.kv_bytes_allocated < r.kv_bytes_allocated, "{kind}: shrink frees the big buffer");
        assert!(shrunk.kv_cells_allocated as usize >= b as usize + 12);
    }
}

/// Issue 15: observing policies keep flash attention for the prompt (statistics computed inside
/// llama.cpp's graph), so a quantized V cache works with them; the host observer (and AirCache,
/// whose elite window needs it) pauses flash attention for the prompt only.
#[test]
fn observing_policies_keep_flash_attention_with_the_graph_observer() {
    let e = engine();
    let req = four_images();
    let full = run(&e, &req, FlashAttn::Auto, PolicyKind::Full, Budget::Fraction(1.0), false);
    assert_eq!(full.observer, None);
    let with = |kind: PolicyKind, fa: FlashAttn, observer: ObserverMode, type_v: CacheType| {
        let ctx = ContextConfig { n_ctx: 1024, flash_attn: fa, observer, type_v, ..Default::default() };
        e.run(&req, &ctx, &greedy(12), &PolicyConfig { kind, budget: Budget::Fraction(0.2), ..Default::default() }, &mut |_| {})
    };
    // every observing policy, AirCache's elite window included (patch 0008)
    for kind in [PolicyKind::Csp, PolicyKind::H2o, PolicyKind::SnapKv, PolicyKind::PrefixKv, PolicyKind::AirCache] {
        let graph = with(kind, FlashAttn::Auto, ObserverMode::Auto, CacheType::F16).unwrap();
        assert_eq!(graph.observer, Some("graph"), "{kind}");
        assert_eq!(graph.flash_attn, full.flash_attn, "{kind}");
        assert_eq!(graph.prefill_flash_attn, full.flash_attn == "on", "{kind}: flash attention kept for the prompt");
        assert!(graph.score_ms > 0.0);
        // only sums come back: per layer and observed ubatch, KV heads × 2 columns × cells
        assert!(graph.observe_bytes > 0, "{kind}");
        // the host observer: flash attention off for the prompt, resumed for decoding, the same
        // selection within float noise (same kept count, same first token)
        let host = with(kind, FlashAttn::Auto, ObserverMode::Host, CacheType::F16).unwrap();
        assert_eq!(host.observer, Some("host"), "{kind}");
        assert!(!host.prefill_flash_attn, "{kind}");
        assert_eq!(host.flash_attn, full.flash_attn, "{kind}");
        assert_eq!(host.kv_cells_after, graph.kv_cells_after, "{kind}");
        assert_eq!(host.observe_bytes, 0, "{kind}: on the CPU the host path reads kq in place");
        let r = run(&e, &req, FlashAttn::Off, kind, Budget::Fraction(0.2), false);
        assert_eq!(r.flash_attn, "off", "{kind}: -fa off stays off");
        let on = run(&e, &req, FlashAttn::On, kind, Budget::Fraction(0.2), false);
        assert_eq!(on.flash_attn, "on", "{kind}: -fa on is honoured");
        assert!(on.prefill_flash_attn, "{kind}: and kept for the prompt");
        assert_eq!(on.kv_cells_after, r.kv_cells_after);
        // a quantized V cache needs flash attention, so the host observer refuses it (the tiny
        // model's 16-wide heads cannot hold q8_0 blocks at all: tests/real_model.rs runs CSP
        // with q8_0 K and V through the graph observer)
        let err = with(kind, FlashAttn::Auto, ObserverMode::Host, CacheType::Q8_0).unwrap_err().to_string();
        assert!(err.contains("-ctv"), "{err}");
    }
    // policies that do not observe keep flash attention as requested
    for kind in [PolicyKind::Streaming, PolicyKind::Random] {
        let r = run(&e, &req, FlashAttn::On, kind, Budget::Fraction(0.2), false);
        assert_eq!(r.flash_attn, "on", "{kind}");
        assert_eq!(r.observer, None, "{kind}");
    }
}

#[test]
fn csp_leaves_a_text_only_prompt_alone_but_baselines_prune_it() {
    let e = engine();
    let req = Request { prompt: "A long text-only question about shapes and colours and nothing else at all.".into(), ..Default::default() };
    let r = run(&e, &req, FlashAttn::Auto, PolicyKind::Csp, Budget::Fraction(0.5), false);
    assert!(!r.pruned);
    assert_eq!(r.kv_cells_after as usize, r.n_prompt_tokens);
    for kind in [PolicyKind::H2o, PolicyKind::SnapKv, PolicyKind::Streaming, PolicyKind::Random] {
        let r = run(&e, &req, FlashAttn::Auto, kind, Budget::Fraction(0.5), false);
        assert!(r.pruned, "{kind}");
        assert_eq!(r.kv_cells_after as usize, r.n_prompt_tokens / 2, "{kind}");
    }
}

#[test]
fn integer_budget_and_long_prompt() {
    let e = engine();
    // 16 images (1024 image tokens) across several ubatches
    let req = Request { images: (0..16).map(|i| support::image(i % 4)).collect(), prompt: "Count the circles.".into(), ..Default::default() };
    for kind in PRUNING {
        let ctx = ContextConfig { n_ctx: 2048, ..Default::default() };
        let policy = PolicyConfig { kind, budget: Budget::Cells(200), ..Default::default() };
        let r = e.run(&req, &ctx, &greedy(4), &policy, &mut |_| {}).unwrap();
        assert_eq!(r.kv_cells_after, 200, "{kind}");
        assert_eq!(r.n_images, 16);
        assert_eq!(r.n_generated, 4);
    }
}

#[test]
fn cli_flags_json_and_dump() {
    let dump = support::scratch().join("retention.jsonl");
    let imgs: Vec<String> = (0..4).map(|i| support::image(i).to_str().unwrap().to_owned()).collect();
    let mut args: Vec<String> = vec!["-m".into(), support::model().to_str().unwrap().into(), "--mmproj".into(), support::mmproj().to_str().unwrap().into()];
    for i in &imgs {
        args.extend(["--image".into(), i.clone()]);
    }
    args.extend(
        ["-p", "Compare.", "-n", "3", "--temp", "0", "--json", "-c", "1024", "--kv-policy", "csp", "--kv-budget", "0.25", "--csp-preset", "WebQA", "--dump-retention"]
            .map(String::from),
    );
    args.push(dump.to_str().unwrap().into());
    let out = Command::new(env!("CARGO_BIN_EXE_csp-llava")).args(&args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["kv_cells_before", "kv_cells_after", "kv_bytes_before", "kv_bytes_after", "score_ms", "evict_ms", "pruned", "kept_per_modality"] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    assert_eq!(v["policy"], "csp");
    assert_eq!(v["pruned"], true);
    let l = v["n_prompt_tokens"].as_u64().unwrap();
    assert_eq!(v["kv_cells_after"].as_u64().unwrap(), (0.25 * l as f64).floor() as u64);
    assert_eq!(v["kv_cells_before"].as_u64().unwrap(), l);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&dump).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len() as u64, l);
    assert_eq!(lines.iter().filter(|x| x["kept"] == true).count() as u64, v["kv_cells_after"].as_u64().unwrap());
    assert!(lines.iter().any(|x| x["modality"] == "image" && x["image"] == 3));

    // protected sinks: the prompt's first 3 tokens and each image's first token survive, and
    // the budget holds; --obs-window all observes every row in the graph
    let mut prot = args.clone();
    let dump2 = support::scratch().join("retention-protected.jsonl");
    let i = prot.iter().position(|a| a == "--dump-retention").unwrap();
    prot[i + 1] = dump2.to_str().unwrap().into();
    prot.extend(["--kv-protect-first", "3", "--kv-protect-image", "1", "--obs-window", "all"].map(String::from));
    let out = Command::new(env!("CARGO_BIN_EXE_csp-llava")).args(&prot).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let w: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(w["kv_cells_after"], v["kv_cells_after"]);
    assert_eq!(w["observer"], "graph");
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&dump2).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for t in 0..3 {
        assert_eq!(rows[t]["kept"], true, "token {t}");
    }
    for img in 0..4 {
        let first = rows.iter().find(|x| x["image"] == img).unwrap();
        assert_eq!(first["kept"], true, "first token of image {img}: {first}");
    }
    assert_ne!(rows, lines, "the settings change the selection");

    // bad settings are one-line errors
    let bad = |extra: &[&str], needle: &str| {
        let mut a = args[..4].to_vec();
        a.extend(["-p", "hi"].map(String::from));
        a.extend(extra.iter().map(|s| s.to_string()));
        let out = Command::new(env!("CARGO_BIN_EXE_csp-llava")).args(&a).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(needle) && !err.contains("panicked"), "{extra:?}: {err}");
    };
    bad(&["--kv-policy", "csp", "--kv-budget", "1.5"], "outside (0, 1]");
    bad(&["--kv-policy", "h2o", "--kv-budget", "0"], "keeps nothing");
    bad(&["--kv-policy", "csp", "--csp-cross-ratio", "2"], "--csp-cross-ratio");
    bad(&["--kv-policy", "csp", "--csp-preset", "NoSuchSet"], "unknown --csp-preset");
    bad(&["--kv-policy", "snapkv", "-ctv", "q8_0", "--kv-observer", "host"], "quantized V cache");
    bad(&["--kv-policy", "h2o", "--kv-budget", "0.001"], "keeps no cell");
    bad(&["--kv-policy", "pyramid"], "unknown policy");
}

/// Issue 15: compaction (and `--kv-shrink`) on the device gives the same cache as the state round
/// trip through host memory: the same logits over the compacted cache, bit for bit, and the same 16 greedy
/// tokens — after the prompt-end pass, with and without shrinking, and in a bounded prefill
/// (evictions while the prompt is read).
#[test]
fn device_compaction_matches_the_state_round_trip() {
    use csp_llava::config::KvCap;
    use csp_llava::engine::PrefillMode;
    let e = engine();
    let req = four_images();
    let prompt = e.prepare(&req).unwrap();
    let sampling = greedy(16);
    for (shrink, cap) in [(false, None), (true, None), (false, Some(KvCap::Fraction(0.5)))] {
        for kind in [PolicyKind::Csp, PolicyKind::H2o, PolicyKind::Streaming] {
            let policy = PolicyConfig { kind, budget: Budget::Fraction(0.3), ..Default::default() };
            let run = |device: bool| {
                let ctx = ContextConfig { n_ctx: if cap.is_some() { 0 } else { 1024 }, kv_shrink: shrink, kv_max_cells: cap, kv_compact_on_device: device, ..Default::default() };
                let plan = csp_llava::engine::Plan { shrink, ..e.plan(&prompt, &policy).unwrap() };
                let mut p = e.prefill_pruned(&prompt, &ctx, &plan, sampling.n_predict, PrefillMode::Chunked, &mut |_| {}).unwrap();
                // logits computed over the compacted cache (the prompt's own were computed before)
                let logits: Vec<f32> = p.session.teacher_forced(&[5, 9, 14]).unwrap().concat();
                let (how, bytes, cells) = (p.session.compaction(), p.session.compact_bytes(), p.session.kv_info().n_used);
                let gen = p.session.generate(&sampling, &mut |_| {}).unwrap();
                (logits, gen.tokens, how, bytes, cells)
            };
            let (dl, dt, dhow, dbytes, dcells) = run(true);
            let (sl, st, show, _, scells) = run(false);
            let what = format!("{kind}, shrink {shrink}, cap {cap:?}");
            assert_eq!((dhow, show), (Some("device"), Some("state")), "{what}");
            assert!(dbytes > 0, "{what}");
            assert_eq!(dcells, scells, "{what}");
            assert!(dl.iter().zip(&sl).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: logits after pruning differ");
            assert_eq!(dt, st, "{what}: greedy tokens differ");
        }
    }
}
