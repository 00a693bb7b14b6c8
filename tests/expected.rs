//! Expected Attention (patch 0013) against an independent recomputation from what was captured
//! while the prompt was read: the query moments the in-graph observer sums (pre-RoPE `Qcur-<il>`
//! of the rows from `skip` on, over several ubatches, GQA) and the scores `z` the KV scan computes
//! from them (post-RoPE `Kcur-<il>`), with flash attention off and on; and, on the real small
//! VLM, a q8_0 cache (keys stored Hadamard-rotated) against an F16 one. The policy end to end is
//! in `tests/pruning.rs` and `tests/bounded.rs` with the others.

mod support;

use csp_llava::config::{CacheType, ContextConfig, FlashAttn, ObserverMode, Request};
use csp_llava::engine::PrefillMode;
use csp_llava::gguf::tiny;
use csp_llava::stats::{ExpectedRequest, KvRequest, QueryMoments, Rope, Rows, StatRequest};

const SKIP: usize = 3;

fn rel(a: f64, b: f64, scale: f64) -> f64 {
    (a - b).abs() / b.abs().max(scale)
}

#[test]
fn moments_and_scores_match_recomputation_flash_attention_off() {
    check(FlashAttn::Off);
}

#[test]
fn moments_and_scores_match_recomputation_flash_attention_on() {
    check(FlashAttn::Auto);
}

fn check(fa: FlashAttn) {
    let engine = support::engine();
    let req = Request { images: (0..3).map(support::image).collect(), prompt: "Which image is red?".into(), ..Default::default() };
    let prompt = engine.prepare(&req).unwrap();
    let l = prompt.n_tokens();
    let ctx = ContextConfig { n_ctx: 1024, n_ubatch: 16, flash_attn: fa, type_k: CacheType::F32, type_v: CacheType::F32, observer: ObserverMode::Graph, ..Default::default() };
    let (n_layer, n_head, n_head_kv) = (tiny::text::N_LAYER as usize, tiny::text::N_HEAD as usize, tiny::text::N_HEAD_KV as usize);
    let d = (tiny::text::N_EMBD / tiny::text::N_HEAD) as usize;
    let mut session = engine.session(&prompt, &ctx, vec![StatRequest { rows: Rows::Moments { skip: SKIP }, n: 0.0 }]).unwrap();
    session.observer().unwrap().capture_q_pre_k(n_layer);
    session.prefill(&prompt, PrefillMode::Chunked, &mut |_| {}).unwrap();
    let captured = session.observer().unwrap().take_captured();
    let stats = session.take_stats(&prompt).unwrap();
    let m: &QueryMoments = stats[0].moments.as_ref().expect("query moments observed");
    assert_eq!((m.n_layer, m.n_head, m.d), (n_layer, n_head, d));
    assert!(m.rows.iter().all(|&r| r == l - SKIP), "rows {:?} of {l} (skip {SKIP})", m.rows);
    let rows = |name: &str, heads: usize| -> Vec<f32> {
        let v: Vec<f32> = captured.iter().filter(|c| c.name == name).flat_map(|c| c.data.iter().copied()).collect();
        assert_eq!(v.len(), l * heads * d, "{name}: every prompt token captured once");
        v
    };
    // moments: mean and covariance of the rows t ≥ SKIP
    let mut max_err = [0f64; 2];
    for il in 0..n_layer {
        let q = rows(&format!("Qcur-{il}"), n_head);
        for h in 0..n_head {
            let qs: Vec<Vec<f64>> = (SKIP..l).map(|t| q[(t * n_head + h) * d..][..d].iter().map(|&x| f64::from(x)).collect()).collect();
            let n = qs.len() as f64;
            let mu: Vec<f64> = (0..d).map(|i| qs.iter().map(|x| x[i]).sum::<f64>() / n).collect();
            let (got_mu, got_cov) = m.mean_cov(il, h);
            let scale = mu.iter().map(|x| x.abs()).fold(0.0, f64::max);
            for i in 0..d {
                max_err[0] = max_err[0].max(rel(got_mu[i], mu[i], scale));
                for j in 0..d {
                    let c = qs.iter().map(|x| (x[i] - mu[i]) * (x[j] - mu[j])).sum::<f64>() / n;
                    max_err[1] = max_err[1].max((got_cov[i * d + j] - c).abs() / (scale * scale).max(1e-6));
                }
            }
        }
    }
    eprintln!("{fa:?}: moments max error mean {:.2e} cov {:.2e}", max_err[0], max_err[1]);
    assert!(max_err[0] < 1e-5 && max_err[1] < 1e-4, "{max_err:?}");

    // z against μ′·k/√d + kᵀΣ′k/(2d) from the captured keys, the same μ′ and Σ′; with the
    // covariance and without
    let rope = Rope { n_rot: d, freq_base: 10_000.0, freq_scale: 1.0, neox: false };
    let tokens = session.cached_tokens();
    assert_eq!(tokens.len(), l);
    for cov in [true, false] {
        let (mu, sigma) = m.future(&rope, l, 64, cov);
        let kv = session.kv_stats(KvRequest { expected: Some(ExpectedRequest { n_future: 64, cov }), ..KvRequest::default() }, &tokens, Some(m)).unwrap();
        assert_eq!(kv.n_head, n_head);
        let mut err = 0f64;
        for il in 0..n_layer {
            let k = rows(&format!("Kcur-{il}"), n_head_kv);
            for h in 0..n_head {
                let kvh = h / (n_head / n_head_kv);
                let mo = (il * n_head + h) * d;
                let z = kv.z(il, h).unwrap();
                for (i, &t) in tokens.iter().enumerate() {
                    let key: Vec<f64> = k[(t * n_head_kv + kvh) * d..][..d].iter().map(|&x| f64::from(x)).collect();
                    let mut want = (0..d).map(|a| f64::from(mu[mo + a]) * key[a]).sum::<f64>() / (d as f64).sqrt();
                    if let Some(s) = &sigma {
                        let so = mo * d;
                        let quad: f64 = (0..d).map(|a| (0..d).map(|b| key[a] * f64::from(s[so + a * d + b]) * key[b]).sum::<f64>()).sum();
                        want += quad / (2.0 * d as f64);
                    }
                    let e = rel(f64::from(z[i]), want, 1e-2);
                    assert!(e < 1e-3, "cov {cov} layer {il} head {h} token {t}: {} vs {want}", z[i]);
                    err = err.max(e);
                }
            }
        }
        eprintln!("{fa:?}: z (cov {cov}) max rel. error {err:.2e}");
    }
}

