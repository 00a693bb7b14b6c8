//! `prefixkv`: PrefixKV (Wang et al., arXiv 2412.03409, NeurIPS 2025; code `THU-MIG/PrefixKV`,
//! `prefixkv.py: PrefixKV.__call__`, `obtain_cdf_num`; methods §2).
//!
//! Scores: per layer, the attention each key received summed over **all** prompt queries,
//! averaged over heads (`s_ℓ[j] = Σ_q mean_h A_ℓ,h[q, j]`), so all heads of a layer share one
//! set and each layer keeps a different number of tokens.
//!
//! * **Offline** ([`calibrate`], `csp-llava calibrate`): per sample, each layer's Lorenz
//!   curve `c_ℓ = cumsum(sort_desc(s_ℓ) / Σ s_ℓ)`; a common threshold `p` gives each layer the
//!   shortest prefix reaching `p`, and `p` is chosen so the tokens outside the prefixes add up
//!   to the forget target `(1 − b)·L·N_layers`; then rescaled to hit it exactly. The per-layer
//!   fractions are averaged over samples into a [`Profile`].
//! * **Prefill**: layer ℓ forgets `F_ℓ = round(r_ℓ·L)` of the candidates `[start, L−1)` with the
//!   lowest scores; the first `start = 1` token and the last prompt token are always kept.
//!   Protected sinks (`--kv-protect-image`, not in the paper) forget that many more per layer.
//! * **Decode** ([`fixed_point`], ElasticCache's fixed-point elimination): after each step, a
//!   layer whose cache exceeds `(1 − r_ℓ)` of all tokens so far drops the entry at slot
//!   `(L − F_ℓ) − 25` — a FIFO over the last 25 prompt survivors and then the generated tokens.
//!
//! Naming: the code's `--ratio` and the stored `confs/*.json` are **forget** fractions, while
//! the paper's tables label columns by the **retained** fraction (column "20%" = `ratio 0.8`).
//! csp-llava uses retained fractions everywhere: `--kv-budget 0.2` keeps 20%, and profiles store
//! the retained fraction per layer (`retain`), with the forget fractions alongside.
//!
//! Files: the policy and its prefill selection here; [`profile`] (the calibrated per-layer
//! fractions), [`calibrate`] (the offline search), [`fixed_point`] (the decode-time FIFO).

pub mod calibrate;
pub mod fixed_point;
pub mod profile;

use serde::{Deserialize, Serialize};

pub use calibrate::{calibrate_sample, layer_scores, lorenz, search_threshold};
pub use fixed_point::DISTANCE;
pub use profile::{Profile, ProfileEntry};

use super::{need_stats, select, Budget, Build, DecodeEviction, Granularity, Input, Pick, Policy, PolicyParams, Retention, Split, Target};
use crate::error::{Error, Result};
use crate::stats::{Rows, StatRequest};
use crate::span::Modality;

/// Always-kept leading tokens (`--start-size 1` of the evaluation scripts).
pub const START_SIZE: usize = 1;


/// PrefixKV's parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrefixKvParams {
    /// Per-layer retention profile from `csp-llava calibrate` (uniform if none).
    pub profile: Option<Profile>,
}

impl PolicyParams for PrefixKvParams {}

/// PrefixKV with per-layer forget fractions from a calibrated profile (uniform without one).
#[derive(Debug, Clone, Default)]
pub struct PrefixKv {
    /// Forget fraction per layer for the configured budget (`Profile::layers_for`).
    pub forget: Option<Vec<f64>>,
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

impl Build for PrefixKv {
    type Params = PrefixKvParams;

    /// The profile's fractions for `budget` (uniform without a profile).
    ///
    /// # Errors
    /// A profile not calibrated for the budget (or a budget in cells).
    fn build(params: &PrefixKvParams, budget: Budget) -> Result<Self> {
        let forget = params.profile.as_ref().map(|p| p.layers_for(budget).map(<[f64]>::to_vec)).transpose()?;
        Ok(Self { forget })
    }
}

impl PrefixKv {
    /// Per-layer forget fractions for this prompt's budget.
    fn forget(&self, split: &Split, n_layer: usize) -> Result<Vec<f64>> {
        match &self.forget {
            None => Ok(vec![1.0 - split.b as f64 / split.l.max(1) as f64; n_layer]),
            Some(f) if f.len() == n_layer => Ok(f.clone()),
            Some(f) => Err(Error::Config {
                field: "prefixkv.profile",
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

    /// `B` of `L`, without a recent window: the first and the last token are kept instead.
    fn split(&self, target: Target, modality: &[Modality], _recent_bias: f64) -> Result<Split> {
        Split::without_recent(target.budget(), modality.len())
    }

    fn granularity(&self) -> Granularity {
        Granularity::Layer
    }

    /// Protected sinks (beyond the first tokens it always keeps) are paid for by forgetting
    /// that many more tokens in every layer.
    fn protects_sinks(&self) -> bool {
        true
    }

    fn pick(&self, input: &Input<'_>) -> Result<Vec<Pick>> {
        let stats = need_stats(input, "prefixkv")?;
        let scores = layer_scores(stats);
        let forget = self.forget(&input.split, stats.n_layer)?;
        let l = input.split.l;
        // the shared selection hands over `k` less the protected sinks (no recent window here)
        let sinks = input.split.b.saturating_sub(input.split.k + input.split.r);
        Ok(scores
            .into_iter()
            .zip(forget)
            .enumerate()
            .map(|(layer, (s, r))| {
                let keep = keep_layer(&s, (r * l as f64).round() as usize + sinks);
                Pick { layer: Some(layer), head: None, score: s, keep: Some(keep) }
            })
            .collect())
    }

    fn decode_eviction(&self, input: &Input<'_>, retention: &Retention) -> Result<Option<Box<dyn DecodeEviction>>> {
        let Some(heads) = retention.per_head.as_ref() else { return Ok(None) };
        let n_layer = heads.n_layer;
        let forget = self.forget(&input.split, n_layer)?;
        let kept: Vec<Vec<usize>> = (0..n_layer).map(|layer| (0..heads.l).filter(|&t| heads.get(layer, 0)[t]).collect()).collect();
        Ok(Some(Box::new(fixed_point::FixedPoint::new(&kept, &forget, heads.l))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_layer_protects_first_and_last() {
        let s = [0.0, 9.0, 1.0, 8.0, 2.0, 0.0];
        assert_eq!(keep_layer(&s, 2), vec![0, 1, 3, 5]);
        assert_eq!(keep_layer(&s, 100), vec![0, 5]);
        assert_eq!(keep_layer(&s, 0), vec![0, 1, 2, 3, 4, 5]);
    }
}
