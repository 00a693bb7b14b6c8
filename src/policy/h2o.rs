//! `h2o`: Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023, arXiv 2306.14048), in the
//! prefill-only form the CSP and LOOK-M papers compare against (methods §5.2): per layer and
//! KV head, the attention each key received summed over **all** prompt queries (softmax),
//! top-k of the keys before the recent window, plus the recent window. No decode-time eviction.
//!
//! Shapes: statistics `[layer][kv head][L]` (text + image queries); per head keep
//! `top_k(score[0, L−R), k) ∪ [L−R, L)`; mirrors kvpress' `ObservedAttentionPress` at prefill.

use super::{need_stats, Budget, Build, Input, Pick, Policy, Split};
use crate::error::Result;
use crate::stats::{Rows, StatRequest};

/// Accumulated attention over all prompt queries.
#[derive(Debug, Clone, Copy, Default)]
pub struct H2o;

impl Build for H2o {
    type Params = ();
    fn build(_: &(), _: Budget) -> Result<Self> {
        Ok(H2o)
    }
}

impl Policy for H2o {
    fn name(&self) -> &'static str {
        "h2o"
    }
    fn request(&self, _: &Split, obs_window: Option<usize>) -> Option<StatRequest> {
        Some(StatRequest { rows: obs_window.map_or(Rows::All, Rows::Last), n: 0.0 })
    }
    fn pick(&self, input: &Input<'_>) -> Result<Vec<Pick>> {
        let stats = need_stats(input, "h2o")?;
        Ok(Pick::per_head(stats, |layer, head| stats.total(layer, head)))
    }
}
