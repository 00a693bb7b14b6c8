//! Model families beyond LLaVA-1.5, as tiny random-weight models (`gen-tiny-model --family`):
//! every policy either works — observed, evicted, compacted, decodes, and budget 1.0 reproduces
//! the full cache's greedy text — or is refused with one line.
//!
//! * LLaVA-1.6: the same llama text model; the mmproj has any-resolution pinpoints
//!   (`clip.vision.image_grid_pinpoints`), `spatial_unpad` and `v.image_newline`, so a 128 px
//!   image becomes an overview plus 2×2 tiles (320 tokens where LLaVA-1.5's projector makes 64).
//! * Gemma 3 and Qwen2.5-VL (`src/gguf/families.rs`): what prunes and what is refused, and why.

mod support;

use csp_llava::config::{ContextConfig, FlashAttn, KvCap, Request, SamplingConfig};
use csp_llava::gguf::families::{write_family, Family};
use csp_llava::gguf::tiny;
use csp_llava::policy::{Budget, PolicyConfig, PolicySpec};
use csp_llava::{Engine, ModelConfig, RunReport};

/// The LLaVA-1.6 tiny model and two 128 px images, in a temporary directory.
fn llava16() -> (Engine, Request, tempfile::TempDir) {
    family(Family::Llava16, 2, 7, "Which image shows a circle?")
}

fn greedy() -> SamplingConfig {
    SamplingConfig { n_predict: 12, temp: 0.0, ignore_eos: true, seed: Some(1), ..Default::default() }
}

fn run(e: &Engine, req: &Request, ctx: &ContextConfig, spec: &str, budget: f64) -> RunReport {
    let spec: PolicySpec = spec.parse().unwrap();
    let policy = spec.config(&PolicyConfig::default(), Budget::Fraction(budget));
    e.run(req, ctx, &greedy(), &policy, &mut |_| {}).unwrap_or_else(|err| panic!("{spec} {budget}: {err}"))
}

use support::PRUNING as POLICIES;

#[test]
fn llava16_any_resolution_runs_and_every_policy_prunes() {
    let (e, req, _dir) = llava16();
    let ctx = ContextConfig { n_ctx: 2048, flash_attn: FlashAttn::Auto, ..Default::default() };
    let full = run(&e, &req, &ctx, "full", 1.0);
    assert_eq!(full.image_tokens, vec![320, 320], "an overview and 2×2 tiles of 64 tokens per image");
    assert_eq!(full.n_generated, 12);
    for kind in POLICIES {
        let same = run(&e, &req, &ctx, kind.name(), 1.0);
        assert_eq!(same.text, full.text, "{kind} at budget 1.0");
        assert!(!same.pruned, "{kind}");
        let r = run(&e, &req, &ctx, kind.name(), 0.2);
        assert!(r.pruned, "{kind} at 0.2 prunes");
        assert!(r.kv_cells_after < full.kv_cells_after / 2, "{kind}: {} of {} cells", r.kv_cells_after, full.kv_cells_after);
        assert_eq!(r.n_generated, 12, "{kind} decodes after pruning");
    }
    // per layer and per head where the policy has those granularities
    for spec in ["csp@layer", "csp@head", "h2o@head", "snapkv@head"] {
        assert_eq!(run(&e, &req, &ctx, spec, 1.0).text, full.text, "{spec} at budget 1.0");
        let r = run(&e, &req, &ctx, spec, 0.2);
        assert!(r.pruned && r.n_generated == 12, "{spec}");
    }
}

