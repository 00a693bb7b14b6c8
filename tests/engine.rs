//! End-to-end tests of the engine on the tiny model.

mod support;

use csp_llava::config::{ContextConfig, FlashAttn, Request, SamplingConfig};
use csp_llava::engine::PrefillMode;
use csp_llava::span::Modality;
use csp_llava::{Engine, PolicyConfig};

use support::engine;

fn three_images(prompt: &str) -> Request {
    Request {
        images: (0..3).map(support::image).collect(),
        prompt: prompt.into(),
        ..Default::default()
    }
}

fn greedy(n: i32) -> SamplingConfig {
    SamplingConfig { n_predict: n, temp: 0.0, ignore_eos: true, seed: Some(0), ..Default::default() }
}

#[test]
fn chunked_prefill_matches_eval_chunks() {
    let engine = engine();
    let req = three_images("Compare the three images.");
    let prompt = engine.prepare(&req).unwrap();
    assert_eq!(prompt.image_tokens, vec![64, 64, 64]);
    for fa in [FlashAttn::Off, FlashAttn::Auto] {
        let ctx = ContextConfig { n_ctx: 1024, flash_attn: fa, ..Default::default() };

        let mut reference = engine.session(&prompt, &ctx, Vec::new()).unwrap();
        reference.prefill(&prompt, PrefillMode::EvalChunks, &mut |_| {}).unwrap();
        let ref_logits = reference.last_logits().expect("logits").to_vec();

        let mut ours = engine.session(&prompt, &ctx, Vec::new()).unwrap();
        let stats = ours.prefill(&prompt, PrefillMode::Chunked, &mut |_| {}).unwrap();
        let our_logits = ours.last_logits().expect("logits").to_vec();

        assert_eq!(reference.n_past(), ours.n_past());
        assert_eq!(ours.n_past() as usize, prompt.n_tokens());
        assert!(stats.encode_ms > 0.0, "image encoding is timed");
        assert_eq!(ref_logits.len(), our_logits.len());
        let max_diff = ref_logits.iter().zip(&our_logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max_diff <= 1e-4, "fa {fa:?}: max |Δlogit| = {max_diff}");
        // The logits are not trivially equal: they vary across the vocabulary.
        let spread = our_logits.iter().copied().fold(f32::MIN, f32::max) - our_logits.iter().copied().fold(f32::MAX, f32::min);
        assert!(spread > 0.1, "logit spread {spread}");

        let a = reference.generate(&greedy(24), &mut |_| {}).unwrap();
        let b = ours.generate(&greedy(24), &mut |_| {}).unwrap();
        assert_eq!(a.tokens.len(), 24);
        assert_eq!(a.tokens, b.tokens, "greedy tokens after both prefills");
    }
}

#[test]
fn same_seed_same_output_and_another_seed_differs() {
    let engine = engine();
    let req = three_images("Describe the images.");
    let ctx = ContextConfig { n_ctx: 1024, ..Default::default() };
    let sampling = SamplingConfig { n_predict: 32, temp: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, seed: Some(42), ignore_eos: true, ..Default::default() };
    let a = engine.run(&req, &ctx, &sampling, &PolicyConfig::default(), &mut |_| {}).unwrap();
    let b = engine.run(&req, &ctx, &sampling, &PolicyConfig::default(), &mut |_| {}).unwrap();
    assert_eq!(a.text, b.text);
    assert_eq!(a.n_generated, 32);
    let mut others = Vec::new();
    for seed in 43..47 {
        let c = engine.run(&req, &ctx, &SamplingConfig { seed: Some(seed), ..sampling.clone() }, &PolicyConfig::default(), &mut |_| {}).unwrap();
        others.push(c.text);
    }
    assert!(others.iter().any(|t| *t != a.text), "sampling depends on the seed");
}

#[test]
fn spans_markers_and_report() {
    let engine = engine();
    // markers place images; spans keep one media index per image
    let req = Request {
        images: vec![support::image(0), support::image(1)],
        prompt: "First <image> then <__media__> — which is red?".into(),
        ..Default::default()
    };
    let prompt = engine.prepare(&req).unwrap();
    let media: Vec<_> = prompt.spans.iter().filter(|s| s.modality == Modality::Image).map(|s| s.media).collect();
    assert_eq!(media, vec![Some(0), Some(1)]);
    let mut t = 0;
    for s in &prompt.spans {
        assert_eq!(s.tokens.start, t);
        t = s.tokens.end;
    }
    assert_eq!(t, prompt.n_tokens());

    // text-only prompts work too
    let text_only = Request { prompt: "Hello there".into(), ..Default::default() };
    let r = engine.run(&text_only, &ContextConfig { n_ctx: 256, ..Default::default() }, &greedy(4), &PolicyConfig::default(), &mut |_| {}).unwrap();
    assert_eq!(r.n_images, 0);
    assert!(r.image_tokens.is_empty());
    assert_eq!(r.kv_cells as usize, r.n_prompt_tokens);

    // KV figures come from llama.cpp: f16 K+V, 2 layers × 2 KV heads × 16 dims = 256 B/cell
    let r = engine.run(&three_images("Compare."), &ContextConfig { n_ctx: 512, ..Default::default() }, &greedy(3), &PolicyConfig::default(), &mut |_| {}).unwrap();
    assert_eq!(r.kv_cells_allocated, 512);
    assert_eq!(r.kv_bytes_allocated, 512 * 2 * 2 * 2 * 16 * 2);
    assert_eq!(r.kv_bytes, u64::from(r.kv_cells) * 256);
    assert_eq!(r.kv_cells as usize, r.n_prompt_tokens);
    assert_eq!(r.n_prompt_tokens, 192 + prompt_text_tokens(&engine, "Compare."));
}

fn prompt_text_tokens(engine: &Engine, p: &str) -> usize {
    let pr = engine.prepare(&three_images(p)).unwrap();
    pr.spans.iter().filter(|s| s.modality == Modality::Text).map(|s| s.n_tokens()).sum()
}
