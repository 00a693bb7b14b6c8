//! `aircache`: AirCache (Huang et al., arXiv 2503.23956, ICCV 2025; methods §3). No public code:
//! this follows the equations as quoted by two independent notes, with the points they leave
//! open as options (marked *uncertain*).
//!
//! Once, after the prefill; only **visual** tokens are compressed — every text token is kept, and
//! `--kv-budget r` is the kept fraction of the image tokens.
//!
//! * Elite observation window, per layer ([`Rows::Elite`]): the text keys whose text-only
//!   attention from the last prompt token (head mean) reaches `α = 0.9` of the largest, plus the
//!   last token itself. *Uncertain:* the first token (the attention sink, which dominates that
//!   row) is excluded by default (`--aircache-keep-sink` admits it); "last text token" = the
//!   final prompt token; head handling = mean of per-head probabilities. Only elite queries in
//!   the final ubatch are observed (the question and the chat suffix in the usual layout).
//! * Importance `I_v,ℓ[i]` = mean over elite queries and heads of the softmax over the visual
//!   keys and the elite text keys.
//! * Layer budgets ([`layer_budgets`]): strength `Σ_i I_v,ℓ[i]` and sample skewness of `I_v,ℓ`,
//!   each normalised across layers to mean 1 (skewness shifted to be positive first —
//!   *uncertain*), `r̂_ℓ = ½(s'_t + s'_k)·r`, clipped to `[r_min·r, 1]` with the excess
//!   redistributed so the mean stays `r`. Layer ℓ keeps its top `⌈r̂_ℓ·N_v⌉` visual tokens.
//!
//! * Protected sinks (`--kv-protect-first/-image`, [`super::Protect`]; not in the paper): the
//!   first token of each image can be kept by rule, paid from the visual share.
//!
//! Shapes: statistics `[text bucket][layer][kv head][L]` (media columns only); one keep-set
//! per layer shared by its heads.

use serde::{Deserialize, Serialize};

use super::{need_stats, select, Budget, Build, Granularity, Input, Pick, Policy, PolicyParams, Split, Target};
use crate::error::{Error, Result};
use crate::stats::{Bucket, Rows, StatRequest};
use crate::span::Modality;

/// AirCache, and its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AirCache {
    /// Elite threshold relative to the strongest text key.
    pub alpha: f64,
    /// Let the first prompt token be elite.
    pub keep_sink: bool,
    /// Lowest per-layer visual retention, as a fraction of `r`.
    pub r_min: f64,
}

impl Default for AirCache {
    fn default() -> Self {
        Self { alpha: 0.9, keep_sink: false, r_min: 0.1 }
    }
}

impl PolicyParams for AirCache {
    fn validate(&self) -> Result<()> {
        if !(self.alpha > 0.0 && self.alpha <= 1.0) {
            return Err(Error::Config { field: "aircache.alpha", reason: format!("{} is outside (0, 1]", self.alpha) });
        }
        if !(0.0..=1.0).contains(&self.r_min) {
            return Err(Error::Config { field: "aircache.r_min", reason: format!("{} is outside [0, 1]", self.r_min) });
        }
        Ok(())
    }
}

impl Build for AirCache {
    type Params = Self;
    fn build(params: &Self, _: Budget) -> Result<Self> {
        Ok(*params)
    }
}

/// Sample (bias-corrected) skewness, `N/((N−1)(N−2)) Σ ((x−μ)/σ)³`; 0 for fewer than 3 values or
/// no spread.
#[must_use]
pub fn skewness(x: &[f32]) -> f64 {
    let n = x.len() as f64;
    if x.len() < 3 {
        return 0.0;
    }
    let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = x.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let sd = var.sqrt();
    if sd <= 0.0 || !sd.is_finite() {
        return 0.0;
    }
    n / ((n - 1.0) * (n - 2.0)) * x.iter().map(|&v| ((f64::from(v) - mean) / sd).powi(3)).sum::<f64>()
}

/// `x` scaled to mean 1 (all ones when it sums to zero).
fn to_mean_one(x: &[f64]) -> Vec<f64> {
    let sum: f64 = x.iter().sum();
    if sum > 0.0 && sum.is_finite() {
        x.iter().map(|v| v * x.len() as f64 / sum).collect()
    } else {
        vec![1.0; x.len()]
    }
}

