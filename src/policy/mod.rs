//! KV-cache eviction policies ("presses" in kvpress terms) and what they share.
//!
//! A policy turns attention statistics (or none) into, for every (layer, KV head) — or every
//! layer, for PrefixKV and AirCache — the prompt tokens it would keep: the reference
//! implementations select per head or per layer. From the policy's side it is a small
//! [`Policy`]: what it needs observed ([`Policy::request`]), how a budget becomes cells
//! ([`Policy::split`], the one place — [`budget`]), and its [`Pick`]s: scores or keep-sets of its
//! own, never the recent window. The rest is shared ([`select`]): the top-k of scores, the
//! recent window, the vote, the masks.
//!
//! llama.cpp has one set of cells for all layers and heads; [`Granularity`] says how the
//! choices are honoured:
//!
//! * `global`: one keep-set by vote — a token's rank is the number of choices keeping it, ties
//!   broken by its summed score, then by position ([`select::vote`]). Exactly `B` cells.
//! * `layer`: each layer keeps its own set (its heads' choices voted down to the layer's
//!   budget); `head`: each (layer, KV head) keeps its own choice, as the references do. The
//!   cells no layer or head keeps are removed; the rest of what a layer or head drops is masked
//!   in its attention only (our llama.cpp patch `0003`), so the physical cache is the union of
//!   the sets and may exceed `B` ([`Retention::per_head`]).
//!
//! Budget `B` has one meaning for every policy: it counts everything kept — sinks, the recent
//! window and selected tokens ([`Split`]).
//!
//! | policy | file | needs attention | parameters |
//! |---|---|---|---|
//! | `full` | `full.rs` | no (never prunes) | — |
//! | `csp` | `csp.rs` | last O queries, n-softmax, by query modality | [`Csp`] |
//! | `h2o` | `h2o.rs` | all prompt queries | — |
//! | `lookm` | `lookm.rs` | all prompt queries; merges evicted K/V into kept rows | [`LookM`] |
//! | `snapkv` | `snapkv.rs` | last W queries | [`SnapKv`] |
//! | `prefixkv` | `prefixkv/` | all prompt queries, head mean; per layer | [`PrefixKvParams`] |
//! | `aircache` | `aircache.rs` | elite text queries of the final ubatch; per layer | [`AirCache`] |
//! | `streaming` | `streaming.rs` | no | [`Streaming`] |
//! | `knorm` | `knorm.rs` | no: key norms of the cache | [`KNorm`] |
//! | `vnorm` | `vnorm.rs` | no: value norms of the cache | [`VNorm`] |
//! | `keydiff` | `keydiff.rs` | no: keys' cosine with the mean key | [`KeyDiff`] |
//! | `expected` | `expected.rs` | no attention: moments of the prompt's queries (in the graph) | [`Expected`] |
//! | `random` | `random.rs` | no | [`Random`] |
//!
//! Adding one: its file, and one line in the table of [`registry`].

pub mod aircache;
pub mod budget;
mod csp;
pub mod expected;
mod full;
mod h2o;
mod keydiff;
mod knorm;
pub mod lookm;
pub mod prefixkv;
pub mod protect;
mod random;
pub mod registry;
mod retention;
pub mod select;
mod snapkv;
mod streaming;
mod vnorm;

use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;

pub use aircache::AirCache;
pub use budget::{Budget, Granularity, Split, Target};
pub use csp::{preset as csp_preset, Csp, CSP_PRESETS};
pub use expected::Expected;
pub use full::Full;
pub use h2o::H2o;
pub use keydiff::KeyDiff;
pub use knorm::KNorm;
pub use lookm::LookM;
pub use prefixkv::{PrefixKv, PrefixKvParams, Profile};
pub use protect::Protect;
pub use random::Random;
pub use registry::{Params, PolicyConfig, PolicyKind, PolicySpec};
pub use retention::{HeadChoice, HeadKeep, Retention};
pub use select::{retain, Choose};
pub use snapkv::SnapKv;
pub use streaming::Streaming;
pub use vnorm::VNorm;

use crate::error::{Error, Result};
use crate::stats::{AttentionStats, KvRequest, KvStats, StatRequest};
use crate::span::Modality;

/// What a policy sees when it selects.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// Modality of each prompt token.
    pub modality: &'a [Modality],
    /// The resolved budget.
    pub split: Split,
    /// Attention statistics, when the policy asked for them.
    pub stats: Option<&'a AttentionStats>,
    /// Protected sink tokens ([`Policy::protects_sinks`] policies only).
    pub protect: Protect,
    /// Statistics of the cached keys and values, when the policy asked for them
    /// ([`Policy::kv_request`]).
    pub kv: Option<&'a KvStats>,
}

/// A policy's decision for one (layer, KV head), one layer (`head: None`) or the whole model
/// (`layer: None`), before the shared selection completes it ([`Choose`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Pick {
    /// The layer; `None`: every layer.
    pub layer: Option<usize>,
    /// The KV head; `None`: every head of the layer.
    pub head: Option<usize>,
    /// A score per token (L values): ranks the candidates when `keep` is `None`, breaks vote
    /// ties (summed over picks), and is dumped.
    pub score: Vec<f32>,
    /// The tokens the policy chose itself (no duplicates, none in the recent window); `None`:
    /// the `k` best candidates by `score`.
    pub keep: Option<Vec<usize>>,
}

impl Pick {
    /// One pick per (layer, KV head) of `stats`, ranked by `score(layer, head)` (H2O, SnapKV).
    pub fn per_head(stats: &AttentionStats, score: impl Fn(usize, usize) -> Vec<f32>) -> Vec<Self> {
        Self::per_head_of(stats.n_layer, stats.n_head_kv, score)
    }

