//! `vnorm`: value-norm ranking (InfiniPot-V, Kim et al., arXiv 2506.15745, "VaN": value norm as
//! a query-agnostic importance of visual tokens, used to hold a hard memory cap while a video is
//! encoded): each KV head keeps the tokens whose cached value has the largest L2 norm — a token
//! with a small value contributes little to any attention output whatever attends to it. No
//! attention is observed (flash attention stays on; question-agnostic).
//!
//! Shapes: per (layer, KV head) score `‖v_j‖₂ + 1e-6`, top-k over `[0, L − r)`; InfiniPot-V
//! scores the vision tokens of its cache; here every candidate is scored (text too), with `r = 1`
//! or the recent window (`recent = true`), as `knorm`.

use serde::{Deserialize, Serialize};

use super::knorm::cache_split;
use super::{need_kv, Budget, Build, Input, Pick, Policy, PolicyParams, Split, Target};
use crate::error::Result;
use crate::span::Modality;
use crate::stats::KvRequest;

/// Value-norm ranking, and its parameters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VNorm {
    /// Keep the project's recent window (B/2·recent_bias) instead of only the last token.
    pub recent: bool,
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
        Ok(Pick::per_head_of(kv.n_layer, kv.n_head_kv, |layer, head| {
            kv.vnorm(layer, head).unwrap_or_default().iter().map(|n| n + 1e-6).collect()
        }))
    }
}
