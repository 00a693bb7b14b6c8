//! Every policy on hand-built attention statistics with known answers, and budget invariants
//! as property tests over random prompts, statistics and settings.

use super::*;
use crate::stats::{keydiff_cosines, AttentionStats, Bucket, KvRequest, KvStats};
use crate::rng::Rng;
use crate::span::Modality::{Image as I, Text as T};

/// 10 tokens: text 0–1, image 2–5, text 6–9; budget 6 cells → recent 3, R 3, k 3.
const MODALITY: [Modality; 10] = [T, T, I, I, I, I, T, T, T, T];

fn split6() -> Split {
    Split::new(Budget::Cells(6), 10, 1.0).unwrap()
}

/// One layer, one KV head, given column sums from text and from image queries.
fn stats(from_text: [f32; 10], from_media: [f32; 10]) -> AttentionStats {
    let mut s = AttentionStats::new(1, 1, 10);
    s.column_mut(Bucket::Text, 0, 0).copy_from_slice(&from_text);
    s.column_mut(Bucket::Media, 0, 0).copy_from_slice(&from_media);
    s
}

fn kept(r: &Retention) -> Vec<usize> {
    (0..r.keep.len()).filter(|&t| r.keep[t]).collect()
}

fn run(p: &dyn Policy, s: Option<&AttentionStats>, modality: &[Modality], split: Split) -> Retention {
    retain(p, &Input { modality, split, stats: s, protect: Default::default(), kv: None }, None).unwrap()
}

#[test]
fn csp_picks_self_and_cross_separately() {
    let split = split6();
    assert_eq!((split.b, split.r, split.k), (6, 3, 3));
    //                 t0   t1   i2   i3   i4   i5    t6   t7 t8 t9
    let from_text = [0.1, 0.2, 0.9, 0.1, 0.3, 0.05, 0.4, 0., 0., 0.];
    let from_media = [0.5, 0.0, 0.2, 0.8, 0.1, 0.0, 0.1, 0., 0., 0.];
    let s = stats(from_text, from_media);
    // self  = text keys ← text queries, image keys ← image queries: best is i3 (0.8)
    // cross = text keys ← image queries, image keys ← text queries: best is i2 (0.9)
    let csp = Csp { cross_ratio: 0.5, n: 1.0 }; // k_self = k_cross = 1
    let choices = csp.choose(&Input { modality: &MODALITY, split, stats: Some(&s), protect: Default::default(), kv: None }).unwrap();
    assert_eq!(choices.len(), 1);
    assert_eq!(choices[0].keep, vec![3, 2, 7, 8, 9]);
    // the vote fills the sixth cell with the best remaining self+cross score: t0 (0.6)
    assert_eq!(kept(&run(&csp, Some(&s), &MODALITY, split)), vec![0, 2, 3, 7, 8, 9]);

    // cross_ratio 0: only self attention ranks (k_self = k = 3): i3, t6, t1/i2 tie → position
    let only_self = Csp { cross_ratio: 0.0, n: 1.0 };
    assert_eq!(only_self.split_k(3), (3, 0));
    let c = only_self.choose(&Input { modality: &MODALITY, split, stats: Some(&s), protect: Default::default(), kv: None }).unwrap();
    assert_eq!(c[0].keep, vec![3, 6, 1, 7, 8, 9]);
    // cross_ratio 1: only cross: i2 (0.9), t0 (0.5), i4 (0.3)
    let only_cross = Csp { cross_ratio: 1.0, n: 1.0 };
    let c = only_cross.choose(&Input { modality: &MODALITY, split, stats: Some(&s), protect: Default::default(), kv: None }).unwrap();
    assert_eq!(c[0].keep, vec![2, 0, 4, 7, 8, 9]);
}