    /// One pick per (layer, KV head) of `n_layer × n_head_kv`, ranked by `score(layer, head)`.
    pub fn per_head_of(n_layer: usize, n_head_kv: usize, score: impl Fn(usize, usize) -> Vec<f32>) -> Vec<Self> {
        let mut out = Vec::with_capacity(n_layer * n_head_kv);
        for layer in 0..n_layer {
            for head in 0..n_head_kv {
                out.push(Self { layer: Some(layer), head: Some(head), score: score(layer, head), keep: None });
            }
        }
        out
    }
}

/// An eviction policy. [`registry`] builds one from a [`PolicyConfig`]; [`retain`] runs it.
pub trait Policy: fmt::Debug + Send + Sync {
    /// Registry name.
    fn name(&self) -> &'static str;

    /// Attention statistics to gather during the prefill of a prompt with this budget; `None`
    /// for none (flash attention stays available).
    fn request(&self, _split: &Split, _obs_window: Option<usize>) -> Option<StatRequest> {
        None
    }

    /// Statistics of the cached keys and values to compute before selecting (after the prefill,
    /// or at each eviction of a bounded prefill); `None` for none. They need no attention.
    fn kv_request(&self) -> Option<KvRequest> {
        None
    }

    /// Whether the policy prunes this prompt at the end of the prefill (CSP and AirCache, as
    /// released, leave text-only prompts alone; `full` leaves every prompt alone).
    fn applies(&self, _modality: &[Modality]) -> bool {
        true
    }

    /// Whether [`Input::protect`] applies: the window-based policies whose selection spends
    /// the whole budget by score (CSP, SnapKV, AirCache, PrefixKV). The shared selection keeps the protected
    /// tokens and hands the policy a budget `k` smaller by their number.
    fn protects_sinks(&self) -> bool {
        false
    }

    /// Tokens the policy keeps by rule in every layer (AirCache: every text token). The global
    /// vote ranks them with the recent window and the protected sinks: a token kept by rule has
    /// no score of its own, and a zero score casts no vote, so without this scored tokens would
    /// outvote them (AirCache at global granularity and under a cap dropped the prompt's text).
    fn kept_by_rule(&self, _input: &Input<'_>) -> Vec<usize> {
        Vec::new()
    }

    /// Whether the policy ever evicts — `full` does not, so a cache cap is refused with it.
    fn prunes(&self) -> bool {
        true
    }

    /// The budget resolved for a prompt (or what a bounded cache holds) with these token
    /// modalities: by default `B` of `L`, with a recent window of `recent_bias·B/2`.
    ///
    /// # Errors
    /// A budget that keeps nothing.
    fn split(&self, target: Target, modality: &[Modality], recent_bias: f64) -> Result<Split> {
        Split::new(target.budget(), modality.len(), recent_bias)
    }

    /// Whether evicted entries are merged into kept ones (LOOK-M) before they are removed, and how.
    fn merge(&self) -> Option<lookm::Merge> {
        None
    }

    /// Granularity when none is asked for.
    fn granularity(&self) -> Granularity {
        Granularity::Global
    }

    /// The policy's picks: scores or keep-sets of its own, without the recent window.
    ///
    /// # Errors
    /// Missing statistics; parameters that do not fit the model.
    fn pick(&self, input: &Input<'_>) -> Result<Vec<Pick>>;

    /// Eviction while decoding, set up from the prefill's retention (PrefixKV's fixed-point
    /// FIFO); `None` for policies that evict once.
    ///
    /// # Errors
    /// Parameters that do not fit the model.
    fn decode_eviction(&self, _input: &Input<'_>, _retention: &Retention) -> Result<Option<Box<dyn DecodeEviction>>> {
        Ok(None)
    }
}

/// A policy's parameters: defaults, (de)serialisation, range checks.
pub trait PolicyParams: Default + Serialize + DeserializeOwned {
    /// Range checks that need no prompt.
    ///
    /// # Errors
    /// [`Error::Config`] naming the parameter by its path (`csp.cross_ratio`, …).
    fn validate(&self) -> Result<()> {
        Ok(())
    }
}

/// No parameters.
impl PolicyParams for () {}

/// How [`registry`] makes a policy: from its parameters and the budget.
pub trait Build: Policy + Sized {
    /// Its parameters (`()` for none), held in the [`Params`] field named as the policy.
    type Params: PolicyParams;

    /// The policy for `budget` (PrefixKV's profile is per budget; the others ignore it).
    ///
    /// # Errors
    /// Parameters that do not fit the budget.
    fn build(params: &Self::Params, budget: Budget) -> Result<Self>;
}

/// Eviction while decoding: after each decoded token, the entries some layer stops attending to.
pub trait DecodeEviction: fmt::Debug + Send + Sync {
    /// Renames the entries — prompt token indices (or a bounded view's) when it is made — to
    /// the positions the cache holds them at.
    fn remap(&mut self, to_pos: &dyn Fn(usize) -> usize);

    /// A token at position `pos` was decoded into every layer: the (layer, position) pairs
    /// dropped after it.
    fn step(&mut self, pos: usize) -> Vec<(usize, usize)>;
}

/// The cache statistics a policy asked for, or an error naming it.
pub(crate) fn need_kv<'a>(input: &Input<'a>, name: &str) -> Result<&'a KvStats> {
    input.kv.ok_or_else(|| Error::Config { field: "policy", reason: format!("{name} needs statistics of the cached keys and values") })
}

/// The statistics a policy asked for, or an error naming it.
pub(crate) fn need_stats<'a>(input: &Input<'a>, name: &str) -> Result<&'a AttentionStats> {
    input.stats.ok_or_else(|| Error::Config { field: "policy", reason: format!("{name} needs attention statistics from the prefill") })
}

#[cfg(test)]
mod tests;
