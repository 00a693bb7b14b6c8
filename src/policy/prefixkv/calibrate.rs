//! PrefixKV's offline part (`csp-llava calibrate`): per sample, each layer's Lorenz curve of
//! head-mean accumulated attention; a common threshold `p` gives each layer the shortest prefix
//! reaching `p`, chosen so the tokens outside the prefixes add up to the forget target
//! `(1 − b)·L·N_layers`; then rescaled to hit it exactly ([`calibrate_sample`]). The per-sample
//! fractions are averaged into a [`Profile`](super::Profile).
//!
//! Search: the reference bisects `p` on `[0, 1]` until `|F − target| < 5` (no iteration cap).
//! `F(p)` is a step function that changes only at the curves' values, so we search those
//! breakpoints exactly and take the one closest to the target — the same threshold up to the
//! reference's tolerance, deterministic — then rescale as the reference does.

use super::START_SIZE;
use crate::stats::AttentionStats;

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
}