#[test]
fn csp_deduplicates_tokens_chosen_by_both() {
    let split = split6();
    // i2 is the best for self and for cross
    let s = stats([0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.1, 0., 0., 0.], [0.0, 0.2, 0.9, 0.0, 0.0, 0.0, 0.0, 0., 0., 0.]);
    let csp = Csp::default();
    let c = csp.choose(&Input { modality: &MODALITY, split, stats: Some(&s), protect: Default::default(), kv: None }).unwrap();
    assert_eq!(c[0].keep, vec![2, 7, 8, 9], "i2 once, not twice");
    // the vote fills B = 6 with the best remaining summed scores: t1 (0.2), t6 (0.1)
    assert_eq!(kept(&run(&csp, Some(&s), &MODALITY, split)), vec![1, 2, 6, 7, 8, 9]);
}

#[test]
fn protected_sinks_take_their_cells_out_of_the_budget() {
    let split = split6(); // B 6, R 3, k 3
    let from_text = [0.1, 0.2, 0.9, 0.1, 0.3, 0.05, 0.4, 0., 0., 0.];
    let from_media = [0.5, 0.0, 0.2, 0.8, 0.1, 0.0, 0.1, 0., 0., 0.];
    let s = stats(from_text, from_media);
    let csp = Csp { cross_ratio: 0.0, n: 1.0 };
    let input = |protect| Input { modality: &MODALITY, split, stats: Some(&s), protect, kv: None };
    // t0 and the image's first token i2 protected: k = 1 left for the scores (self: i3)
    let p = Protect { first: 1, per_image: 1 };
    let c = csp.choose(&input(p)).unwrap();
    assert_eq!(c[0].keep, vec![3, 0, 2, 7, 8, 9]);
    assert_eq!(kept(&retain(&csp, &input(p), None).unwrap()), vec![0, 2, 3, 7, 8, 9]);
    // a protected token the scores also chose is not counted twice: the scores get the next one
    let p = Protect { first: 0, per_image: 2 }; // i2, i3
    let c = csp.choose(&input(p)).unwrap();
    assert_eq!(c[0].keep.len(), 6, "{:?}", c[0].keep);
    assert!(c[0].keep.contains(&2) && c[0].keep.contains(&3));
    // policies that keep tokens of their own ignore the setting
    let h2o = H2o;
    assert_eq!(h2o.choose(&input(p)).unwrap(), h2o.choose(&input(Protect::default())).unwrap());
    // the zero-score sinks still win their place in the global vote
    let zero = stats([0.0; 10], [0.0, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0., 0., 0.]);
    let r = retain(&csp, &Input { modality: &MODALITY, split, stats: Some(&zero), protect: Protect { first: 2, per_image: 0 }, kv: None }, None).unwrap();
    assert!(r.keep[0] && r.keep[1], "{:?}", kept(&r));
}

#[test]
fn csp_leaves_text_only_prompts_alone() {
    assert!(!Csp::default().applies(&[T; 10]));
    assert!(Csp::default().applies(&MODALITY));
}

#[test]
fn h2o_sums_all_queries() {
    let split = split6();
    let s = stats([0.1, 0.2, 0.0, 0.6, 0.0, 0.3, 0.0, 0., 0., 0.], [0.5, 0.0, 0.1, 0.0, 0.0, 0.2, 0.1, 0., 0., 0.]);
    // totals: t0 .6, t1 .2, i2 .1, i3 .6, i4 0, i5 .5, t6 .1 → top 3: t0, i3 (tie → position), i5
    assert_eq!(kept(&run(&H2o, Some(&s), &MODALITY, split)), vec![0, 3, 5, 7, 8, 9]);
    assert_eq!(H2o.request(&split, None).unwrap().rows, crate::stats::Rows::All);
}

#[test]
fn snapkv_pools_before_ranking() {
    let split = Split::new(Budget::Cells(4), 10, 1.0).unwrap(); // r = 2, k = 2, candidates 0..8
    assert_eq!((split.r, split.k), (2, 2));
    let s = stats([0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 3.0, 9., 9.], [0.0; 10]);
    // raw top-2 would be t7, then i2; pooled (kernel 5, zero pad) over 0..8:
    // [.2, .2, .4, .4, .4, .8, .8, .6] → i5, t6
    let kept_tokens = kept(&run(&SnapKv::default(), Some(&s), &MODALITY, split));
    assert_eq!(kept_tokens, vec![5, 6, 8, 9]);
    // window 32 capped by the budget
    let req = SnapKv::default().request(&split, None).unwrap();
    assert_eq!(req.rows, crate::stats::Rows::Last(4));
}

