//! `expected`: Expected Attention (Devoto et al., "Expected Attention: KV Cache Compression by
//! Estimating Attention from Future Queries Distribution", arXiv 2510.00636; kvpress
//! `ExpectedAttentionPress`). Question-agnostic: the queries that will come are modelled as a
//! Gaussian fitted to the prompt's own queries, carried to the future positions by the mean RoPE
//! rotation, and each cached key is scored by the attention it can expect from them — in closed
//! form, with no attention matrix, so flash attention stays on.
//!
//! Shapes, per layer and query head h, as released (defaults `n_future = 512`, `n_sink = 4`,
//! covariance and value norms on, `ε = 0`):
//! 1. moments of the **pre-RoPE** queries of prompt rows `t ≥ n_sink` (observed in the graph,
//!    patch 0013: [`crate::stats::Rows::Moments`]): `μ`, population covariance `Σ`;
//! 2. `R̄` = the mean RoPE rotation over the next `n_future` positions, `μ′ = R̄μ`, `Σ′ = R̄ΣR̄ᵀ`
//!    ([`crate::stats::QueryMoments::future`]);
//! 3. `z_h(j) = μ′·k_j/√d + k_jᵀΣ′k_j/(2d)` for every cached (post-RoPE) key of h's KV head — the
//!    log of `E[exp(qᵀk/√d)]` for `q ~ N(μ′, Σ′)` (computed on the device by the scan, patch 0013);
//! 4. `p_h = softmax_{j ≥ n_sink} z_h(j)`; per KV head the mean of its query heads' `p_h`, then
//!    `s(j) = (s(j) + ε)·‖v_j‖₂`;
//! 5. the first `n_sink` tokens score above every other (kept first); top-k per KV head over
//!    `[0, L − r)` with `r = 1` as kvpress ranks every token (`recent = true`: the project's
//!    recent window), `B = ⌊b·L⌋` in all.
//!
//! In a bounded prefill (`--kv-max-cells`) the moments accumulate over every row read so far and
//! the future starts at the next position. For VLM prompts the rows are mostly image tokens
//! while the future queries are text: the released method does not distinguish them, nor do we.

use serde::{Deserialize, Serialize};

use super::knorm::cache_split;
use super::{need_kv, Budget, Build, Input, Pick, Policy, PolicyParams, Split, Target};
use crate::error::{Error, Result};
use crate::span::Modality;
use crate::stats::{ExpectedRequest, KvRequest, Rows, StatRequest};

/// Expected Attention, and its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Expected {
    /// Future positions the query distribution is averaged over.
    pub n_future: usize,
    /// Leading tokens kept as attention sinks (and left out of the query moments).
    pub n_sink: usize,
    /// Use the queries' covariance (else their mean only).
    pub cov: bool,
    /// Weight the expected attention by the value norm.
    pub vnorm: bool,
    /// Added to the expected attention before the value-norm weight.
    pub epsilon: f64,
    /// Keep the project's recent window (B/2·recent_bias) instead of only the last token.
    pub recent: bool,
}

impl Default for Expected {
    fn default() -> Self {
        Self { n_future: 512, n_sink: 4, cov: true, vnorm: true, epsilon: 0.0, recent: false }
    }
}

impl PolicyParams for Expected {
    fn validate(&self) -> Result<()> {
        if self.n_future == 0 {
            return Err(Error::Config { field: "expected.n_future", reason: "must be at least 1".into() });
        }
        if !(self.epsilon >= 0.0 && self.epsilon.is_finite()) {
            return Err(Error::Config { field: "expected.epsilon", reason: format!("{} is not a finite value >= 0", self.epsilon) });
        }
        Ok(())
    }
}

impl Build for Expected {
    type Params = Self;
    fn build(params: &Self, _: Budget) -> Result<Self> {
        Ok(*params)
    }
}

/// Steps 4–5 for one KV head: `z` of its `g` query heads (`z[i]`, one value per token) and the
/// tokens' value norms (`None`: unweighted) → one score per token.
#[must_use]
pub fn scores(z: &[&[f32]], vnorm: Option<&[f32]>, n_sink: usize, epsilon: f64) -> Vec<f32> {
    let l = z.first().map_or(0, |z| z.len());
    let sink = n_sink.min(l);
    let mut s = vec![0.0f64; l];
    for zh in z {
        let mx = zh[sink..].iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f64> = zh[sink..].iter().map(|&x| f64::from(x - mx).exp()).collect();
        let sum: f64 = e.iter().sum();
        for (acc, e) in s[sink..].iter_mut().zip(e) {
            *acc += e / sum / z.len() as f64;
        }
    }
    if let Some(v) = vnorm {
        for (acc, &v) in s.iter_mut().zip(v).skip(sink) {
            *acc = (*acc + epsilon) * f64::from(v);
        }
    }
    let top = s[sink..].iter().copied().fold(0.0, f64::max);
    for acc in &mut s[..sink] {
        *acc = top + 1.0;
    }
    // the shared vote counts a keep only where its score is > 0
    s.iter().map(|&x| (x as f32).max(f32::MIN_POSITIVE)).collect()
}

