//! `knorm`: KNorm (Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache
//! Compression", EMNLP 2024, arXiv 2406.11430; kvpress `KnormPress`): keys with a small L2 norm
//! draw high attention, so each KV head keeps the tokens whose cached key has the smallest
//! norm. No attention is observed — flash attention stays on, every backend works, and the
//! ranking does not depend on any question (a compress-once cache).
//!
//! Shapes: per (layer, KV head) score `1/(‖k_j‖₂ + 1e-6)` (post-RoPE keys as cached: the norm is
//! rotation-invariant), top-k over `[0, L − r)`; `r = 1` (the last token) as kvpress ranks every
//! token, or the project's recent window with `recent = true` ([`cache_split`]).

use serde::{Deserialize, Serialize};

use super::{need_kv, Budget, Build, Input, Pick, Policy, PolicyParams, Split, Target};
use crate::error::Result;
use crate::span::Modality;
use crate::stats::KvRequest;

/// KNorm, and its parameters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KNorm {
    /// Keep the project's recent window (B/2·recent_bias) instead of only the last token.
    pub recent: bool,
}

impl PolicyParams for KNorm {}

impl Build for KNorm {
    type Params = Self;
    fn build(params: &Self, _: Budget) -> Result<Self> {
        Ok(*params)
    }
}

/// The budget of the cache scorers (`knorm`, `vnorm`, `keydiff`): every cell by score but the
/// last token, or with `recent` the shared recent window.
pub(super) fn cache_split(recent: bool, target: Target, l: usize, recent_bias: f64) -> Result<Split> {
    if recent {
        Split::new(target.budget(), l, recent_bias)
    } else {
        Split::last_only(target.budget(), l)
    }
}

impl Policy for KNorm {
    fn name(&self) -> &'static str {
        "knorm"
    }
    fn kv_request(&self) -> Option<KvRequest> {
        Some(KvRequest { knorm: true, ..KvRequest::default() })
    }
    fn protects_sinks(&self) -> bool {
        true
    }
    fn split(&self, target: Target, modality: &[Modality], recent_bias: f64) -> Result<Split> {
        cache_split(self.recent, target, modality.len(), recent_bias)
    }
    fn pick(&self, input: &Input<'_>) -> Result<Vec<Pick>> {
        let kv = need_kv(input, "knorm")?;
        Ok(Pick::per_head_of(kv.n_layer, kv.n_head_kv, |layer, head| {
            kv.knorm(layer, head).unwrap_or_default().iter().map(|n| 1.0 / (n + 1e-6)).collect()
        }))
    }
}
