//! `vnorm`: value-norm ranking (InfiniPot-V, Kim et al., arXiv 2506.15745, "VaN": value norm as
//! a query-agnostic importance of visual tokens, used to hold a hard memory cap while a video is
//! encoded): each KV head keeps the tokens whose cached value has the largest L2 norm — a token
//! with a small value contributes little to any attention output whatever attends to it. No
//! attention is observed (flash attention stays on; question-agnostic).
//!
//! Shapes: per (layer, KV head) score `‖v_j‖₂ + 1e-6`, top-k over `[0, L − r)`, with `r = 1` or
//! the recent window (`recent = true`), as `knorm`. As InfiniPot-V, only the vision tokens are
//! ranked by value norm (`media_only`, default): text tokens rank before every image token (by
//! their own value norm among themselves, so the budget still holds when text alone exceeds it).
//! Scoring text by value norm too (`media_only = false`) evicts the attention sink — the first
//! token, whose value norm is the smallest of all — and the model collapses (real small VLM,
//! K = 8, question after pruning, budget 0.5, 2 cases: KL 8.4 against 0.05 for a random spread).

use serde::{Deserialize, Serialize};

use super::knorm::cache_split;
use super::{need_kv, Budget, Build, Input, Pick, Policy, PolicyParams, Split, Target};
use crate::error::Result;
use crate::span::Modality;
use crate::stats::KvRequest;

/// Value-norm ranking, and its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VNorm {
    /// Keep the project's recent window (B/2·recent_bias) instead of only the last token.
    pub recent: bool,
    /// Rank only image (media) tokens by value norm; text first (InfiniPot-V).
    pub media_only: bool,
}

impl Default for VNorm {
    fn default() -> Self {
        Self { recent: false, media_only: true }
    }
}

impl PolicyParams for VNorm {}

impl Build for VNorm {
    type Params = Self;
    fn build(params: &Self, _: Budget) -> Result<Self> {
        Ok(*params)
    }
}

impl Policy for VNorm {
    fn name(&self) -> &'static str {
        "vnorm"
    }
    fn kv_request(&self) -> Option<KvRequest> {
        Some(KvRequest { vnorm: true, ..KvRequest::default() })
    }
    fn protects_sinks(&self) -> bool {
        true
    }
    fn split(&self, target: Target, modality: &[Modality], recent_bias: f64) -> Result<Split> {
        cache_split(self.recent, target, modality.len(), recent_bias)
    }
    fn pick(&self, input: &Input<'_>) -> Result<Vec<Pick>> {
        let kv = need_kv(input, "vnorm")?;
        let media_only = self.media_only;
        Ok(Pick::per_head_of(kv.n_layer, kv.n_head_kv, |layer, head| {
            let norms = kv.vnorm(layer, head).unwrap_or_default();
            // text above every image: offset by the largest norm
            let top = norms.iter().copied().fold(0f32, f32::max) + 1.0;
            norms
                .iter()
                .zip(input.modality)
                .map(|(n, m)| n + 1e-6 + if media_only && *m == Modality::Text { top } else { 0.0 })
                .collect()
        }))
    }
}