impl Policy for Expected {
    fn name(&self) -> &'static str {
        "expected"
    }
    fn request(&self, split: &Split, _obs_window: Option<usize>) -> Option<StatRequest> {
        // at least the last row, so a prompt no longer than the sinks is still observed
        Some(StatRequest { rows: Rows::Moments { skip: self.n_sink.min(split.l.saturating_sub(1)) }, n: 0.0 })
    }
    fn kv_request(&self) -> Option<KvRequest> {
        Some(KvRequest { vnorm: self.vnorm, expected: Some(ExpectedRequest { n_future: self.n_future, cov: self.cov }), ..KvRequest::default() })
    }
    fn split(&self, target: Target, modality: &[Modality], recent_bias: f64) -> Result<Split> {
        cache_split(self.recent, target, modality.len(), recent_bias)
    }
    fn pick(&self, input: &Input<'_>) -> Result<Vec<Pick>> {
        let kv = need_kv(input, "expected")?;
        if kv.n_head_kv == 0 || kv.n_head % kv.n_head_kv != 0 || kv.z(0, 0).is_none() {
            return Err(Error::Config { field: "policy", reason: "expected needs Expected Attention's scores of the cached keys".into() });
        }
        let g = kv.n_head / kv.n_head_kv;
        Ok(Pick::per_head_of(kv.n_layer, kv.n_head_kv, |layer, head| {
            let z: Vec<&[f32]> = (head * g..(head + 1) * g).filter_map(|h| kv.z(layer, h)).collect();
            scores(&z, if self.vnorm { kv.vnorm(layer, head) } else { None }, self.n_sink, self.epsilon)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answer() {
        // 6 tokens, one sink, one head, d = 2, μ′ = (1, 0), Σ′ = diag(0.5, 0); keys t1…t5 =
        // (1,0), (−1,0), (0,1), (2,0), (0,0): z = μ′·k/√2 + kᵀΣ′k/4
        let keys = [(1.0f64, 0.0f64), (-1.0, 0.0), (0.0, 1.0), (2.0, 0.0), (0.0, 0.0)];
        let mut z = vec![9.0f32]; // the sink's z is ignored
        z.extend(keys.iter().map(|&(a, _)| (a / 2f64.sqrt() + 0.5 * a * a / 4.0) as f32));
        let want_z = [0.8321, -0.5821, 0.0, 1.9142, 0.0];
        for (z, w) in z[1..].iter().zip(want_z) {
            assert!((f64::from(*z) - w).abs() < 1e-4, "{z} vs {w}");
        }
        let plain = scores(&[&z], None, 1, 0.0);
        let want_p = [0.1975, 0.0480, 0.0859, 0.5827, 0.0859];
        for (p, w) in plain[1..].iter().zip(want_p) {
            assert!((f64::from(*p) - w).abs() < 1e-4, "{p} vs {w}");
        }
        assert!((f64::from(plain[0]) - 1.5827).abs() < 1e-4);
        let v = [1.0f32, 1.0, 2.0, 5.0, 1.0, 1.0];
        let s = scores(&[&z], Some(&v), 1, 0.0);
        let want_s = [0.1975, 0.0960, 0.4296, 0.5827, 0.0859];
        for (p, w) in s[1..].iter().zip(want_s) {
            assert!((f64::from(*p) - w).abs() < 1e-4, "{p} vs {w}");
        }
        // ε is added before the value norm
        let e = scores(&[&z], Some(&v), 1, 0.1);
        assert!((f64::from(e[2]) - (0.0480 + 0.1) * 2.0).abs() < 1e-4);
    }

    #[test]
    fn grouped_heads_average_their_softmaxes_not_their_logits() {
        // mean logits (5, 5, 4.5) would tie tokens 0 and 1; the mean of the softmaxes does not
        let a = [10.0f32, 0.0, 0.0];
        let b = [0.0f32, 10.0, 9.0];
        let s = scores(&[&a, &b], None, 0, 0.0);
        let e = 1f64.exp();
        let want = [0.5, 0.5 * e / (1.0 + e), 0.5 / (1.0 + e)];
        for (s, w) in s.iter().zip(want) {
            assert!((f64::from(*s) - w).abs() < 1e-3, "{s} vs {w}");
        }
    }
}
