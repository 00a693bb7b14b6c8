//! LOOK-M's merge on the device (patch 0010, `Session::merge`) against a direct f64
//! computation from the cache's rows before the merge (read from llama.cpp's sequence state):
//! each evicted entry goes to the kept key of its (layer, KV head) with the largest cosine, and
//! each kept row becomes the pivotal or average merge of itself and its sources, K and V alike;
//! every other row stays bit-identical. Also: nothing to merge at budget 1.0, a refusal without
//! flash attention, and the `lookm` policy end to end (evict after merge, decode).

mod support;

use csp_llava::config::{CacheType, ContextConfig, FlashAttn, Request};
use csp_llava::engine::PrefillMode;
use csp_llava::gguf::tiny;
use csp_llava::policy::lookm::Merge;
use csp_llava::policy::{Granularity, HeadKeep, Retention};

const N_LAYER: usize = tiny::text::N_LAYER as usize;
const HK: usize = tiny::text::N_HEAD_KV as usize;
const D: usize = (tiny::text::N_EMBD / tiny::text::N_HEAD) as usize;

/// K and V rows of an F32 cache from llama.cpp's sequence state: positions, then per layer
/// `[cell][HK·D]` for K and V (V not transposed).
struct Rows {
    pos: Vec<i32>,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

fn parse(b: &[u8]) -> Rows {
    let mut o = 0usize;
    let u32_ = |o: &mut usize| {
        let x = u32::from_le_bytes(b[*o..*o + 4].try_into().unwrap());
        *o += 4;
        x
    };
    assert_eq!(u32_(&mut o), 0xaf14_3cd8, "state magic");
    let _seq = u32_(&mut o);
    assert_eq!(u32_(&mut o), 1, "one stream");
    let n = u32_(&mut o) as usize;
    let mut pos = Vec::with_capacity(n);
    for _ in 0..n {
        pos.push(u32_(&mut o) as i32);
        let ns = u32_(&mut o);
        o += 4 * ns as usize;
    }
    assert_eq!(u32_(&mut o), 0, "V not transposed (flash attention on)");
    assert_eq!(u32_(&mut o) as usize, N_LAYER);
    o += 8; // n_rot_k, n_rot_v
    let read_rows = |o: &mut usize| -> Vec<f32> {
        assert_eq!(u32_(o), 0, "F32 cache");
        let row = u64::from_le_bytes(b[*o..*o + 8].try_into().unwrap()) as usize;
        *o += 8;
        assert_eq!(row, HK * D * 4);
        let v: Vec<f32> = b[*o..*o + n * row].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        *o += n * row;
        v
    };
    let k: Vec<Vec<f32>> = (0..N_LAYER).map(|_| read_rows(&mut o)).collect();
    let v: Vec<Vec<f32>> = (0..N_LAYER).map(|_| read_rows(&mut o)).collect();
    Rows { pos, k, v }
}

fn row(x: &[f32], cell: usize, h: usize) -> &[f32] {
    &x[(cell * HK + h) * D..][..D]
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let n = |x: &[f32]| x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b)).max(1e-30)
}

fn ctx(fa: FlashAttn) -> ContextConfig {
    ContextConfig { n_ctx: 1024, n_ubatch: 64, flash_attn: fa, type_k: CacheType::F32, type_v: CacheType::F32, ..Default::default() }
}

