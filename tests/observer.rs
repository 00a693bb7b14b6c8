//! The attention observer against an independent recomputation: the RoPE'd queries and keys
//! (`Qcur-<il>`, `Kcur-<il>`) captured from the same run give the logits; causal n-softmax and
//! column sums by query modality are then computed here in f64 and compared — for the host
//! observer (`kq` logits, flash attention off) and the in-graph statistics (patch 0005), with
//! flash attention off and on.

mod support;

use csp_llava::config::{CacheType, ContextConfig, FlashAttn, ModelConfig, ObserverMode, Request, SamplingConfig};
use csp_llava::engine::PrefillMode;
use csp_llava::gguf::tiny;
use csp_llava::stats::{Bucket, Rows, StatRequest};
use csp_llava::span::Modality;
use csp_llava::Engine;

#[test]
fn observer_matches_recomputation_from_q_and_k() {
    recomputation(ObserverMode::Host, FlashAttn::Off);
}

#[test]
fn graph_statistics_match_recomputation_with_flash_attention_off() {
    recomputation(ObserverMode::Graph, FlashAttn::Off);
}

#[test]
fn graph_statistics_match_recomputation_with_flash_attention_on() {
    recomputation(ObserverMode::Graph, FlashAttn::Auto);
}

fn recomputation(observer: ObserverMode, fa: FlashAttn) {
    let mut cfg = ModelConfig::new(support::model(), support::mmproj());
    cfg.threads = 2;
    let engine = Engine::load(&cfg).unwrap();
    let req = Request {
        images: (0..4).map(support::image).collect(),
        prompt: "Which of the four images has a red shape?".into(),
        ..Default::default()
    };
    let prompt = engine.prepare(&req).unwrap();
    let l = prompt.n_tokens();
    let modality = prompt.token_modalities();
    // f32 cache: the recomputation uses f32 keys, so the cached keys must not be rounded to f16
    let ctx = ContextConfig { n_ctx: 1024, n_ubatch: 128, flash_attn: fa, type_k: CacheType::F32, type_v: CacheType::F32, observer, ..Default::default() };
    let n_layer = tiny::text::N_LAYER as usize;
    let (n_head, n_head_kv) = (tiny::text::N_HEAD as usize, tiny::text::N_HEAD_KV as usize);
    let head_dim = (tiny::text::N_EMBD / tiny::text::N_HEAD) as usize;
    let group = n_head / n_head_kv;

    // window of 120 rows: the question's text rows and the last image's rows, across ubatches;
    // and all rows with plain softmax — both gathered in one pass
    let requests = [StatRequest { rows: Rows::Last(120), n: 1.0 }, StatRequest { rows: Rows::All, n: 0.0 }];
    let mut session = engine.session(&prompt, &ctx, requests.to_vec()).unwrap();
    session.observer().unwrap().capture_qk(n_layer);
    session.prefill(&prompt, PrefillMode::Chunked, &mut |_| {}).unwrap();
    let want_mode = if observer == ObserverMode::Host { "host" } else { "graph" };
    assert_eq!(session.observer_mode(), Some(want_mode));
    // the host observer pauses flash attention for the prompt; the graph keeps what -fa chose
    assert_eq!(session.prefill_flash_attn(), observer == ObserverMode::Graph && session.flash_attn(), "{observer:?} {fa:?}");
    eprintln!("{observer:?}, -fa {fa:?}: flash attention during the prompt: {}", session.prefill_flash_attn());
    let captured = session.observer().unwrap().take_captured();
    let all_stats = session.take_stats(&prompt).unwrap();
    assert_eq!(all_stats.len(), 2);
    for (StatRequest { rows, n }, stats) in requests.into_iter().zip(all_stats) {
        assert!(stats.n_rows[0] > 0 && stats.n_rows[1] > 0, "window has text and image rows: {:?}", stats.n_rows);

        let first_row = match rows {
            Rows::Last(w) => l - w,
            Rows::All => 0,
            Rows::Elite { .. } | Rows::Moments { .. } => unreachable!("not requested here"),
        };
        let mut max_err = 0f64;
        for il in 0..n_layer {
            let gather = |name: &str, heads: usize| -> Vec<f32> {
                let v: Vec<f32> = captured.iter().filter(|c| c.name == name).flat_map(|c| c.data.iter().copied()).collect();
                assert_eq!(v.len(), l * heads * head_dim, "{name}: every prompt token captured once");
                v
            };
            let q = gather(&format!("Qcur-{il}"), n_head);
            let k = gather(&format!("Kcur-{il}"), n_head_kv);
            let scale = 1.0 / (head_dim as f64).sqrt();
            let mut want = vec![vec![vec![0f64; l]; n_head_kv]; 2]; // [bucket][kv head][token]
            for h in 0..n_head {
                let g = h / group;
                for t in first_row..l {
                    let qv = &q[(t * n_head + h) * head_dim..][..head_dim];
                    let x: Vec<f64> = (0..=t)
                        .map(|u| {
                            let kv = &k[(u * n_head_kv + g) * head_dim..][..head_dim];
                            qv.iter().zip(kv).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>() * scale
                        })
                        .collect();
                    let z: f64 = x.iter().map(|v| v.exp()).sum::<f64>() + f64::from(n);
                    let b = if modality[t] == Modality::Text { 0 } else { 1 };
                    for (u, v) in x.iter().enumerate() {
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
        eprintln!("{observer:?} -fa {fa:?} {rows:?} n={n}: max err {max_err:e}");
        assert!(max_err <= 1e-4, "{rows:?} n={n}: max |Δ column sum| = {max_err}");
        // the sums are not trivially zero
        let total: f32 = (0..n_layer).flat_map(|il| (0..n_head_kv).map(move |g| (il, g))).map(|(il, g)| stats.total(il, g).iter().sum::<f32>()).sum();
        assert!(total > 1.0);
    }
}

/// AirCache's elite window ([`Rows::Elite`]) against the same f64 recomputation: the last
/// token's text-only attention picks the elite text keys per layer (head mean, first token
/// excluded); the elite queries of the final ubatch attend over the image keys and the elite
/// text keys; image columns get the mean over those rows and heads — on the host (flash
/// attention off) and in the graph (patch 0008) with flash attention off and on, at α = 0.9
/// and 0.3 (more elite rows).
#[test]
fn elite_window_matches_recomputation() {
    elite_recomputation(ObserverMode::Host, FlashAttn::Off, 0.9);
}

#[test]
fn elite_window_in_the_graph_matches_recomputation_with_flash_attention_off() {
    elite_recomputation(ObserverMode::Graph, FlashAttn::Off, 0.9);
}

#[test]
fn elite_window_in_the_graph_matches_recomputation_with_flash_attention_on() {
    elite_recomputation(ObserverMode::Graph, FlashAttn::Auto, 0.9);
    elite_recomputation(ObserverMode::Graph, FlashAttn::Auto, 0.3);
}

fn elite_recomputation(observer: ObserverMode, fa: FlashAttn, alpha: f32) {
    let mut cfg = ModelConfig::new(support::model(), support::mmproj());
    cfg.threads = 2;
    let engine = Engine::load(&cfg).unwrap();
    let req = Request { images: (0..3).map(support::image).collect(), prompt: "Which of these images has a red shape in it?".into(), ..Default::default() };
    let prompt = engine.prepare(&req).unwrap();
    let l = prompt.n_tokens();
    let modality = prompt.token_modalities();
    let is_text = |u: usize| modality[u] == Modality::Text;
    let ctx = ContextConfig { n_ctx: 1024, n_ubatch: 128, flash_attn: fa, type_k: CacheType::F32, type_v: CacheType::F32, observer, ..Default::default() };
    let n_layer = tiny::text::N_LAYER as usize;
    let (n_head, n_head_kv) = (tiny::text::N_HEAD as usize, tiny::text::N_HEAD_KV as usize);
    let head_dim = (tiny::text::N_EMBD / tiny::text::N_HEAD) as usize;
    let group = n_head / n_head_kv;
    let last_span = prompt.spans.last().unwrap().n_tokens();
    assert!(last_span <= 128, "the final text chunk is one ubatch");
    let first_obs = l - last_span;

    let mut session = engine.session(&prompt, &ctx, vec![StatRequest { rows: Rows::Elite { alpha, keep_sink: false }, n: 0.0 }]).unwrap();
    session.observer().unwrap().capture_qk(n_layer);
    session.prefill(&prompt, PrefillMode::Chunked, &mut |_| {}).unwrap();
    assert_eq!(session.observer_mode(), Some(if observer == ObserverMode::Host { "host" } else { "graph" }));
    assert_eq!(session.prefill_flash_attn(), observer == ObserverMode::Graph && session.flash_attn(), "{observer:?} {fa:?}");
    let captured = session.observer().unwrap().take_captured();
    let stats = session.take_stats(&prompt).unwrap().remove(0);
    let scale = 1.0 / (head_dim as f64).sqrt();
    let mut max_err = 0f64;
    let mut total = 0f64;
    let mut n_elite = 0;
    for il in 0..n_layer {
        let gather = |name: &str| -> Vec<f32> { captured.iter().filter(|c| c.name == name).flat_map(|c| c.data.iter().copied()).collect() };
        let q = gather(&format!("Qcur-{il}"));
        let k = gather(&format!("Kcur-{il}"));
        let logit = |h: usize, t: usize, u: usize| -> f64 {
            let qv = &q[(t * n_head + h) * head_dim..][..head_dim];
            let kv = &k[(u * n_head_kv + h / group) * head_dim..][..head_dim];
            qv.iter().zip(kv).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>() * scale
        };
        let softmax = |h: usize, t: usize, keys: &[usize]| -> Vec<f64> {
            let x: Vec<f64> = keys.iter().map(|&u| logit(h, t, u)).collect();
            let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = x.iter().map(|v| (v - m).exp()).sum();
            x.iter().map(|v| (v - m).exp() / z).collect()
        };
        let text_keys: Vec<usize> = (0..l).filter(|&u| is_text(u)).collect();
        let mut att = vec![0f64; text_keys.len()];
        for h in 0..n_head {
            for (a, p) in att.iter_mut().zip(softmax(h, l - 1, &text_keys)) {
                *a += p / n_head as f64;
            }
        }
        let top = text_keys.iter().zip(&att).filter(|(u, _)| **u != 0).map(|(_, a)| *a).fold(0.0, f64::max);
        let mut elite: Vec<usize> = text_keys.iter().zip(&att).filter(|(u, a)| **u != 0 && **a >= f64::from(alpha) * top).map(|(u, _)| *u).collect();
        if !elite.contains(&(l - 1)) {
            elite.push(l - 1);
        }
        let observed: Vec<usize> = elite.iter().copied().filter(|&e| e >= first_obs).collect();
        n_elite += observed.len();
        let mut want = vec![vec![0f64; l]; n_head_kv];
        for h in 0..n_head {
            for &e in &observed {
                let keys: Vec<usize> = (0..=e).filter(|&u| !is_text(u) || elite.contains(&u)).collect();
                for (&u, p) in keys.iter().zip(softmax(h, e, &keys)) {
                    if !is_text(u) {
                        want[h / group][u] += p / (observed.len() * group) as f64;
                    }
                }
            }
        }
        for g in 0..n_head_kv {
            let got = stats.column(Bucket::Text, il, g);
            for u in 0..l {
                max_err = max_err.max((f64::from(got[u]) - want[g][u]).abs());
                total += want[g][u];
            }
        }
    }
    eprintln!("elite {observer:?} -fa {fa:?} alpha {alpha}: max err {max_err:e}, total {total}, {n_elite} elite rows over {n_layer} layers");
    assert!(total > 0.1, "elite queries see the images");
    assert!(max_err <= 1e-4, "max |Δ| = {max_err}");
}

/// The in-graph statistics change nothing the model computes: with flash attention on, the
/// prompt's logits are bit-identical with and without the observer, and so are 16 greedy tokens
/// (the observer removed after the prefill, the graph reused at decode).
#[test]
fn graph_observer_leaves_logits_unchanged() {
    let engine = support::engine();
    let req = Request { images: (0..2).map(support::image).collect(), prompt: "Which image is red?".into(), ..Default::default() };
    let prompt = engine.prepare(&req).unwrap();
    let ctx = ContextConfig { n_ctx: 1024, n_ubatch: 128, observer: ObserverMode::Graph, ..Default::default() };
    let sampling = SamplingConfig { n_predict: 16, temp: 0.0, ignore_eos: true, seed: Some(0), ..Default::default() };
    let run = |observe: Vec<StatRequest>| {
        let mut s = engine.session(&prompt, &ctx, observe).unwrap();
        s.prefill(&prompt, PrefillMode::Chunked, &mut |_| {}).unwrap();
        let logits = s.last_logits().unwrap().to_vec();
        let mode = s.observer_mode();
        let stats = s.take_stats(&prompt).unwrap();
        let gen = s.generate(&sampling, &mut |_| {}).unwrap();
        (logits, gen.tokens, mode, stats, s.prefill_flash_attn())
    };
    let (plain, plain_tokens, none, _, _) = run(Vec::new());
    let requests = vec![StatRequest { rows: Rows::Last(40), n: 1.0 }, StatRequest { rows: Rows::All, n: 0.0 }];
    let (observed, observed_tokens, graph, stats, fa) = run(requests);
    assert_eq!(none, None);
    assert_eq!(graph, Some("graph"));
    eprintln!("flash attention during the observed prompt: {fa}");
    assert_eq!(stats.len(), 2);
    assert!(stats.iter().all(|s| s.n_rows[0] > 0), "rows were observed");
    assert!(plain.iter().zip(&observed).all(|(a, b)| a.to_bits() == b.to_bits()), "prompt logits differ with the observer");
    assert_eq!(plain_tokens, observed_tokens);
}