/// SmolVLM (Idefics3): a llama text model, so every policy works as on LLaVA; the images are
/// tiles + an overview, pixel-shuffled to 4 tokens each.
#[test]
fn smolvlm_tiles_run_and_every_policy_prunes() {
    let (e, req, _dir) = family(Family::SmolVlm, 2, 13, "Which image shows a circle?");
    let ctx = ContextConfig { n_ctx: 1024, ..Default::default() };
    let full = run(&e, &req, &ctx, "full", 1.0);
    assert_eq!(full.image_tokens, vec![20, 20], "an overview and 2×2 tiles of 4 tokens per 64 px image");
    assert_eq!(full.n_generated, 12);
    for kind in POLICIES {
        assert_eq!(run(&e, &req, &ctx, kind.name(), 1.0).text, full.text, "{kind} at budget 1.0");
        let r = run(&e, &req, &ctx, kind.name(), 0.3);
        assert!(r.pruned && r.kv_cells_after < full.kv_cells_after / 2 && r.n_generated == 12, "{kind}: {} of {} cells", r.kv_cells_after, full.kv_cells_after);
    }
    for spec in ["csp@head", "h2o@layer"] {
        assert_eq!(run(&e, &req, &ctx, spec, 1.0).text, full.text, "{spec} at budget 1.0");
        assert!(run(&e, &req, &ctx, spec, 0.3).pruned, "{spec}");
    }
    // 136 prompt tokens through 64 cells (the reserve, a quarter of the cap, holds the 12
    // generated tokens)
    let capped = ContextConfig { kv_max_cells: Some(KvCap::Cells(64)), kv_shift: true, ..Default::default() };
    for spec in ["csp", "expected", "streaming"] {
        let r = run(&e, &req, &capped, spec, 0.3);
        assert!(r.kv_cells_peak <= 64 && !r.evictions.is_empty() && r.n_generated == 12, "{spec}: peak {}", r.kv_cells_peak);
    }
}

#[test]
fn llava16_reads_tiles_under_a_cap() {
    let (e, req, _dir) = llava16();
    // 320-token images through a 480-cell cache: evictions while they are read
    let ctx = ContextConfig { kv_max_cells: Some(KvCap::Cells(480)), kv_shift: true, ..Default::default() };
    for spec in ["csp", "snapkv", "streaming"] {
        let r = run(&e, &req, &ctx, spec, 0.2);
        assert!(r.kv_cells_peak <= 480, "{spec}: peak {}", r.kv_cells_peak);
        assert!(!r.evictions.is_empty(), "{spec} evicted while reading");
        assert_eq!(r.n_generated, 12);
    }
    // the tiles are chunks of 64 tokens read one at a time: a cap below a whole image works …
    let tight = ContextConfig { kv_max_cells: Some(KvCap::Cells(200)), ..Default::default() };
    let r = run(&e, &req, &tight, "csp", 0.2);
    assert!(r.kv_cells_peak <= 200 && r.n_generated == 12, "peak {}", r.kv_cells_peak);
    // … but not below one tile, which is refused with the size needed
    let small = ContextConfig { kv_max_cells: Some(KvCap::Cells(40)), ..Default::default() };
    let spec: PolicySpec = "csp".parse().unwrap();
    match e.run(&req, &small, &greedy(), &spec.config(&PolicyConfig::default(), Budget::Fraction(0.2)), &mut |_| {}) {
        Ok(r) => panic!("a 40-cell cap ran: peak {}", r.kv_cells_peak),
        Err(err) => assert!(err.to_string().contains("at least 65"), "{err}"),
    }
}

/// The tiny model of `f` and `n` 128 px sample images (seed `seed`) in a temporary directory,
/// loaded with 2 threads, and a request asking `prompt` about the images.
fn family(f: Family, n: usize, seed: u64, prompt: &str) -> (Engine, Request, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    write_family(dir.path(), f, 0).unwrap();
    let images: Vec<_> = (0..n)
        .map(|i| {
            let p = dir.path().join(format!("big-{i}.png"));
            tiny::write_png(&p, 128, &tiny::sample_image_rgb(seed, i, 128)).unwrap();
            p
        })
        .collect();
    let mut cfg = ModelConfig::new(dir.path().join(tiny::TEXT_FILE), dir.path().join(tiny::MMPROJ_FILE));
    cfg.threads = 2;
    let engine = Engine::load(&cfg).unwrap_or_else(|e| panic!("the {} tiny model loads: {e}", f.name()));
    (engine, Request { images, prompt: prompt.into(), ..Default::default() }, dir)
}

