//! The KV scan (patch 0009: per-cell `‖k‖`, `‖v‖`, KeyDiff's cosine, computed by graphs on the
//! context's backend) against an independent recomputation from the keys and values captured
//! while the prompt was read (`Kcur-<il>` after RoPE, `Vcur-<il>`) — with flash attention off
//! (V stored transposed) and on, in an F32 and an F16 cache, and after an eviction and
//! compaction (cells renumbered, the anchor over the survivors only).

mod support;

use csp_llava::config::{CacheType, ContextConfig, FlashAttn, ObserverMode, Request};
use csp_llava::engine::PrefillMode;
use csp_llava::gguf::tiny;
use csp_llava::stats::{keydiff_cosines, KvRequest, Rows, StatRequest};

const ALL: KvRequest = KvRequest { knorm: true, vnorm: true, keydiff: true, expected: None };

#[test]
fn scan_matches_recomputation_f32_flash_attention_off() {
    scan(FlashAttn::Off, CacheType::F32, 1e-5);
}

#[test]
fn scan_matches_recomputation_f32_flash_attention_on() {
    scan(FlashAttn::Auto, CacheType::F32, 1e-5);
}

#[test]
fn scan_matches_recomputation_f16_cache() {
    // the cache rounds K and V to f16 (relative error ≤ 2^-11 per value)
    scan(FlashAttn::Auto, CacheType::F16, 2e-3);
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-3)
}

fn scan(fa: FlashAttn, cache: CacheType, tol: f64) {
    let engine = support::engine();
    let req = Request { images: (0..3).map(support::image).collect(), prompt: "Which image is red?".into(), ..Default::default() };
    let prompt = engine.prepare(&req).unwrap();
    let l = prompt.n_tokens();
    let ctx = ContextConfig { n_ctx: 1024, n_ubatch: 64, flash_attn: fa, type_k: cache, type_v: cache, observer: ObserverMode::Graph, ..Default::default() };
    let n_layer = tiny::text::N_LAYER as usize;
    let n_head_kv = tiny::text::N_HEAD_KV as usize;
    let d = (tiny::text::N_EMBD / tiny::text::N_HEAD) as usize;
    // an observer is only there to capture K and V; what it observes does not matter
    let mut session = engine.session(&prompt, &ctx, vec![StatRequest { rows: Rows::Last(1), n: 0.0 }]).unwrap();
    session.observer().unwrap().capture_kv(n_layer);
    session.prefill(&prompt, PrefillMode::Chunked, &mut |_| {}).unwrap();
    let captured = session.observer().unwrap().take_captured();
    let rows = |name: &str| -> Vec<f32> {
        let v: Vec<f32> = captured.iter().filter(|c| c.name == name).flat_map(|c| c.data.iter().copied()).collect();
        assert_eq!(v.len(), l * n_head_kv * d, "{name}: every prompt token captured once");
        v
    };
    let (k, v): (Vec<_>, Vec<_>) = (0..n_layer).map(|il| (rows(&format!("Kcur-{il}")), rows(&format!("Vcur-{il}")))).unzip();
    let vec_of = |x: &[f32], t: usize, h: usize| -> Vec<f64> { x[(t * n_head_kv + h) * d..][..d].iter().map(|&a| f64::from(a)).collect() };
    let norm = |x: &[f64]| x.iter().map(|a| a * a).sum::<f64>().sqrt();

    // all tokens, then the survivors of an eviction of every third token (not the last)
    let keep: Vec<bool> = (0..l).map(|t| t % 3 != 1 || t == l - 1).collect();
    for round in 0..2 {
        if round == 1 {
            let ev = session.evict(&keep).unwrap();
            assert!(ev.removed > 0);
        }
        let tokens = session.cached_tokens();
        assert_eq!(tokens.len(), if round == 0 { l } else { keep.iter().filter(|&&k| k).count() });
        let s = session.kv_stats(ALL, &tokens, None).unwrap();
        assert_eq!((s.n_layer, s.n_head_kv, s.n_tokens), (n_layer, n_head_kv, tokens.len()));
        let mut max_err = [0f64; 3];
        for il in 0..n_layer {
            for h in 0..n_head_kv {
                let keys: Vec<Vec<f64>> = tokens.iter().map(|&t| vec_of(&k[il], t, h)).collect();
                let cos = keydiff_cosines(&keys);
                for (i, &t) in tokens.iter().enumerate() {
                    let want = [norm(&keys[i]), norm(&vec_of(&v[il], t, h)), cos[i]];
                    let got = [s.knorm(il, h).unwrap()[i], s.vnorm(il, h).unwrap()[i], s.keydiff(il, h).unwrap()[i]];
                    for j in 0..3 {
                        let e = if j == 2 { (f64::from(got[j]) - want[j]).abs() } else { rel(f64::from(got[j]), want[j]) };
                        assert!(e <= tol, "layer {il} head {h} token {t} stat {j}: {} vs {}", got[j], want[j]);
                        max_err[j] = max_err[j].max(e);
                    }
                }
            }
        }
        eprintln!("{fa:?} {cache:?} round {round}: max error knorm {:.2e} vnorm {:.2e} keydiff {:.2e}", max_err[0], max_err[1], max_err[2]);
    }
}

