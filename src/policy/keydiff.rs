//! `keydiff`: KeyDiff (Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for
//! Long-Context LLM Inference in Resource-Constrained Environments", arXiv 2504.15364; kvpress
//! `KeyDiffPress`): keys that differ most from the rest are the distinctive ones, so each KV head
//! keeps the tokens whose key is least similar to the anchor `ā`, the mean of the unit keys of
//! every cached token. No attention is observed (flash attention stays on; question-agnostic).
//!
//! Shapes: per (layer, KV head) `cos_j = k_j·ā / (‖k_j‖‖ā‖)` (patch 0009 computes it on the
//! device; [`crate::stats::keydiff_cosines`] on the host), score `1 − cos_j` (+1e-6, positive
//! for the vote), top-k over `[0, L − r)` with `r = 1` or the recent window (`recent = true`).
//! kvpress is one-shot; the paper's block-wise form (`BlockPress`) is what a bounded prefill
//! (`--kv-max-cells`) does: each eviction re-scans what the cache holds.

use serde::{Deserialize, Serialize};

use super::knorm::cache_split;
use super::{need_kv, Budget, Build, Input, Pick, Policy, PolicyParams, Split, Target};
use crate::error::Result;
use crate::span::Modality;
use crate::stats::KvRequest;

/// KeyDiff, and its parameters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeyDiff {
    /// Keep the project's recent window (B/2·recent_bias) instead of only the last token.
    pub recent: bool,
}

impl PolicyParams for KeyDiff {}

impl Build for KeyDiff {
    type Params = Self;
    fn build(params: &Self, _: Budget) -> Result<Self> {
        Ok(*params)
    }
}

impl Policy for KeyDiff {
    fn name(&self) -> &'static str {
        "keydiff"
    }
    fn kv_request(&self) -> Option<KvRequest> {
        Some(KvRequest { keydiff: true, ..KvRequest::default() })
    }
    fn protects_sinks(&self) -> bool {
        true
    }
    fn split(&self, target: Target, modality: &[Modality], recent_bias: f64) -> Result<Split> {
        cache_split(self.recent, target, modality.len(), recent_bias)
    }
    fn pick(&self, input: &Input<'_>) -> Result<Vec<Pick>> {
        let kv = need_kv(input, "keydiff")?;
        Ok(Pick::per_head_of(kv.n_layer, kv.n_head_kv, |layer, head| {
            kv.keydiff(layer, head).unwrap_or_default().iter().map(|c| (1.0 - c).max(0.0) + 1e-6).collect()
        }))
    }
}