#[test]
fn streaming_keeps_sinks_and_recent() {
    // B = 9: four sinks + the last five
    let r = run(&Streaming::default(), None, &MODALITY, Split::new(Budget::Cells(9), 10, 1.0).unwrap());
    assert_eq!(kept(&r), vec![0, 1, 2, 3, 5, 6, 7, 8, 9]);
    // B = 6: the recent window (R = 3) is never displaced, so only three sinks fit
    let r = run(&Streaming::default(), None, &MODALITY, split6());
    assert_eq!(kept(&r), vec![0, 1, 2, 7, 8, 9]);
    // a budget below the sinks still keeps the last token
    let r = run(&Streaming::default(), None, &MODALITY, Split::new(Budget::Cells(3), 10, 1.0).unwrap());
    assert_eq!(kept(&r), vec![0, 1, 9]);
}

#[test]
fn random_is_seeded() {
    let a = run(&Random { seed: 1 }, None, &MODALITY, split6());
    let b = run(&Random { seed: 1 }, None, &MODALITY, split6());
    assert_eq!(a, b);
    assert!([7, 8, 9].iter().all(|&t| a.keep[t]));
    let differs = (2..40).any(|seed| run(&Random { seed }, None, &MODALITY, split6()).keep != a.keep);
    assert!(differs);
}

#[test]
fn full_never_applies() {
    assert!(!Full.applies(&MODALITY));
    assert_eq!(run(&Full, None, &MODALITY, Split::new(Budget::Cells(10), 10, 1.0).unwrap()).kept(), 10);
}

#[test]
fn policies_needing_statistics_say_so() {
    for p in [PolicyKind::Csp, PolicyKind::H2o, PolicyKind::SnapKv] {
        let pol = p.build(&PolicyConfig::default()).unwrap();
        assert!(pol.request(&split6(), None).is_some());
        assert!(retain(pol.as_ref(), &Input { modality: &MODALITY, split: split6(), stats: None, protect: Default::default(), kv: None }, None).is_err());
    }
}