/// Prefills the tiny model on three images, merges with `keeps(layer, head, token)`, and checks
/// every row of the cache against the f64 reference.
fn check(mode: Merge, per_head: bool) {
    let engine = support::engine();
    let req = Request { images: (0..3).map(support::image).collect(), prompt: "Which image is red?".into(), ..Default::default() };
    let prompt = engine.prepare(&req).unwrap();
    let l = prompt.n_tokens();
    let mut session = engine.session(&prompt, &ctx(FlashAttn::On), Vec::new()).unwrap();
    session.prefill(&prompt, PrefillMode::Chunked, &mut |_| {}).unwrap();
    let before = parse(&session.state_bytes().unwrap());
    assert_eq!(before.pos.len(), l);

    // kept: every third token and the last 4 (global), or a pattern shifted per (layer, head)
    let keeps = |layer: usize, head: usize, t: usize| -> bool {
        let shift = if per_head { layer * HK + head } else { 0 };
        (t + shift) % 3 == 0 || t + 4 >= l
    };
    let mut keep = vec![false; l];
    let mut hk = HeadKeep::new(N_LAYER, HK, l);
    for layer in 0..N_LAYER {
        for head in 0..HK {
            for (t, k) in keep.iter_mut().enumerate() {
                let kept = keeps(layer, head, t);
                hk.set(layer, head, t, kept);
                *k |= kept;
            }
        }
    }
    let retention = Retention { keep, votes: vec![0; l], score: vec![0.0; l], granularity: if per_head { Granularity::Head } else { Granularity::Global }, per_head: per_head.then_some(hk) };
    let pairs = session.merge(&retention, mode).unwrap();
    let after = parse(&session.state_bytes().unwrap());
    assert_eq!(after.pos, before.pos);

    let a_of = |m: f64| match mode {
        Merge::Pivot => ((1.0 + m / 2.0) / (1.0 + m), 0.5 / (1.0 + m)),
        _ => (1.0 / (1.0 + m), 1.0 / (1.0 + m)),
    };
    let mut want_pairs = 0;
    let (mut max_err, mut checked, mut changed) = (0f64, 0usize, 0usize);
    for layer in 0..N_LAYER {
        for head in 0..HK {
            // the cell of each token: positions are token indices here (text + images, 1-D)
            let cell = |t: usize| before.pos.iter().position(|&p| p as usize == t).unwrap();
            let kept: Vec<usize> = (0..l).filter(|&t| keeps(layer, head, t)).collect();
            let mut sources: Vec<Vec<usize>> = vec![Vec::new(); kept.len()];
            let mut ambiguous = vec![false; kept.len()];
            for t in (0..l).filter(|&t| !keeps(layer, head, t)) {
                let ks = row(&before.k[layer], cell(t), head);
                let mut sims: Vec<(f64, usize)> = kept.iter().enumerate().map(|(i, &j)| (cosine(ks, row(&before.k[layer], cell(j), head)), i)).collect();
                sims.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                sources[sims[0].1].push(t);
                if sims.len() > 1 && sims[0].0 - sims[1].0 < 1e-5 {
                    ambiguous[sims[0].1] = true;
                    ambiguous[sims[1].1] = true;
                }
                want_pairs += 1;
            }
            for (i, &j) in kept.iter().enumerate() {
                let c = cell(j);
                for (x0, x1) in [(&before.k[layer], &after.k[layer]), (&before.v[layer], &after.v[layer])] {
                    let (got, old) = (row(x1, c, head), row(x0, c, head));
                    if sources[i].is_empty() {
                        assert_eq!(got, old, "layer {layer} head {head} token {j}: no source, row unchanged");
                        continue;
                    }
                    if ambiguous[i] {
                        continue;
                    }
                    let m = sources[i].len() as f64;
                    let (a, b) = a_of(m);
                    for e in 0..D {
                        let sum: f64 = sources[i].iter().map(|&s| f64::from(row(x0, cell(s), head)[e])).sum();
                        let want = a * f64::from(old[e]) + b * sum;
                        let err = (f64::from(got[e]) - want).abs() / want.abs().max(1.0);
                        assert!(err <= 1e-3, "layer {layer} head {head} token {j} dim {e}: {} vs {want}", got[e]);
                        max_err = max_err.max(err);
                    }
                    checked += 1;
                    changed += usize::from(got != old);
                }
            }
            // sources and other heads' rows of the same cells: untouched
            for t in (0..l).filter(|&t| !keeps(layer, head, t)) {
                assert_eq!(row(&after.k[layer], cell(t), head), row(&before.k[layer], cell(t), head));
                assert_eq!(row(&after.v[layer], cell(t), head), row(&before.v[layer], cell(t), head));
            }
        }
    }
    assert_eq!(pairs, want_pairs, "every evicted (layer, head, token) merged once");
    assert!(checked > 0 && changed > 0, "some rows merged");
    eprintln!("{mode:?} per_head={per_head}: {pairs} pairs, {checked} merged rows checked, max rel. error {max_err:.2e}");
}

#[test]
fn pivot_merge_matches_reference_global() {
    check(Merge::Pivot, false);
}

#[test]
fn average_merge_matches_reference_per_head() {
    check(Merge::Avg, true);
}

#[test]
fn pivot_merge_matches_reference_per_head() {
    check(Merge::Pivot, true);
}

#[test]
fn nothing_to_merge_when_everything_is_kept() {
    let engine = support::engine();
    let req = Request { images: vec![support::image(0)], prompt: "Colour?".into(), ..Default::default() };
    let prompt = engine.prepare(&req).unwrap();
    let l = prompt.n_tokens();
    let mut session = engine.session(&prompt, &ctx(FlashAttn::On), Vec::new()).unwrap();
    session.prefill(&prompt, PrefillMode::Chunked, &mut |_| {}).unwrap();
    let before = session.state_bytes().unwrap();
    let retention = Retention { keep: vec![true; l], votes: vec![0; l], score: vec![0.0; l], granularity: Granularity::Global, per_head: None };
    assert_eq!(session.merge(&retention, Merge::Pivot).unwrap(), 0);
    assert_eq!(session.state_bytes().unwrap(), before, "cache bit-identical");
}

#[test]
fn transposed_v_is_refused_and_nothing_changes() {
    let engine = support::engine();
    let req = Request { images: vec![support::image(0)], prompt: "Colour?".into(), ..Default::default() };
    let prompt = engine.prepare(&req).unwrap();
    let l = prompt.n_tokens();
    let mut session = engine.session(&prompt, &ctx(FlashAttn::Off), Vec::new()).unwrap();
    session.prefill(&prompt, PrefillMode::Chunked, &mut |_| {}).unwrap();
    let before = session.state_bytes().unwrap();
    let keep: Vec<bool> = (0..l).map(|t| t % 2 == 0).collect();
    let retention = Retention { keep, votes: vec![0; l], score: vec![0.0; l], granularity: Granularity::Global, per_head: None };
    let err = session.merge(&retention, Merge::Pivot).unwrap_err().to_string();
    assert!(err.contains("flash attention"), "{err}");
    assert_eq!(session.state_bytes().unwrap(), before, "cache unchanged");
}
