//! `streaming`: StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention
//! Sinks", arXiv 2309.17453): keep the first `sinks` tokens (attention sinks) and the most
//! recent ones, nothing else.
//!
//! Shapes: keeps `[0, min(sinks, B−R))` ∪ the last `B − sinks` tokens (⊇ the recent window R)
//! — all of B. Needs no attention statistics, so flash attention stays available.

use serde::{Deserialize, Serialize};

use super::{Budget, Build, Input, Pick, Policy, PolicyParams, Split};
use crate::error::Result;

/// Sinks + recent window, and its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Streaming {
    /// Attention sinks kept at the start (4, as the paper).
    pub sinks: usize,
}

impl Default for Streaming {
    fn default() -> Self {
        Self { sinks: 4 }
    }
}

impl PolicyParams for Streaming {}

impl Build for Streaming {
    type Params = Self;
    fn build(params: &Self, _: Budget) -> Result<Self> {
        Ok(*params)
    }
}

impl Policy for Streaming {
    fn name(&self) -> &'static str {
        "streaming"
    }
    /// The sinks and the tokens just before the recent window (the shared selection adds it).
    fn pick(&self, input: &Input<'_>) -> Result<Vec<Pick>> {
        let Split { l, b, r, .. } = input.split;
        // sinks never displace the budget's recent window (at least the last token)
        let sinks = self.sinks.min(b - r);
        let mut keep: Vec<usize> = (0..sinks).collect();
        keep.extend(l - (b - sinks)..l - r);
        let mut score = vec![0.0; l];
        for t in keep.iter().copied().chain(input.split.recent_window()) {
            score[t] = 1.0;
        }
        Ok(vec![Pick { layer: None, head: None, score, keep: Some(keep) }])
    }
}