/// Random prompts, statistics, budgets and settings: every policy keeps exactly min(B, L)
/// cells, always the recent window, and the same cells when run again.
#[test]
fn budget_invariants_hold_for_random_cases() {
    let mut rng = Rng::new(7, "property");
    for case in 0..300 {
        let l = 1 + rng.below(300) as usize;
        let n_layer = 1 + rng.below(3) as usize;
        let n_head = 1 + rng.below(4) as usize;
        let modality: Vec<Modality> = (0..l).map(|_| if rng.below(3) == 0 { T } else { I }).collect();
        let budget = if rng.below(2) == 0 {
            Budget::Fraction(0.01 + 0.99 * f64::from(rng.uniform()))
        } else {
            Budget::Cells(1 + rng.below(2 * l as u64) as usize)
        };
        let bias = 0.1 + 2.0 * f64::from(rng.uniform());
        let Ok(_) = Split::new(budget, l, bias) else {
            assert!(matches!(budget, Budget::Fraction(f) if (f * l as f64) < 1.0), "case {case}");
            continue;
        };
        let mut s = AttentionStats::new(n_layer, n_head, l);
        for layer in 0..n_layer {
            for h in 0..n_head {
                for b in [Bucket::Text, Bucket::Media] {
                    // coarse values so that ties happen
                    s.column_mut(b, layer, h).iter_mut().for_each(|v| *v = rng.below(5) as f32 / 4.0);
                }
            }
        }
        let cfg = PolicyConfig {
            params: Params { csp: Csp { cross_ratio: f64::from(rng.uniform()), ..Default::default() }, random: Random { seed: rng.next_u64() }, ..Default::default() },
            recent_bias: bias,
            ..Default::default()
        };
        let expected = Some(crate::stats::ExpectedRequest { n_future: 8, cov: true });
        let mut kv = KvStats::new(n_layer, n_head, l, KvRequest { knorm: true, vnorm: true, keydiff: true, expected });
        for layer in 0..n_layer {
            for h in 0..n_head {
                kv.z_mut(layer, h).unwrap().iter_mut().for_each(|v| *v = rng.below(5) as f32 - 2.0);
                kv.knorm_mut(layer, h).unwrap().iter_mut().for_each(|v| *v = rng.below(5) as f32);
                kv.vnorm_mut(layer, h).unwrap().iter_mut().for_each(|v| *v = rng.below(5) as f32);
                kv.keydiff_mut(layer, h).unwrap().iter_mut().for_each(|v| *v = rng.below(5) as f32 / 2.0 - 1.0);
            }
        }
        let protect = if case % 2 == 0 { Protect::default() } else { Protect { first: rng.below(4) as usize, per_image: rng.below(3) as usize } };
        let kinds = [PolicyKind::Csp, PolicyKind::H2o, PolicyKind::SnapKv, PolicyKind::Streaming, PolicyKind::Random, PolicyKind::KNorm, PolicyKind::VNorm, PolicyKind::KeyDiff, PolicyKind::LookM, PolicyKind::Expected];
        for kind in kinds {
            let p = kind.build(&cfg).unwrap();
            // the cache scorers resolve their own split (the last token as recent window)
            let split = p.split(Target::Budget(budget), &modality, bias).unwrap();
            let input = Input { modality: &modality, split, stats: Some(&s), protect, kv: Some(&kv) };
            let r = retain(p.as_ref(), &input, None).unwrap();
            assert_eq!(r.kept(), split.b.min(l), "case {case} {kind}: kept");
            if p.protects_sinks() {
                let sinks = protect.tokens(&modality, l - split.r);
                for &t in sinks.iter().take(split.k) {
                    assert!(r.keep[t], "case {case} {kind}: protected token {t} evicted ({protect:?})");
                }
                // per head: never more than the budget
                let heads = retain(p.as_ref(), &input, Some(Granularity::Head)).unwrap();
                if let Some(h) = &heads.per_head {
                    for layer in 0..h.n_layer {
                        for head in 0..h.n_head_kv {
                            let n = h.get(layer, head).iter().filter(|&&k| k).count();
                            assert!(n <= split.b, "case {case} {kind}: head keeps {n} > B {}", split.b);
                        }
                    }
                }
            }
            assert_eq!(split.b, budget_cells(budget, l), "case {case}");
            for t in split.recent_window() {
                assert!(r.keep[t], "case {case} {kind}: recent token {t} of {l} evicted (r = {})", split.r);
            }
            assert!(r.keep[l - 1], "case {case} {kind}: last token");
            assert_eq!(retain(p.as_ref(), &input, None).unwrap(), r, "case {case} {kind}: deterministic");
        }
    }
}