fn refusal(e: &Engine, req: &Request, ctx: &ContextConfig, spec: &str) -> String {
    let spec: PolicySpec = spec.parse().unwrap();
    match e.run(req, ctx, &greedy(), &spec.config(&PolicyConfig::default(), Budget::Fraction(0.3)), &mut |_| {}) {
        Ok(r) => panic!("{spec} ran (kept {} cells) where it should be refused", r.kv_cells_after),
        Err(err) => err.to_string(),
    }
}

/// Gemma 3: sliding-window layers (an iSWA cache) and image tokens that attend both ways.
/// StreamingLLM, random and the attention-based policies (observed in the graph with the
/// layer's own mask, patch 0015) prune, decode, reproduce the full cache at budget 1.0 and bound
/// the prefill; the KV scans (plain caches only), the host observer and per-layer/head masks are
/// refused with one line.
#[test]
fn gemma3_prunes_with_every_policy_the_caches_allow() {
    let (e, req, _dir) = family(Family::Gemma3, 3, 11, "Describe the images.");
    let ctx = ContextConfig { n_ctx: 1024, ..Default::default() };
    let full = run(&e, &req, &ctx, "full", 1.0);
    assert_eq!(full.image_tokens, vec![16, 16, 16], "SigLIP 128 px, patch 8, pooled 4×4");
    // the window layers hold the window + a ubatch by default (llama.cpp's tools); --swa-full
    // sizes them to the whole context: more bytes, the same text
    let whole = run(&e, &req, &ContextConfig { swa_full: true, n_ctx: 4096, ..ctx }, "full", 1.0);
    let windowed = run(&e, &req, &ContextConfig { n_ctx: 4096, ..ctx }, "full", 1.0);
    assert_eq!(whole.text, windowed.text);
    assert!(windowed.kv_bytes_allocated * 3 < whole.kv_bytes_allocated * 2, "{} vs {}", windowed.kv_bytes_allocated, whole.kv_bytes_allocated);
    for spec in ["streaming", "random"] {
        assert_eq!(run(&e, &req, &ctx, spec, 1.0).text, full.text, "{spec} at budget 1.0");
        let r = run(&e, &req, &ctx, spec, 0.3);
        assert!(r.pruned && r.kv_cells_after < full.kv_cells_after && r.n_generated == 12, "{spec}: {} of {} cells", r.kv_cells_after, full.kv_cells_after);
        // under a cap: the full-attention cache never holds more than the cap
        let capped = ContextConfig { kv_max_cells: Some(KvCap::Cells(80)), ..Default::default() };
        let r = run(&e, &req, &capped, spec, 0.3);
        assert!(r.kv_cells_peak <= 80 && !r.evictions.is_empty() && r.n_generated == 12, "{spec}: peak {}", r.kv_cells_peak);
        let shifted = ContextConfig { kv_shift: true, ..capped };
        let r = run(&e, &req, &shifted, spec, 0.3);
        assert!(r.max_pos < 80 && r.n_generated == 12, "{spec} with --kv-shift: max_pos {}", r.max_pos);
    }
    // the attention-based policies, observed in the graph over both caches (patch 0015)
    for spec in ["csp", "h2o", "snapkv", "aircache"] {
        assert_eq!(run(&e, &req, &ctx, spec, 1.0).text, full.text, "{spec} at budget 1.0");
        let r = run(&e, &req, &ctx, spec, 0.3);
        assert_eq!(r.observer, Some("graph"), "{spec}");
        assert!(r.pruned && r.kv_cells_after < full.kv_cells_after && r.n_generated == 12, "{spec}: {} of {} cells", r.kv_cells_after, full.kv_cells_after);
        let capped = ContextConfig { kv_max_cells: Some(KvCap::Cells(80)), ..Default::default() };
        let r = run(&e, &req, &capped, spec, 0.3);
        assert!(r.kv_cells_peak <= 80 && !r.evictions.is_empty() && r.n_generated == 12, "{spec}: peak {}", r.kv_cells_peak);
    }
    // the host observer assumes causal attention: refused for images that attend both ways
    let host = ContextConfig { observer: csp_llava::config::ObserverMode::Host, ..ctx };
    let err = refusal(&e, &req, &host, "csp");
    assert!(err.contains("attend bidirectionally"), "{err}");
    for spec in ["knorm", "vnorm", "keydiff", "expected"] {
        let err = refusal(&e, &req, &ctx, spec);
        assert!(err.contains("cannot scan this cache"), "{spec}: {err}");
    }
    for spec in ["csp@head", "h2o@layer"] {
        let err = refusal(&e, &req, &ctx, spec);
        assert!(err.contains("sliding-window cache") && err.contains("--kv-granularity global"), "{spec}: {err}");
    }
    let err = refusal(&e, &req, &ctx, "lookm");
    assert!(err.contains("cannot merge this cache"), "{err}");
}