/// Per-layer visual retention from strength and skewness: mean `r`, each in `[floor, 1]`.
#[must_use]
pub fn layer_budgets(strength: &[f64], skew: &[f64], r: f64, floor: f64) -> Vec<f64> {
    let n = strength.len();
    if n == 0 {
        return Vec::new();
    }
    let st = to_mean_one(&strength.iter().map(|v| v.max(0.0)).collect::<Vec<_>>());
    let lo = skew.iter().copied().fold(f64::INFINITY, f64::min);
    let sk = to_mean_one(&skew.iter().map(|v| (v - lo).max(1e-6)).collect::<Vec<_>>());
    let raw: Vec<f64> = st.iter().zip(&sk).map(|(a, b)| 0.5 * (a + b) * r).collect();
    clip_preserving_sum(&raw, floor.min(r), 1.0)
}

/// Clips to `[lo, hi]` and redistributes the excess over the unclipped entries in proportion
/// to their values, so the sum stays that of `x` (when feasible).
#[must_use]
pub fn clip_preserving_sum(x: &[f64], lo: f64, hi: f64) -> Vec<f64> {
    let target: f64 = x.iter().sum::<f64>().clamp(lo * x.len() as f64, hi * x.len() as f64);
    let mut v: Vec<f64> = x.to_vec();
    let mut fixed = vec![false; v.len()];
    for _ in 0..=v.len() {
        for (i, e) in v.iter_mut().enumerate() {
            if *e <= lo {
                *e = lo;
                fixed[i] = true;
            } else if *e >= hi {
                *e = hi;
                fixed[i] = true;
            }
        }
        let fixed_sum: f64 = v.iter().zip(&fixed).filter(|(_, f)| **f).map(|(e, _)| e).sum();
        let free_sum: f64 = v.iter().zip(&fixed).filter(|(_, f)| !**f).map(|(e, _)| e).sum();
        let want = target - fixed_sum;
        if free_sum <= 0.0 || (want - free_sum).abs() < 1e-12 {
            break;
        }
        let k = want / free_sum;
        v.iter_mut().zip(&fixed).filter(|(_, f)| !**f).for_each(|(e, _)| *e *= k);
        if v.iter().zip(&fixed).all(|(e, f)| *f || (lo..=hi).contains(e)) {
            break;
        }
    }
    v
}

