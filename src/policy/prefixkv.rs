//! `prefixkv`: PrefixKV (Wang et al., arXiv 2412.03409, NeurIPS 2025; code `THU-MIG/PrefixKV`,
//! `prefixkv.py: PrefixKV.__call__`, `obtain_cdf_num`; methods §2).
//!
//! Scores: per layer, the attention each key received summed over **all** prompt queries,
//! averaged over heads (`s_ℓ[j] = Σ_q mean_h A_ℓ,h[q, j]`), so all heads of a layer share one
//! set and each layer keeps a different number of tokens.
//!
//! * **Offline** ([`calibrate_sample`], `csp-llava calibrate`): per sample, each layer's Lorenz
//!   curve `c_ℓ = cumsum(sort_desc(s_ℓ) / Σ s_ℓ)`; a common threshold `p` gives each layer the
//!   shortest prefix reaching `p`, and `p` is chosen so the tokens outside the prefixes add up
//!   to the forget target `(1 − b)·L·N_layers`; then rescaled to hit it exactly. The per-layer
//!   fractions are averaged over samples into a [`Profile`].
//! * **Prefill**: layer ℓ forgets `F_ℓ = round(r_ℓ·L)` of the candidates `[start, L−1)` with the
//!   lowest scores; the first `start = 1` token and the last prompt token are always kept.
//! * **Decode** ([`FixedPoint`], ElasticCache's fixed-point elimination): after each step, a
//!   layer whose cache exceeds `(1 − r_ℓ)` of all tokens so far drops the entry at slot
//!   `(L − F_ℓ) − 25` — a FIFO over the last 25 prompt survivors and then the generated tokens.
//!
//! Naming: the code's `--ratio` and the stored `confs/*.json` are **forget** fractions, while
//! the paper's tables label columns by the **retained** fraction (column "20%" = `ratio 0.8`).
//! csp-llava uses retained fractions everywhere: `--kv-budget 0.2` keeps 20%, and profiles store
//! the retained fraction per layer (`retain`), with the forget fractions alongside.
//!
//! Search: the reference bisects `p` on `[0, 1]` until `|F − target| < 5` (no iteration cap).
//! `F(p)` is a step function that changes only at the curves' values, so we search those
//! breakpoints exactly and take the one closest to the target — the same threshold up to the
//! reference's tolerance, deterministic — then rescale as the reference does.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{need_stats, select, Budget, Granularity, HeadChoice, Input, Policy, Retention, Split};
use crate::error::{Error, Result};
use crate::observe::{AttentionStats, Rows, StatRequest};

/// Always-kept leading tokens (`--start-size 1` of the evaluation scripts).
pub const START_SIZE: usize = 1;
/// Offset of the fixed eviction slot from the end of the compressed prompt.
pub const DISTANCE: isize = -25;

/// PrefixKV with per-layer forget fractions from a calibrated profile (uniform without one).
#[derive(Debug, Clone, Default)]
pub struct PrefixKv {
    /// Forget fraction per layer for the configured budget (`Profile::layers_for`).
    pub forget: Option<Vec<f64>>,
}

/// Head-mean accumulated attention per layer: `[layer][token]`.
#[must_use]
pub fn layer_scores(stats: &AttentionStats) -> Vec<Vec<f32>> {
    (0..stats.n_layer)
        .map(|layer| {
            let mut s = vec![0f32; stats.n_tokens];
            for head in 0..stats.n_head_kv {
                for (a, v) in s.iter_mut().zip(stats.total(layer, head)) {
                    *a += v / stats.n_head_kv as f32;
                }
            }
            s
        })
        .collect()
}

/// Normalised cumulative priority of one layer, `cumsum(sort_desc(s) / Σ s)` (uniform when
/// the scores sum to zero).
#[must_use]
pub fn lorenz(scores: &[f32]) -> Vec<f64> {
    let mut v: Vec<f64> = scores.iter().map(|&x| f64::from(x.max(0.0))).collect();
    v.sort_unstable_by(|a, b| b.total_cmp(a));
    let total: f64 = v.iter().sum();
    let n = v.len() as f64;
    let mut acc = 0.0;
    v.iter()
        .enumerate()
        .map(|(i, x)| {
            if total > 0.0 {
                acc += x / total;
                acc
            } else {
                (i + 1) as f64 / n
            }
        })
        .collect()
}

/// Tokens of each layer outside its prefix for threshold `p` (`searchsorted_left`).
fn forgettable(curves: &[Vec<f64>], p: f64, protect: usize) -> Vec<usize> {
    curves
        .iter()
        .map(|c| {
            let idx = c.partition_point(|&x| x < p).min(c.len().saturating_sub(1));
            c.len().saturating_sub(idx + 1 + protect)
        })
        .collect()
}