/// AirCache and PrefixKV with protected sinks, each with its own split: every layer keeps the
/// protected tokens and at most the budget; the global vote keeps exactly the budget.
#[test]
fn layer_policies_keep_protected_sinks_within_the_budget() {
    let mut rng = Rng::new(11, "sinks");
    for case in 0..200 {
        let l = 8 + rng.below(200) as usize;
        let n_layer = 1 + rng.below(3) as usize;
        let n_head = 1 + rng.below(3) as usize;
        let modality: Vec<Modality> = (0..l).map(|t| if t < 3 || rng.below(4) == 0 { T } else { I }).collect();
        let mut s = AttentionStats::new(n_layer, n_head, l);
        for layer in 0..n_layer {
            for h in 0..n_head {
                for b in [Bucket::Text, Bucket::Media] {
                    s.column_mut(b, layer, h).iter_mut().for_each(|v| *v = rng.below(5) as f32 / 4.0);
                }
            }
        }
        let protect = Protect { first: rng.below(4) as usize, per_image: 1 + rng.below(2) as usize };
        let budget = Budget::Fraction(0.2 + 0.6 * f64::from(rng.uniform()));
        for kind in [PolicyKind::AirCache, PolicyKind::PrefixKv] {
            let p = kind.build(&PolicyConfig::default()).unwrap();
            let Ok(split) = p.split(Target::Budget(budget), &modality, 1.0) else { continue };
            let sinks = protect.tokens(&modality, l - split.r);
            // (AirCache keeps every text token: its sinks are paid from the visual share, so
            // they must fit there)
            let n_text = modality.iter().filter(|m| **m == T).count();
            if sinks.len() * 2 > split.k || (kind == PolicyKind::AirCache && n_text + sinks.len() > split.b) {
                continue;
            }
            let input = Input { modality: &modality, split, stats: Some(&s), protect, kv: None };
            let layers = retain(p.as_ref(), &input, Some(Granularity::Layer)).unwrap();
            let h = layers.per_head.as_ref().expect("per layer");
            let mut total = 0;
            for layer in 0..h.n_layer {
                let keep = h.get(layer, 0);
                total += keep.iter().filter(|&&k| k).count();
                for &t in &sinks {
                    assert!(keep[t], "case {case} {kind}: layer {layer} evicted protected token {t} ({protect:?})");
                }
            }
            // AirCache's layers differ by design (mean r, each rounded up); PrefixKV's are equal
            let mean = total as f64 / h.n_layer as f64;
            assert!(mean <= split.b as f64 + 1.0, "case {case} {kind}: layers keep {mean} on average > B {}", split.b);
            let global = retain(p.as_ref(), &input, Some(Granularity::Global)).unwrap();
            assert_eq!(global.kept(), split.b, "case {case} {kind}: global kept");
            for &t in &sinks {
                assert!(global.keep[t], "case {case} {kind}: global evicted protected token {t}");
            }
        }
    }
}

/// AirCache keeps every text token at global granularity too, as under a cap: its statistics
/// are media columns only (text keys score 0 and cast no vote), so the vote must rank text by
/// rule, not by score — it used to keep scored image tokens in their place (the capped runs of
/// the policy table: the prompt's first tokens evicted, accuracy 0).
#[test]
fn aircache_keeps_all_text_at_global_granularity() {
    let mut rng = Rng::new(5, "aircache-text");
    for case in 0..100 {
        let l = 12 + rng.below(150) as usize;
        let n_layer = 1 + rng.below(4) as usize;
        let modality: Vec<Modality> = (0..l).map(|t| if t < 2 || t + 3 >= l || rng.below(5) == 0 { T } else { I }).collect();
        let mut s = AttentionStats::new(n_layer, 1, l);
        for layer in 0..n_layer {
            // as the elite reduction writes them: importance at media keys only
            let col = s.column_mut(Bucket::Text, layer, 0);
            (0..l).filter(|&t| modality[t] != T).for_each(|t| col[t] = 0.01 + rng.uniform());
        }
        let p = PolicyKind::AirCache.build(&PolicyConfig::default()).unwrap();
        let n_text = modality.iter().filter(|m| **m == T).count();
        for target in [Target::Budget(Budget::Fraction(0.1 + 0.5 * f64::from(rng.uniform()))), Target::Cells(n_text + 1 + rng.below((l - n_text) as u64) as usize)] {
            let Ok(split) = p.split(target, &modality, 1.0) else { continue };
            let input = Input { modality: &modality, split, stats: Some(&s), protect: Default::default(), kv: None };
            let global = retain(p.as_ref(), &input, Some(Granularity::Global)).unwrap();
            assert_eq!(global.kept(), split.b, "case {case}");
            for t in (0..l).filter(|&t| modality[t] == T) {
                assert!(global.keep[t], "case {case} {target:?}: text token {t} evicted");
            }
        }
    }
}

fn budget_cells(b: Budget, l: usize) -> usize {
    match b {
        Budget::Fraction(f) => ((f * l as f64).floor() as usize).min(l),
        Budget::Cells(n) => n.min(l),
    }
}

