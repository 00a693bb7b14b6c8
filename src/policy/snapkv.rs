//! `snapkv`: SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation",
//! arXiv 2404.14469; `SnapKVCluster.update_kv`, methods §6): per layer and KV head, the softmax
//! attention of the last W prompt queries (the observation window) summed per key, smoothed by
//! 1-D average pooling (kernel 5, zero padding), top-k of the keys before the recent window,
//! plus the recent window.
//!
//! Shapes: statistics `[layer][kv head][L]` over W = 32 rows (capped by B); pooled over
//! `[0, L−R)`; per head keep `top_k(pooled, k) ∪ [L−R, L)`. Mirrors kvpress' `SnapKVPress`.

use serde::{Deserialize, Serialize};

use super::{need_stats, select, Budget, Build, Input, Pick, Policy, PolicyParams, Split};
use crate::error::{Error, Result};
use crate::stats::{Rows, StatRequest};

/// SnapKV, and its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapKv {
    /// Default observation window (capped by the budget).
    pub window: usize,
    /// Pooling kernel.
    pub kernel: usize,
}

impl Default for SnapKv {
    fn default() -> Self {
        Self { window: 32, kernel: 5 }
    }
}

impl PolicyParams for SnapKv {
    fn validate(&self) -> Result<()> {
        if self.window == 0 || self.kernel == 0 {
            let field = if self.window == 0 { "snapkv.window" } else { "snapkv.kernel" };
            return Err(Error::Config { field, reason: "must be at least 1".into() });
        }
        Ok(())
    }
}

impl Build for SnapKv {
    type Params = Self;
    fn build(params: &Self, _: Budget) -> Result<Self> {
        Ok(*params)
    }
}

impl Policy for SnapKv {
    fn name(&self) -> &'static str {
        "snapkv"
    }
    fn protects_sinks(&self) -> bool {
        true
    }

    fn request(&self, split: &Split, obs_window: Option<usize>) -> Option<StatRequest> {
        let w = obs_window.unwrap_or(self.window).min(split.b.max(1));
        Some(StatRequest { rows: Rows::Last(w), n: 0.0 })
    }
    fn pick(&self, input: &Input<'_>) -> Result<Vec<Pick>> {
        let stats = need_stats(input, "snapkv")?;
        let cand = input.split.candidates();
        Ok(Pick::per_head(stats, |layer, head| {
            let total = stats.total(layer, head);
            let mut s = select::avg_pool(&total[cand.clone()], self.kernel);
            s.extend_from_slice(&total[cand.end..]);
            s
        }))
    }
}