/// The real small VLM (heads 64 wide, so a q8_0 cache's head rows are whole blocks, and K is
/// stored Hadamard-rotated): the scan of a q8_0 cache agrees with the F16 cache's in layer 0,
/// whose keys and values do not depend on the cache (later layers read the rounded cache, so
/// their keys differ by more than rounding).
#[test]
fn quantized_cache_scan_agrees_with_f16_on_the_real_model() {
    let d = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/cache/smolvlm-dino");
    if !d.join("text.gguf").exists() {
        assert!(std::env::var_os("CI").is_none(), "models/cache/smolvlm-dino is missing: CI must run models/build.sh first");
        eprintln!("\n*** SKIPPED: the real small VLM is not built here; run models/build.sh to include this test ***\n");
        return;
    }
    let mut cfg = csp_llava::ModelConfig::new(d.join("text.gguf"), d.join("mmproj.gguf"));
    cfg.threads = 2;
    let engine = csp_llava::Engine::load(&cfg).unwrap();
    let req = Request { images: vec![support::image(0), support::image(1)], prompt: "Which colour?".into(), ..Default::default() };
    let prompt = engine.prepare(&req).unwrap();
    let scan = |cache: CacheType| {
        let ctx = ContextConfig { n_ctx: 512, flash_attn: FlashAttn::On, type_k: cache, type_v: cache, ..Default::default() };
        let mut session = engine.session(&prompt, &ctx, Vec::new()).unwrap();
        session.prefill(&prompt, PrefillMode::Chunked, &mut |_| {}).unwrap();
        let tokens = session.cached_tokens();
        session.kv_stats(ALL, &tokens, None).unwrap()
    };
    let (f16, q8) = (scan(CacheType::F16), scan(CacheType::Q8_0));
    let mut max_err = [0f64; 3];
    for il in 0..1 {
        for h in 0..f16.n_head_kv {
            let pairs = [(f16.knorm(il, h), q8.knorm(il, h)), (f16.vnorm(il, h), q8.vnorm(il, h)), (f16.keydiff(il, h), q8.keydiff(il, h))];
            for (j, (a, b)) in pairs.into_iter().enumerate() {
                for (x, y) in a.unwrap().iter().zip(b.unwrap()) {
                    let e = if j == 2 { f64::from((x - y).abs()) } else { rel(f64::from(*y), f64::from(*x)) };
                    max_err[j] = max_err[j].max(e);
                }
            }
        }
    }
    eprintln!("q8_0 vs f16 cache, layer 0: max error knorm {:.2e} vnorm {:.2e} keydiff {:.2e}", max_err[0], max_err[1], max_err[2]);
    assert!(max_err.iter().all(|&e| e < 1e-2), "{max_err:?}");
}