impl Policy for AirCache {
    fn name(&self) -> &'static str {
        "aircache"
    }

    fn request(&self, _: &Split, _: Option<usize>) -> Option<StatRequest> {
        Some(StatRequest { rows: Rows::Elite { alpha: self.alpha as f32, keep_sink: self.keep_sink }, n: 0.0 })
    }

    fn applies(&self, modality: &[Modality]) -> bool {
        modality.iter().any(|m| *m != Modality::Text)
    }

    fn granularity(&self) -> Granularity {
        Granularity::Layer
    }

    /// Protected sinks take their cells from the visual share (text is kept anyway).
    fn protects_sinks(&self) -> bool {
        true
    }

    /// Every text token.
    fn kept_by_rule(&self, input: &Input<'_>) -> Vec<usize> {
        (0..input.split.l).filter(|&t| input.modality[t] == Modality::Text).collect()
    }

    /// `B` = every text token + `r` of the visual tokens (`r` = the fraction, or cells / N_v);
    /// a number of cells (a bounded cache's room) as it is. No recent window: all text is kept.
    fn split(&self, target: Target, modality: &[Modality], _recent_bias: f64) -> Result<Split> {
        let budget = match target {
            Target::Cells(_) => return Split::without_recent(target.budget(), modality.len()),
            Target::Budget(b) => b,
        };
        let n_v = modality.iter().filter(|m| **m != Modality::Text).count();
        let n_t = modality.len() - n_v;
        let kept_v = match budget {
            Budget::Fraction(r) => (r * n_v as f64).ceil() as usize,
            Budget::Cells(c) => c.min(n_v),
        };
        if kept_v == 0 && n_v > 0 {
            return Err(Error::Config { field: "budget", reason: format!("{budget} of {n_v} image tokens keeps none") });
        }
        Split::without_recent(Budget::Cells(n_t + kept_v), modality.len())
    }

    /// Per layer: every text token and the layer's share of the most important visual tokens.
    fn pick(&self, input: &Input<'_>) -> Result<Vec<Pick>> {
        let stats = need_stats(input, "aircache")?;
        let visual: Vec<usize> = (0..input.split.l).filter(|&t| input.modality[t] != Modality::Text).collect();
        let text = (0..input.split.l).filter(|&t| input.modality[t] == Modality::Text);
        let n_v = visual.len();
        // text alone may exceed a bounded prefill's room: then no image token is kept and the
        // global vote trims the text
        // (`k`: the budget less any protected sinks, which the shared selection adds back)
        let r = input.split.k.saturating_sub(input.split.l - n_v) as f64 / n_v.max(1) as f64;
        // head-mean importance of each visual token, per layer
        let importance: Vec<Vec<f32>> = (0..stats.n_layer)
            .map(|layer| {
                let mut s = vec![0f32; input.split.l];
                for head in 0..stats.n_head_kv {
                    for (a, v) in s.iter_mut().zip(stats.column(Bucket::Text, layer, head)) {
                        *a += v / stats.n_head_kv as f32;
                    }
                }
                s
            })
            .collect();
        let strength: Vec<f64> = importance.iter().map(|s| visual.iter().map(|&t| f64::from(s[t])).sum()).collect();
        let skew: Vec<f64> = importance.iter().map(|s| skewness(&visual.iter().map(|&t| s[t]).collect::<Vec<_>>())).collect();
        let budgets = layer_budgets(&strength, &skew, r, self.r_min * r);
        tracing::debug!(?budgets, "aircache layer budgets");
        let text: Vec<usize> = text.collect();
        Ok(importance
            .into_iter()
            .zip(budgets)
            .enumerate()
            .map(|(layer, (s, rl))| {
                let mut vs = vec![f32::NEG_INFINITY; input.split.l];
                visual.iter().for_each(|&t| vs[t] = s[t]);
                let n_keep = ((rl * n_v as f64).ceil() as usize).min(n_v);
                let mut keep = text.clone();
                keep.extend(select::top_k(&vs, 0..input.split.l, n_keep).into_iter().filter(|&t| input.modality[t] != Modality::Text));
                Pick { layer: Some(layer), head: None, score: s, keep: Some(keep) }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_keep_the_mean_and_the_bounds() {
        let strength = [0.1, 0.5, 2.0, 0.05, 0.9, 3.0];
        let skew = [0.2, 4.0, -1.0, 0.0, 1.5, 8.0];
        for r in [0.01, 0.1, 0.2, 0.5, 0.9] {
            let b = layer_budgets(&strength, &skew, r, 0.1 * r);
            let mean = b.iter().sum::<f64>() / b.len() as f64;
            assert!((mean - r).abs() < 1e-9, "r={r}: mean {mean} {b:?}");
            assert!(b.iter().all(|&x| x >= 0.1 * r - 1e-12 && x <= 1.0 + 1e-12), "r={r}: {b:?}");
        }
        // r = 0.9 forces clipping at 1 and redistribution
        let b = layer_budgets(&strength, &skew, 0.9, 0.09);
        assert!(b.iter().any(|&x| (x - 1.0).abs() < 1e-12), "{b:?}");
    }

    #[test]
    fn stronger_layers_get_more() {
        let b = layer_budgets(&[1.0, 2.0, 3.0], &[1.0, 1.0, 1.0], 0.2, 0.0);
        assert!(b[0] < b[1] && b[1] < b[2], "{b:?}");
    }

    #[test]
    fn clipping_redistributes() {
        let v = clip_preserving_sum(&[0.0, 0.1, 2.0, 0.9], 0.05, 1.0);
        assert!((v.iter().sum::<f64>() - 3.0).abs() < 1e-9, "{v:?}");
        assert_eq!(v[2], 1.0);
        assert_eq!(v[0], 0.05);
        assert!(v.iter().all(|&x| (0.05..=1.0).contains(&x)));
    }

    #[test]
    fn skewness_of_known_samples() {
        assert_eq!(skewness(&[1.0, 1.0, 1.0]), 0.0);
        assert!(skewness(&[0.0, 0.0, 0.0, 0.0, 10.0]) > 1.5);
        assert!(skewness(&[10.0, 10.0, 10.0, 10.0, 0.0]) < -1.5);
        // scipy.stats.skew([1, 2, 3, 10], bias=False) = 1.7636
        assert!((skewness(&[1.0, 2.0, 3.0, 10.0]) - 1.763_6).abs() < 1e-3);
    }
}