/// The real small VLM with a q8_0 cache, whose keys llama.cpp stores Hadamard-rotated (heads 64
/// wide): z agrees with an F16 cache's in layer 0 (the same keys up to rounding), so the query
/// distribution is rotated like the keys.
#[test]
fn quantized_cache_scores_agree_with_f16_on_the_real_model() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/cache/smolvlm-dino");
    if !dir.join("text.gguf").exists() {
        assert!(std::env::var_os("CI").is_none(), "models/cache/smolvlm-dino is missing: CI must run models/build.sh first");
        eprintln!("\n*** SKIPPED: the real small VLM is not built here; run models/build.sh to include this test ***\n");
        return;
    }
    let mut cfg = csp_llava::ModelConfig::new(dir.join("text.gguf"), dir.join("mmproj.gguf"));
    cfg.threads = 2;
    let engine = csp_llava::Engine::load(&cfg).unwrap();
    let req = Request { images: vec![support::image(0), support::image(1)], prompt: "Which colour?".into(), ..Default::default() };
    let prompt = engine.prepare(&req).unwrap();
    let want = KvRequest { expected: Some(ExpectedRequest { n_future: 512, cov: true }), ..KvRequest::default() };
    let scan = |cache: CacheType| {
        let ctx = ContextConfig { n_ctx: 512, flash_attn: FlashAttn::On, type_k: cache, type_v: cache, observer: ObserverMode::Graph, ..Default::default() };
        let mut session = engine.session(&prompt, &ctx, vec![StatRequest { rows: Rows::Moments { skip: 4 }, n: 0.0 }]).unwrap();
        session.prefill(&prompt, PrefillMode::Chunked, &mut |_| {}).unwrap();
        let stats = session.take_stats(&prompt).unwrap();
        let tokens = session.cached_tokens();
        session.kv_stats(want, &tokens, stats[0].moments.as_ref()).unwrap()
    };
    let (f16, q8) = (scan(CacheType::F16), scan(CacheType::Q8_0));
    let mut max_err = 0f64;
    for h in 0..f16.n_head {
        let (a, b) = (f16.z(0, h).unwrap(), q8.z(0, h).unwrap());
        let scale = a.iter().map(|x| f64::from(x.abs())).fold(0.0, f64::max);
        for (x, y) in a.iter().zip(b) {
            max_err = max_err.max(f64::from((x - y).abs()) / scale.max(1e-3));
        }
    }
    eprintln!("q8_0 vs f16 cache, layer 0: z max error {max_err:.2e} (relative to the largest |z|)");
    assert!(max_err < 2e-2, "{max_err}");
}