/// Gemma 3's in-graph statistics (patch 0015) against the model's own attention: with flash
/// attention off, the probabilities llama.cpp computes (`kq_soft_max-<il>`, with the layer's
/// mask: causal text, images attending both ways, the sliding window) summed like the observer
/// sums them. Layer 1 attends over the base cache, whose cell j holds prompt token j here; the
/// sliding-window layer 0's sums each row to 1 over the tokens its window keeps.
#[test]
fn gemma3_observer_sums_match_the_models_own_softmax() {
    use csp_llava::config::ObserverMode;
    use csp_llava::engine::PrefillMode;
    use csp_llava::span::Modality;
    use csp_llava::stats::{Bucket, Rows, StatRequest};
    let (e, req, _dir) = family(Family::Gemma3, 2, 11, "Describe the images.");
    let prompt = e.prepare(&req).unwrap();
    let l = prompt.n_tokens();
    let m = e.model();
    let (n_layer, n_head, n_head_kv) = (m.n_layer() as usize, m.n_head() as usize, m.n_head_kv() as usize);
    let g = n_head / n_head_kv;
    let ctx = ContextConfig { n_ctx: 512, flash_attn: FlashAttn::Off, observer: ObserverMode::Graph, ..Default::default() };
    let mut session = e.session(&prompt, &ctx, vec![StatRequest { rows: Rows::Last(l), n: 0.0 }]).unwrap();
    session.observer().unwrap().capture_attention(n_layer);
    session.prefill(&prompt, PrefillMode::Chunked, &mut |_| {}).unwrap();
    assert_eq!(session.observer_mode(), Some("graph"));
    let captured = session.observer().unwrap().take_captured();
    let stats = session.take_stats(&prompt).unwrap().remove(0);
    let modality = prompt.token_modalities();
    // layer 1: the observer's columns from the captured probabilities, ubatch by ubatch
    let mut want = [vec![0f64; l], vec![0f64; l]];
    let mut row0 = 0;
    let mut non_causal = 0;
    for c in captured.iter().filter(|c| c.name == "kq_soft_max-1") {
        let [n_kv, n_rows, heads, _] = c.ne;
        assert_eq!(heads, n_head);
        for r in 0..n_rows {
            let t = row0 + r;
            let bucket = if modality[t] == Modality::Text { 0 } else { 1 };
            for h in 0..n_head {
                for j in 0..n_kv.min(l) {
                    let p = f64::from(c.data[(h * n_rows + r) * n_kv + j]);
                    want[bucket][j] += p / g as f64;
                    if j > t && p > 0.0 {
                        non_causal += 1;
                    }
                }
            }
        }
        row0 += n_rows;
    }
    assert_eq!(row0, l, "every prompt row captured once");
    assert!(non_causal > 0, "image rows attend to later image tokens");
    let mut max_err = 0f64;
    for (b, bucket) in [Bucket::Text, Bucket::Media].into_iter().enumerate() {
        let mut got = vec![0f64; l];
        for h in 0..n_head_kv {
            for (a, v) in got.iter_mut().zip(stats.column(bucket, 1, h)) {
                *a += f64::from(*v);
            }
        }
        for j in 0..l {
            let err = (got[j] - want[b][j]).abs();
            max_err = max_err.max(err);
            assert!(err <= 1e-4 * want[b][j].max(1.0), "layer 1 {bucket:?} token {j}: {} vs {}", got[j], want[b][j]);
        }
    }
    // layer 0 (sliding window): every observed row's probabilities sum to 1 over what it sees
    let total: f64 = [Bucket::Text, Bucket::Media].into_iter().flat_map(|b| (0..n_head_kv).map(move |h| (b, h))).map(|(b, h)| stats.column(b, 0, h).iter().map(|&v| f64::from(v)).sum::<f64>()).sum();
    let rows = (l * n_head_kv) as f64; // each row's probabilities sum to 1 per KV head (mean of its group)
    assert!((total - rows).abs() < 1e-3 * rows, "layer 0: {total} for {l} rows × {n_head_kv} KV heads");
    eprintln!("gemma3 observer vs kq_soft_max (layer 1): max error {max_err:.2e}");
}