/// The per-layer forget counts whose sum is closest to `target` for a common threshold,
/// before rescaling (ties: the larger threshold).
#[must_use]
pub fn search_threshold(curves: &[Vec<f64>], target: f64, protect: usize) -> Vec<usize> {
    let mut cand: Vec<f64> = curves.iter().flatten().copied().collect();
    cand.push(0.0);
    cand.sort_unstable_by(f64::total_cmp);
    cand.dedup();
    let total = |p: f64| forgettable(curves, p, protect).iter().sum::<usize>() as f64;
    // F is non-increasing in p: the first candidate with F ≤ target, and the one before it
    let i = cand.partition_point(|&p| total(p) > target);
    let mut best = cand[i.min(cand.len() - 1)];
    if i > 0 && (i == cand.len() || (total(cand[i - 1]) - target).abs() < (total(best) - target).abs()) {
        best = cand[i - 1];
    }
    forgettable(curves, best, protect)
}

/// One calibration sample: per-layer **forget** fractions `r_ℓ` for a retained budget `b`.
#[must_use]
pub fn calibrate_sample(scores: &[Vec<f32>], retain: f64) -> Vec<f64> {
    let n_layer = scores.len();
    let l = scores.first().map_or(0, Vec::len);
    if l == 0 {
        return vec![0.0; n_layer];
    }
    let curves: Vec<Vec<f64>> = scores.iter().map(|s| lorenz(s)).collect();
    let target = (1.0 - retain) * l as f64 * n_layer as f64;
    let f = search_threshold(&curves, target, START_SIZE + 1);
    let sum: usize = f.iter().sum();
    f.iter()
        .map(|&x| {
            let x = if sum > 0 { (x as f64 * target / sum as f64).floor() } else { 0.0 };
            x / l as f64
        })
        .collect()
}

/// Per-layer retention profiles for one model, one entry per calibrated budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// The model file it was calibrated on (informational).
    pub model: String,
    /// Calibration samples.
    pub samples: usize,
    /// One entry per budget.
    pub budgets: Vec<ProfileEntry>,
}

/// The per-layer fractions for one budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileEntry {
    /// The retained budget (`--kv-budget`).
    pub budget: f64,
    /// Retained fraction per layer (mean ≈ `budget`).
    pub retain: Vec<f64>,
    /// Forget fraction per layer (the reference's `confs/*.json` values): `1 − retain`.
    pub forget: Vec<f64>,
}

impl Profile {
    /// Averages per-sample forget fractions, one list of samples per budget.
    #[must_use]
    pub fn from_samples(model: String, budgets: &[f64], per_budget: &[Vec<Vec<f64>>]) -> Self {
        let samples = per_budget.first().map_or(0, Vec::len);
        let budgets = budgets
            .iter()
            .zip(per_budget)
            .map(|(&budget, rs)| {
                let n_layer = rs.first().map_or(0, Vec::len);
                let forget: Vec<f64> = (0..n_layer).map(|l| rs.iter().map(|r| r[l]).sum::<f64>() / rs.len() as f64).collect();
                ProfileEntry { budget, retain: forget.iter().map(|f| 1.0 - f).collect(), forget }
            })
            .collect();
        Self { model, samples, budgets }
    }

    /// Reads a profile.
    ///
    /// # Errors
    /// Unreadable or malformed files.
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Config { field: "--prefixkv-profile", reason: format!("{}: {reason}", path.display()) };
        let text = crate::input::read_text(path, "PrefixKV profile", crate::input::limits::JSON)?;
        let p: Profile = serde_json::from_str(&text).map_err(|e| bad(format!("not a PrefixKV profile ({e})")))?;
        if p.budgets.is_empty() || p.budgets.iter().any(|b| b.forget.iter().any(|f| !(0.0..=1.0).contains(f))) {
            return Err(bad("no budgets, or forget fractions outside [0, 1]".into()));
        }
        Ok(p)
    }

    /// The forget fractions calibrated for `budget`.
    ///
    /// # Errors
    /// A budget the profile was not calibrated for.
    pub fn layers_for(&self, budget: Budget) -> Result<&[f64]> {
        let have = || self.budgets.iter().map(|b| b.budget.to_string()).collect::<Vec<_>>().join(", ");
        let Budget::Fraction(b) = budget else {
            return Err(Error::Config { field: "--kv-budget", reason: format!("prefixkv profiles are per fraction ({}); a cell count has none", have()) });
        };
        self.budgets.iter().find(|e| (e.budget - b).abs() < 1e-9).map(|e| e.forget.as_slice()).ok_or_else(|| Error::Config {
            field: "--kv-budget",
            reason: format!("the PrefixKV profile has budgets {}, not {b}; run csp-llava calibrate --kv-budget {b}", have()),
        })
    }
}