/// One layer, one KV head of cache statistics over [`MODALITY`]'s 10 tokens.
fn kv_stats(knorm: [f32; 10], vnorm: [f32; 10], cos: [f32; 10]) -> KvStats {
    let mut kv = KvStats::new(1, 1, 10, KvRequest { knorm: true, vnorm: true, keydiff: true, expected: None });
    kv.knorm_mut(0, 0).unwrap().copy_from_slice(&knorm);
    kv.vnorm_mut(0, 0).unwrap().copy_from_slice(&vnorm);
    kv.keydiff_mut(0, 0).unwrap().copy_from_slice(&cos);
    kv
}

fn run_kv(kind: PolicyKind, params: Params, kv: &KvStats, b: usize) -> Vec<usize> {
    let p = kind.build(&PolicyConfig { kind, params, ..Default::default() }).unwrap();
    let split = p.split(Target::Budget(Budget::Cells(b)), &MODALITY, 1.0).unwrap();
    kept(&retain(p.as_ref(), &Input { modality: &MODALITY, split, stats: None, protect: Default::default(), kv: Some(kv) }, None).unwrap())
}

#[test]
fn knorm_and_vnorm_keep_known_tokens() {
    let norms = [3.0, 1.0, 2.0, 5.0, 4.0, 0.5, 6.0, 2.5, 7.0, 9.0];
    let kv = kv_stats(norms, norms, [0.0; 10]);
    // B = 6, r = 1 (t9): the 5 smallest key norms of t0..t8 are t5 .5, t1 1, t2 2, t7 2.5, t0 3
    assert_eq!(run_kv(PolicyKind::KNorm, Params::default(), &kv, 6), vec![0, 1, 2, 5, 7, 9]);
    // with the recent window (r = 3: t7..t9), k = 3 over t0..t6: t5, t1, t2
    let recent = Params { knorm: KNorm { recent: true }, ..Default::default() };
    assert_eq!(run_kv(PolicyKind::KNorm, recent, &kv, 6), vec![1, 2, 5, 7, 8, 9]);
    // value norms: text t0, t1, t6, t7, t8 first (5 = k), then images
    assert_eq!(run_kv(PolicyKind::VNorm, Params::default(), &kv, 6), vec![0, 1, 6, 7, 8, 9]);
    // B = 8 (k 7): the text, then the largest image value norms i3 5, i4 4
    assert_eq!(run_kv(PolicyKind::VNorm, Params::default(), &kv, 8), vec![0, 1, 3, 4, 6, 7, 8, 9]);
    // every token by value norm: t8 7, t6 6, t3 5, t4 4, t0 3
    let all = Params { vnorm: VNorm { media_only: false, ..Default::default() }, ..Default::default() };
    assert_eq!(run_kv(PolicyKind::VNorm, all, &kv, 6), vec![0, 3, 4, 6, 8, 9]);
}

#[test]
fn keydiff_keeps_the_keys_least_like_the_mean_key() {
    // keys t0 = (0, 1), t1..t9 = multiples of (1, 0), t3 pointing the other way
    let keys: Vec<Vec<f64>> = (0..10).map(|t| match t {
        0 => vec![0.0, 1.0],
        3 => vec![-1.0, 0.2],
        t => vec![t as f64, 0.0],
    }).collect();
    let cos = keydiff_cosines(&keys);
    let mut c = [0f32; 10];
    c.iter_mut().zip(&cos).for_each(|(c, x)| *c = *x as f32);
    assert!(cos[3] < cos[0] && cos[0] < cos[1], "{cos:?}");
    // B = 3: the last token, then t3 and t0 (the least similar)
    assert_eq!(run_kv(PolicyKind::KeyDiff, Params::default(), &kv_stats([1.0; 10], [1.0; 10], c), 3), vec![0, 3, 9]);
    // without cache statistics: a clear error, not a panic
    let p = PolicyKind::KeyDiff.build(&PolicyConfig::default()).unwrap();
    let split = p.split(Target::Budget(Budget::Cells(3)), &MODALITY, 1.0).unwrap();
    assert!(retain(p.as_ref(), &Input { modality: &MODALITY, split, stats: None, protect: Default::default(), kv: None }, None).is_err());
}