/// Qwen2.5-VL: M-RoPE gives an image's tokens one position (they differ in 2-D), so cells are
/// removed and named by rank (patch 0014). Every policy prunes — observed in the graph, evicted,
/// compacted, decodes, budget 1.0 reproduces the full cache — per layer and head too, and under
/// a cap (Expected Attention too: a future text query's M-RoPE rotation is NEOX's, checked
/// below); `--kv-shift` is refused with the reason.
#[test]
fn qwen25vl_every_policy_prunes_by_cell() {
    let (e, req, _dir) = family(Family::Qwen25Vl, 3, 11, "Describe the images.");
    let ctx = ContextConfig { n_ctx: 1024, ..Default::default() };
    let full = run(&e, &req, &ctx, "full", 1.0);
    assert_eq!(full.image_tokens.len(), 3);
    assert!(full.image_tokens.iter().all(|&n| n >= 8), "(w/28)·(h/28) tokens, at least 8: {:?}", full.image_tokens);
    assert_eq!(full.n_generated, 12);
    let n_image: usize = full.image_tokens.iter().sum();
    for kind in POLICIES {
        let same = run(&e, &req, &ctx, kind.name(), 1.0);
        assert_eq!(same.text, full.text, "{kind} at budget 1.0");
        let r = run(&e, &req, &ctx, kind.name(), 0.2);
        assert!(r.pruned && r.n_generated == 12, "{kind} prunes and decodes");
        assert!(r.kv_cells_after < full.kv_cells_after / 2, "{kind}: {} of {} cells", r.kv_cells_after, full.kv_cells_after);
        // single tokens of an image went, not whole images (one position each)
        let kept = r.kept_per_modality.image;
        assert!(kept < n_image, "{kind}: {kept} of {n_image} image tokens kept");
        if matches!(kind.name(), "csp" | "random" | "knorm") {
            assert!(kept > 0, "{kind}: some image tokens kept");
        }
        // llama.cpp holds exactly the cells the policy kept
        assert_eq!(r.kv_cells_after as usize, r.kv_cells_physical, "{kind}");
    }
    // the in-graph observer names rows and cells by rank: it agrees with the host observer,
    // which reads the cells each ubatch was written to
    let host = ContextConfig { observer: csp_llava::config::ObserverMode::Host, ..ctx };
    for spec in ["csp", "h2o", "snapkv", "aircache"] {
        let (g, h) = (run(&e, &req, &ctx, spec, 0.2), run(&e, &req, &host, spec, 0.2));
        let kept = |r: &RunReport| r.retention.iter().map(|t| t.kept).collect::<Vec<_>>();
        assert_eq!((g.observer, h.observer, g.retention.len()), (Some("graph"), Some("host"), full.n_prompt_tokens), "{spec}");
        assert_eq!(kept(&g), kept(&h), "{spec}: graph and host observers keep the same tokens");
        assert_eq!(g.text, h.text, "{spec}");
    }
    for spec in ["csp@layer", "csp@head", "h2o@head", "snapkv@head", "aircache", "prefixkv"] {
        assert_eq!(run(&e, &req, &ctx, spec, 1.0).text, full.text, "{spec} at budget 1.0");
        let r = run(&e, &req, &ctx, spec, 0.2);
        assert!(r.pruned && r.n_generated == 12, "{spec}");
        if spec == "prefixkv" {
            assert!(r.decode_evicted > 0, "PrefixKV's decode-time FIFO masks cells by key");
        }
    }
    // a bounded prefill: images are read whole, evictions between them
    let capped = ContextConfig { kv_max_cells: Some(KvCap::Cells(96)), ..Default::default() };
    for spec in ["csp", "h2o", "streaming", "knorm", "expected"] {
        let r = run(&e, &req, &capped, spec, 0.3);
        assert!(r.kv_cells_peak <= 96 && !r.evictions.is_empty() && r.n_generated == 12, "{spec}: peak {}", r.kv_cells_peak);
    }
    let shifted = ContextConfig { kv_max_cells: Some(KvCap::Cells(96)), kv_shift: true, ..Default::default() };
    let err = refusal(&e, &req, &shifted, "streaming");
    assert!(err.contains("M-RoPE"), "{err}");
}