/// One layer's prefill keep-set: forget the `forget` lowest-scored candidates `[start, L−1)`.
#[must_use]
pub fn keep_layer(scores: &[f32], forget: usize) -> Vec<usize> {
    let l = scores.len();
    if l == 0 {
        return Vec::new();
    }
    let start = START_SIZE.min(l - 1);
    let cand = start..l - 1;
    let keep_n = cand.len().saturating_sub(forget);
    let mut keep: Vec<usize> = (0..start).collect();
    let mut chosen = select::top_k(scores, cand, keep_n);
    chosen.sort_unstable();
    keep.extend(chosen);
    keep.push(l - 1);
    keep
}

impl PrefixKv {
    /// Per-layer forget fractions for this prompt's budget.
    fn forget(&self, split: &Split, n_layer: usize) -> Result<Vec<f64>> {
        match &self.forget {
            None => Ok(vec![1.0 - split.b as f64 / split.l.max(1) as f64; n_layer]),
            Some(f) if f.len() == n_layer => Ok(f.clone()),
            Some(f) => Err(Error::Config {
                field: "--prefixkv-profile",
                reason: format!("the profile has {} layers, the model {n_layer}; calibrate it on this model", f.len()),
            }),
        }
    }
}

impl Policy for PrefixKv {
    fn name(&self) -> &'static str {
        "prefixkv"
    }

    fn request(&self, _: &Split, _: Option<usize>) -> Option<StatRequest> {
        Some(StatRequest { rows: Rows::All, n: 0.0 })
    }

    fn natural_granularity(&self) -> Granularity {
        Granularity::Layer
    }

    fn choose(&self, input: &Input<'_>) -> Result<Vec<HeadChoice>> {
        let stats = need_stats(input, "prefixkv")?;
        let scores = layer_scores(stats);
        let forget = self.forget(&input.split, stats.n_layer)?;
        let l = input.split.l;
        Ok(scores
            .into_iter()
            .zip(forget)
            .enumerate()
            .map(|(layer, (s, r))| {
                let keep = keep_layer(&s, (r * l as f64).round() as usize);
                HeadChoice { layer: Some(layer), head: None, keep, score: s }
            })
            .collect())
    }

    fn decode_eviction(&self, input: &Input<'_>, retention: &Retention) -> Option<FixedPoint> {
        let heads = retention.per_head.as_ref()?;
        let n_layer = heads.n_layer;
        let forget = self.forget(&input.split, n_layer).ok()?;
        let kept: Vec<Vec<usize>> = (0..n_layer).map(|layer| (0..heads.l).filter(|&t| heads.get(layer, 0)[t]).collect()).collect();
        Some(FixedPoint::new(&kept, &forget, heads.l))
    }
}

/// ElasticCache's fixed-point eviction at decode, per layer (methods §2.3): entries stay in
/// position order; once a layer holds more than `(1 − r_ℓ)·T` of the `T` tokens seen, the entry
/// at its fixed slot is dropped (at most one per step).
#[derive(Debug, Clone, PartialEq)]
pub struct FixedPoint {
    layers: Vec<FifoLayer>,
    seen: usize,
}

#[derive(Debug, Clone, PartialEq)]
struct FifoLayer {
    forget: f64,
    slot: usize,
    /// Entries (prompt token indices, then generated tokens as `L + i`), in position order.
    entries: Vec<usize>,
}

impl FixedPoint {
    /// From each layer's kept prompt tokens (ascending) and forget fractions.
    #[must_use]
    pub fn new(kept: &[Vec<usize>], forget: &[f64], l: usize) -> Self {
        let layers = kept
            .iter()
            .zip(forget)
            .map(|(k, &r)| {
                let compressed = l as isize - (r * l as f64).round() as isize;
                let slot = compressed + DISTANCE;
                let slot = if slot < 1 { k.len() / 2 } else { slot as usize };
                FifoLayer { forget: r, slot, entries: k.clone() }
            })
            .collect();
        Self { layers, seen: l }
    }

