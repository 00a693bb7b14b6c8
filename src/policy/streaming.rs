//! `streaming`: StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention
//! Sinks", arXiv 2309.17453): keep the first `sinks` tokens (attention sinks) and the most
//! recent ones, nothing else.
//!
//! Shapes: keeps `[0, min(sinks, B−R))` ∪ the last `B − sinks` tokens (⊇ the recent window R)
//! — all of B. Needs no
//! attention statistics, so flash attention stays available.

use super::{HeadChoice, Input, Policy, Split};
use crate::error::Result;
use crate::observe::StatRequest;

/// Sinks + recent window.
#[derive(Debug, Clone, Copy)]
pub struct Streaming {
    /// Attention sinks kept at the start (4, as the paper).
    pub sinks: usize,
}

impl Default for Streaming {
    fn default() -> Self {
        Self { sinks: 4 }
    }
}

impl Policy for Streaming {
    fn name(&self) -> &'static str {
        "streaming"
    }
    fn request(&self, _: &Split, _: Option<usize>) -> Option<StatRequest> {
        None
    }
    fn choose(&self, input: &Input<'_>) -> Result<Vec<HeadChoice>> {
        let Split { l, b, r, .. } = input.split;
        // sinks never displace the budget's recent window (at least the last token)
        let sinks = self.sinks.min(b - r);
        let mut keep: Vec<usize> = (0..sinks).collect();
        keep.extend(l - (b - sinks)..l);
        let mut score = vec![0.0; l];
        for &t in &keep {
            score[t] = 1.0;
        }
        Ok(vec![HeadChoice { layer: None, head: None, keep, score }])
    }
}