/// Under M-RoPE llama.cpp names cells by rank (patch 0014): after evicting every third prompt
/// token (single tokens of each image among them), the cells the cache still holds are exactly
/// the kept tokens, in order — each cell's key norm and value norm (the KV scan, by rank) equal
/// those of the kept token's key and value captured while the prompt was read.
#[test]
fn qwen25vl_eviction_by_key_keeps_exactly_the_kept_tokens() {
    use csp_llava::config::{CacheType, ObserverMode};
    use csp_llava::engine::PrefillMode;
    use csp_llava::stats::{KvRequest, Rows, StatRequest};
    let (e, req, _dir) = family(Family::Qwen25Vl, 2, 5, "Which image is red?");
    let prompt = e.prepare(&req).unwrap();
    let l = prompt.n_tokens();
    let m = e.model();
    let (n_layer, n_head_kv) = (m.n_layer() as usize, m.n_head_kv() as usize);
    let d = m.n_embd() as usize / m.n_head() as usize;
    let ctx = ContextConfig { n_ctx: 512, n_ubatch: 32, type_k: CacheType::F32, type_v: CacheType::F32, observer: ObserverMode::Graph, ..Default::default() };
    let mut session = e.session(&prompt, &ctx, vec![StatRequest { rows: Rows::Last(1), n: 0.0 }]).unwrap();
    session.observer().unwrap().capture_kv(n_layer);
    session.prefill(&prompt, PrefillMode::Chunked, &mut |_| {}).unwrap();
    let captured = session.observer().unwrap().take_captured();
    let rows = |name: &str| -> Vec<f32> {
        let v: Vec<f32> = captured.iter().filter(|c| c.name == name).flat_map(|c| c.data.iter().copied()).collect();
        assert_eq!(v.len(), l * n_head_kv * d, "{name}: every prompt token captured once");
        v
    };
    let norm = |x: &[f32], t: usize, h: usize| x[(t * n_head_kv + h) * d..][..d].iter().map(|&a| f64::from(a).powi(2)).sum::<f64>().sqrt();
    let keep: Vec<bool> = (0..l).map(|t| t % 3 != 1 || t == l - 1).collect();
    let media = prompt.token_modalities();
    assert!((0..l).any(|t| !keep[t] && media[t] != csp_llava::span::Modality::Text), "image tokens among the evicted");
    let ev = session.evict(&keep).unwrap();
    assert_eq!(ev.removed, keep.iter().filter(|&&k| !k).count());
    let tokens = session.cached_tokens();
    assert_eq!(tokens, (0..l).filter(|&t| keep[t]).collect::<Vec<_>>());
    let s = session.kv_stats(KvRequest { knorm: true, vnorm: true, ..KvRequest::default() }, &tokens, None).unwrap();
    for il in 0..n_layer {
        let (k, v) = (rows(&format!("Kcur-{il}")), rows(&format!("Vcur-{il}")));
        for h in 0..n_head_kv {
            for (i, &t) in tokens.iter().enumerate() {
                let (gk, gv) = (f64::from(s.knorm(il, h).unwrap()[i]), f64::from(s.vnorm(il, h).unwrap()[i]));
                let (wk, wv) = (norm(&k, t, h), norm(&v, t, h));
                assert!((gk - wk).abs() <= 1e-4 * wk.max(1e-3) && (gv - wv).abs() <= 1e-4 * wv.max(1e-3), "layer {il} head {h} token {t}: ‖k‖ {gk} vs {wk}, ‖v‖ {gv} vs {wv}");
            }
        }
    }
}