    /// A token (index `L + i`) was decoded into every layer: returns the (layer, token) pairs
    /// dropped after it.
    pub fn step(&mut self, token: usize) -> Vec<(usize, usize)> {
        self.seen += 1;
        let seen = self.seen as f64;
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            layer.entries.push(token);
            let over = (layer.entries.len() as f64 - seen * (1.0 - layer.forget)) as i64;
            if over > 0 && layer.slot < layer.entries.len() {
                out.push((i, layer.entries.remove(layer.slot)));
            }
        }
        out
    }

    /// Renames the entries (prompt token indices → the positions they have in the cache, when
    /// the cache holds a subset of the prompt or positions were shifted).
    pub fn remap(&mut self, f: impl Fn(usize) -> usize) {
        for layer in &mut self.layers {
            layer.entries.iter_mut().for_each(|e| *e = f(*e));
        }
    }

    /// Entries each layer holds now.
    #[must_use]
    pub fn sizes(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.entries.len()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The brute force: every breakpoint, the closest total (ties: the larger threshold).
    fn brute(curves: &[Vec<f64>], target: f64, protect: usize) -> Vec<usize> {
        let mut cand: Vec<f64> = curves.iter().flatten().copied().collect();
        cand.push(0.0);
        let mut best: Option<(f64, f64, Vec<usize>)> = None;
        for p in cand {
            let f = forgettable(curves, p, protect);
            let d = (f.iter().sum::<usize>() as f64 - target).abs();
            let better = match &best {
                None => true,
                Some((bd, bp, _)) => d < *bd || (d == *bd && p > *bp),
            };
            if better {
                best = Some((d, p, f));
            }
        }
        best.unwrap().2
    }

    #[test]
    fn threshold_search_matches_brute_force() {
        let mut rng = Rng::new(7, "prefixkv");
        for case in 0..300 {
            let n_layer = 1 + rng.below(5);
            let l = 3 + rng.below(30);
            let scores: Vec<Vec<f32>> = (0..n_layer)
                .map(|_| (0..l).map(|_| if rng.uniform() < 0.2 { 0.0 } else { rng.uniform().powi(3) }).collect())
                .collect();
            let curves: Vec<Vec<f64>> = scores.iter().map(|s| lorenz(s)).collect();
            let target = f64::from(rng.uniform()) * (l * n_layer) as f64;
            let got = search_threshold(&curves, target, START_SIZE + 1);
            let want = brute(&curves, target, START_SIZE + 1);
            let (g, w) = (got.iter().sum::<usize>() as f64, want.iter().sum::<usize>() as f64);
            assert_eq!((g - target).abs(), (w - target).abs(), "case {case}: same distance to the target");
            assert_eq!(got, want, "case {case}");
        }
    }

    #[test]
    fn concentrated_layers_get_smaller_budgets() {
        // layer 0: attention on 2 tokens; layer 1: flat
        let l = 20;
        let mut peaked = vec![0.01f32; l];
        peaked[3] = 5.0;
        peaked[7] = 5.0;
        let flat = vec![1.0f32; l];
        let r = calibrate_sample(&[peaked, flat], 0.5);
        assert!(r[0] > r[1], "the peaked layer forgets more: {r:?}");
        let total: f64 = r.iter().map(|x| x * l as f64).sum();
        assert!((total - 0.5 * 2.0 * l as f64).abs() <= 2.0, "rescaled to the target: {total}");
    }

    #[test]
    fn keep_layer_protects_first_and_last() {
        let s = [0.0, 9.0, 1.0, 8.0, 2.0, 0.0];
        assert_eq!(keep_layer(&s, 2), vec![0, 1, 3, 5]);
        assert_eq!(keep_layer(&s, 100), vec![0, 5]);
        assert_eq!(keep_layer(&s, 0), vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn fixed_point_keeps_the_layer_ratio() {
        // L = 100, forget 0.5: 50 kept; slot 50 − 25 = 25
        let kept: Vec<usize> = (0..100).step_by(2).collect();
        let mut fp = FixedPoint::new(&[kept.clone(), kept], &[0.5, 0.0], 100);
        let mut dropped = Vec::new();
        for i in 0..40 {
            dropped.extend(fp.step(100 + i));
        }
        let sizes = fp.sizes();
        assert_eq!(sizes[1], 90, "a layer that forgets nothing never evicts");
        // T = 140: (1 − 0.5)·140 = 70 entries
        assert!((sizes[0] as i64 - 70).abs() <= 1, "{sizes:?}");
        assert!(dropped.iter().all(|&(l, _)| l == 0));
        // FIFO from slot 25: first the prompt survivors 50, 52, … in order
        let first: Vec<usize> = dropped.iter().take(3).map(|&(_, t)| t).collect();
        assert_eq!(first, vec![50, 52, 54]);
    }

    #[test]
    fn profile_lookup() {
        let p = Profile::from_samples("m".into(), &[0.2, 0.5], &[vec![vec![0.7, 0.9], vec![0.9, 0.7]], vec![vec![0.5, 0.5]]]);
        assert_eq!(p.layers_for(Budget::Fraction(0.2)).unwrap(), &[0.8, 0.8]);
        assert!((p.budgets[0].retain[0] - 0.2).abs() < 1e-12);
        assert!(p.layers_for(Budget::Fraction(0.3)).is_err());
        assert!(p.layers_for(Budget::Cells(10)).is_err());
    }
}