/// Expected Attention rotates the prompt's query statistics to the next text positions as 1-D
/// NEOX RoPE. Under M-RoPE that holds for text tokens (the same position in every section):
/// llama.cpp's rotated `Qcur` of the prompt's last text tokens equals the NEOX rotation of their
/// pre-RoPE `Qcur` at their positions (which M-RoPE makes fewer than the tokens).
#[test]
fn qwen25vl_text_queries_rotate_as_neox() {
    use csp_llava::config::ObserverMode;
    use csp_llava::engine::PrefillMode;
    use csp_llava::span::Modality;
    use csp_llava::stats::{Rope, Rows, StatRequest};
    let (e, req, _dir) = family(Family::Qwen25Vl, 2, 5, "Which image is red?");
    let prompt = e.prepare(&req).unwrap();
    let (l, n_pos) = (prompt.n_tokens(), prompt.n_positions() as usize);
    assert!(n_pos < l, "M-RoPE: {n_pos} positions for {l} tokens");
    let m = e.model();
    let (n_layer, n_head) = (m.n_layer() as usize, m.n_head() as usize);
    let d = m.n_embd() as usize / n_head;
    let freq_base: f64 = m.meta("qwen2vl.rope.freq_base").unwrap().parse().unwrap();
    let rope = Rope { n_rot: d, freq_base, freq_scale: 1.0, neox: true };
    let ctx = ContextConfig { n_ctx: 512, observer: ObserverMode::Graph, ..Default::default() };
    let q_of = |pre: bool| {
        let mut s = e.session(&prompt, &ctx, vec![StatRequest { rows: Rows::Last(1), n: 0.0 }]).unwrap();
        let obs = s.observer().unwrap();
        if pre { obs.capture_q_pre_k(n_layer) } else { obs.capture_qk(n_layer) }
        s.prefill(&prompt, PrefillMode::Chunked, &mut |_| {}).unwrap();
        s.observer().unwrap().take_captured()
    };
    let (pre, post) = (q_of(true), q_of(false));
    let modality = prompt.token_modalities();
    let last_text = (0..l).rev().take_while(|&t| modality[t] == Modality::Text).count();
    assert!(last_text >= 4, "the prompt ends with text");
    let mut max_err = 0f64;
    for il in 0..n_layer {
        let rows = |c: &[csp_llava::llama::observer::Captured]| -> Vec<f32> { c.iter().filter(|c| c.name == format!("Qcur-{il}")).flat_map(|c| c.data.iter().copied()).collect() };
        let (a, b) = (rows(&pre), rows(&post));
        assert_eq!((a.len(), b.len()), (l * n_head * d, l * n_head * d));
        for k in 0..last_text {
            let (t, p) = (l - 1 - k, n_pos - 1 - k);
            let rot = rope.mean_rotation(p, 1);
            for h in 0..n_head {
                let mut x: Vec<f64> = a[(t * n_head + h) * d..][..d].iter().map(|&v| f64::from(v)).collect();
                rope.rotate(&rot, &mut x);
                for (i, &want) in b[(t * n_head + h) * d..][..d].iter().enumerate() {
                    let err = (x[i] - f64::from(want)).abs() / f64::from(want).abs().max(1e-2);
                    max_err = max_err.max(err);
                    assert!(err < 1e-3, "layer {il} token {t} (position {p}) head {h} dim {i}: {} vs {want}", x[i]);
                }
            }
        }
    }
    eprintln!("qwen2.5-vl: NEOX rotation of text queries vs llama.cpp's M-RoPE: max rel. error {max_err:.2e}");
}
