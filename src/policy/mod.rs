//! KV-cache eviction policies ("presses" in kvpress terms) and what they share.
//!
//! A policy turns attention statistics (or none) into, for every (layer, KV head) — or every
//! layer, for PrefixKV and AirCache — the prompt tokens it would keep: the reference
//! implementations select per head or per layer. llama.cpp has one set of cells for all layers
//! and heads; [`Granularity`] says how the choices are honoured:
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
//! | policy | file | needs attention |
//! |---|---|---|
//! | `full` | `full.rs` | no (never prunes) |
//! | `csp` | `csp.rs` | last O queries, n-softmax, by query modality |
//! | `h2o` | `h2o.rs` | all prompt queries |
//! | `snapkv` | `snapkv.rs` | last W queries |
//! | `prefixkv` | `prefixkv.rs` | all prompt queries, head mean; per layer |
//! | `aircache` | `aircache.rs` | elite text queries of the final ubatch; per layer |
//! | `streaming` | `streaming.rs` | no |
//! | `random` | `random.rs` | no |

pub mod aircache;
mod csp;
mod full;
mod h2o;
pub mod prefixkv;
mod random;
pub mod select;
mod snapkv;
mod streaming;

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

pub use csp::{preset as csp_preset, Csp, CSP_PRESETS};
pub use full::Full;
pub use aircache::AirCache;
pub use h2o::H2o;
pub use prefixkv::{PrefixKv, Profile};
pub use random::Random;
pub use snapkv::SnapKv;
pub use streaming::Streaming;

use crate::error::{Error, Result};
use crate::observe::{AttentionStats, StatRequest};
use crate::span::Modality;

/// The registry of policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    /// No pruning.
    #[default]
    Full,
    /// Cross-Self Pruning.
    Csp,
    /// Heavy-Hitter Oracle (prefill-only).
    H2o,
    /// SnapKV.
    SnapKv,
    /// StreamingLLM: attention sinks + recent window.
    Streaming,
    /// Seeded random selection + recent window.
    Random,
    /// PrefixKV: per-layer budgets from an offline profile, fixed-point eviction at decode.
    PrefixKv,
    /// AirCache: elite observation window, visual tokens only, per-layer budgets.
    AirCache,
}

impl PolicyKind {
    /// All policies, in CLI order.
    pub const ALL: [PolicyKind; 8] = [
        PolicyKind::Full,
        PolicyKind::Csp,
        PolicyKind::H2o,
        PolicyKind::SnapKv,
        PolicyKind::PrefixKv,
        PolicyKind::AirCache,
        PolicyKind::Streaming,
        PolicyKind::Random,
    ];

    /// CLI / JSON name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Full => "full",
            PolicyKind::Csp => "csp",
            PolicyKind::H2o => "h2o",
            PolicyKind::SnapKv => "snapkv",
            PolicyKind::Streaming => "streaming",
            PolicyKind::Random => "random",
            PolicyKind::PrefixKv => "prefixkv",
            PolicyKind::AirCache => "aircache",
        }
    }

    /// Builds the policy.
    #[must_use]
    pub fn build(self, cfg: &PolicyConfig) -> Box<dyn Policy> {
        match self {
            PolicyKind::Full => Box::new(Full),
            PolicyKind::Csp => Box::new(Csp { cross_ratio: cfg.cross_ratio, n: cfg.csp_n }),
            PolicyKind::H2o => Box::new(H2o),
            PolicyKind::SnapKv => Box::new(SnapKv::default()),
            PolicyKind::Streaming => Box::new(Streaming::default()),
            PolicyKind::Random => Box::new(Random { seed: cfg.seed }),
            PolicyKind::PrefixKv => Box::new(PrefixKv {
                forget: cfg.prefixkv_profile.as_ref().and_then(|p| p.layers_for(cfg.budget).ok()).map(<[f64]>::to_vec),
            }),
            PolicyKind::AirCache => Box::new(AirCache { alpha: cfg.aircache_alpha, keep_sink: cfg.aircache_keep_sink, r_min: cfg.aircache_r_min }),
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        PolicyKind::ALL.into_iter().find(|p| p.name().eq_ignore_ascii_case(s)).ok_or_else(|| {
            let names: Vec<_> = PolicyKind::ALL.iter().map(|p| p.name()).collect();
            format!("unknown policy '{s}' (one of {})", names.join(", "))
        })
    }
}

/// A policy with an optional granularity: `csp`, `csp@head`, `h2o@layer` (bench and eval
/// lists compare granularities side by side).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PolicySpec {
    /// The policy.
    pub kind: PolicyKind,
    /// Its granularity; `None` = `--kv-granularity` or the policy's own.
    pub granularity: Option<Granularity>,
}

impl From<PolicyKind> for PolicySpec {
    fn from(kind: PolicyKind) -> Self {
        Self { kind, granularity: None }
    }
}

impl fmt::Display for PolicySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.granularity {
            Some(g) => write!(f, "{}@{g}", self.kind),
            None => write!(f, "{}", self.kind),
        }
    }
}

impl FromStr for PolicySpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('@') {
            Some((k, g)) => Ok(Self { kind: k.parse()?, granularity: Some(g.parse()?) }),
            None => Ok(Self { kind: s.parse()?, granularity: None }),
        }
    }
}

impl PolicySpec {
    /// `base` with this policy (and granularity, when given).
    #[must_use]
    pub fn config(&self, base: &PolicyConfig, budget: Budget) -> PolicyConfig {
        PolicyConfig { kind: self.kind, budget, granularity: self.granularity.or(base.granularity), ..base.clone() }
    }
}

/// `--kv-budget`: a fraction of the prompt or a number of cells.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Budget {
    /// `0 < b ≤ 1`: keep floor(b·L) of the L prompt tokens (written with a decimal point).
    Fraction(f64),
    /// Keep this many cells (a bare integer).
    Cells(usize),
}

impl Default for Budget {
    fn default() -> Self {
        Budget::Fraction(0.2)
    }
}

impl FromStr for Budget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.contains('.') || s.contains(['e', 'E']) {
            let b: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
            if !(b > 0.0 && b <= 1.0) {
                return Err(format!("fraction {s} is outside (0, 1]; write a cell count without a decimal point"));
            }
            Ok(Budget::Fraction(b))
        } else {
            let n: usize = s.parse().map_err(|_| format!("'{s}' is neither a fraction (0.2) nor a cell count (512)"))?;
            if n == 0 {
                return Err("a budget of 0 cells keeps nothing".into());
            }
            Ok(Budget::Cells(n))
        }
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // keep the decimal point: "1" would read back as one cell
            Budget::Fraction(b) if b.fract() == 0.0 => write!(f, "{b:.1}"),
            Budget::Fraction(b) => write!(f, "{b}"),
            Budget::Cells(n) => write!(f, "{n}"),
        }
    }
}

/// `--kv-granularity`: how per-layer / per-head choices become a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    /// One keep-set for the whole model (physical budget B).
    Global,
    /// One keep-set per layer (B per layer; physical cells = the union).
    Layer,
    /// One keep-set per (layer, KV head), as the references (B per head; physical = union).
    Head,
}

impl Granularity {
    /// CLI / JSON name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Granularity::Global => "global",
            Granularity::Layer => "layer",
            Granularity::Head => "head",
        }
    }
}

impl fmt::Display for Granularity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Granularity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [Granularity::Global, Granularity::Layer, Granularity::Head]
            .into_iter()
            .find(|g| g.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown granularity '{s}' (one of global, layer, head)"))
    }
}

/// Pruning settings (CLI: `--kv-policy`, `--kv-budget`, `--csp-*`, `--obs-window`, …).
#[derive(Debug, Clone, Serialize)]
pub struct PolicyConfig {
    /// The policy.
    pub kind: PolicyKind,
    /// Budget (default 0.2 of the prompt).
    pub budget: Budget,
    /// CSP: share of the selected budget given to cross-modal attention (default 0.5).
    pub cross_ratio: f64,
    /// Recent window = recent·recent_bias, recent = B/2 (default 1).
    pub recent_bias: f64,
    /// CSP: n of the n-softmax used for scoring (default 1).
    pub csp_n: f32,
    /// Observation window (query rows); policy default when `None`.
    pub obs_window: Option<usize>,
    /// Seed of the `random` policy.
    pub seed: u64,
    /// Move the pruned cache into a context sized to the kept cells plus generation room.
    pub shrink: bool,
    /// `--kv-granularity`; `None` = the policy's own (global, or layer for PrefixKV/AirCache).
    pub granularity: Option<Granularity>,
    /// CSP: n-softmax at decode too (a sink logit ln n per head in every layer; paper Eq. 7).
    pub decode_sink: bool,
    /// PrefixKV: per-layer retention profile from `csp-llava calibrate` (uniform if none).
    #[serde(skip)]
    pub prefixkv_profile: Option<Profile>,
    /// AirCache: elite threshold α (0.9).
    pub aircache_alpha: f64,
    /// AirCache: let the first prompt token (the attention sink) be elite.
    pub aircache_keep_sink: bool,
    /// AirCache: lowest per-layer visual retention (fraction of the budget r, 0.1).
    pub aircache_r_min: f64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            kind: PolicyKind::Full,
            budget: Budget::default(),
            cross_ratio: 0.5,
            recent_bias: 1.0,
            csp_n: 1.0,
            obs_window: None,
            seed: 0,
            shrink: false,
            granularity: None,
            decode_sink: false,
            prefixkv_profile: None,
            aircache_alpha: 0.9,
            aircache_keep_sink: false,
            aircache_r_min: 0.1,
        }
    }
}

impl PolicyConfig {
    /// Range checks that need no prompt.
    ///
    /// # Errors
    /// [`Error::Config`] naming the flag.
    pub fn validate(&self) -> Result<()> {
        let err = |field, reason: String| Err(Error::Config { field, reason });
        if !(0.0..=1.0).contains(&self.cross_ratio) {
            return err("--csp-cross-ratio", format!("{} is outside [0, 1]", self.cross_ratio));
        }
        if !(self.recent_bias > 0.0 && self.recent_bias.is_finite()) {
            return err("--csp-recent-bias", format!("{} must be positive (the last prompt token is always kept)", self.recent_bias));
        }
        if !(self.csp_n >= 0.0 && self.csp_n.is_finite()) {
            return err("--csp-n", format!("{} must be ≥ 0 (0 = plain softmax)", self.csp_n));
        }
        if self.obs_window == Some(0) {
            return err("--obs-window", "must be at least 1 query".into());
        }
        if !(self.aircache_alpha > 0.0 && self.aircache_alpha <= 1.0) {
            return err("--aircache-alpha", format!("{} is outside (0, 1]", self.aircache_alpha));
        }
        if !(0.0..=1.0).contains(&self.aircache_r_min) {
            return err("--aircache-r-min", format!("{} is outside [0, 1]", self.aircache_r_min));
        }
        if self.decode_sink && self.kind != PolicyKind::Csp {
            return err("--csp-decode-sink", format!("applies to --kv-policy csp, not {}", self.kind));
        }
        if let (Some(p), PolicyKind::PrefixKv) = (&self.prefixkv_profile, self.kind) {
            p.layers_for(self.budget)?;
        }
        Ok(())
    }

    /// Resolves the budget for a prompt of `l` tokens.
    ///
    /// # Errors
    /// A budget that keeps no cell.
    pub fn split(&self, l: usize) -> Result<Split> {
        Split::new(self.budget, l, self.recent_bias)
    }
}

/// The budget resolved for one prompt: `b = r + k`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Split {
    /// Prompt tokens.
    pub l: usize,
    /// Cells kept in all (min(B, L)).
    pub b: usize,
    /// B/2: the paper's recent share, and CSP's default observation window.
    pub recent: usize,
    /// Most recent tokens always kept (recent·recent_bias, at least 1, at most B).
    pub r: usize,
    /// Tokens selected by score: b − r.
    pub k: usize,
}

impl Split {
    /// Resolves `budget` for `l` prompt tokens.
    ///
    /// # Errors
    /// [`Error::Config`] when the budget rounds to zero cells.
    pub fn new(budget: Budget, l: usize, recent_bias: f64) -> Result<Self> {
        let b = match budget {
            Budget::Fraction(f) => (f * l as f64).floor() as usize,
            Budget::Cells(n) => n,
        }
        .min(l);
        if b == 0 && l > 0 {
            return Err(Error::Config {
                field: "--kv-budget",
                reason: format!("{budget} of {l} prompt tokens keeps no cell; raise it"),
            });
        }
        let recent = b / 2;
        let r = ((recent as f64 * recent_bias).floor() as usize).clamp(1.min(b), b);
        Ok(Self { l, b, recent, r, k: b - r })
    }

    /// Whether anything is evicted.
    #[must_use]
    pub fn prunes(&self) -> bool {
        self.b < self.l
    }

    /// Candidates for selection: every token before the recent window.
    #[must_use]
    pub fn candidates(&self) -> std::ops::Range<usize> {
        0..self.l - self.r
    }

    /// The recent window.
    #[must_use]
    pub fn recent_window(&self) -> std::ops::Range<usize> {
        self.l - self.r..self.l
    }
}

/// What a policy sees when it selects.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// Modality of each prompt token.
    pub modality: &'a [Modality],
    /// The resolved budget.
    pub split: Split,
    /// Attention statistics, when the policy asked for them.
    pub stats: Option<&'a AttentionStats>,
}

/// One (layer, KV head)'s choice, one layer's (`head: None`), or the single choice of a policy
/// without statistics (`layer: None`).
#[derive(Debug, Clone, PartialEq)]
pub struct HeadChoice {
    /// The layer this choice is for; `None`: every layer.
    pub layer: Option<usize>,
    /// The KV head; `None`: every head of the layer.
    pub head: Option<usize>,
    /// Token indices kept (no duplicates; at most B, except per-layer budgets that average B).
    pub keep: Vec<usize>,
    /// A score per token (L values), summed across heads to break vote ties; also dumped.
    pub score: Vec<f32>,
}

/// An eviction policy.
pub trait Policy: fmt::Debug + Send + Sync {
    /// Registry name.
    fn name(&self) -> &'static str;

    /// Attention statistics to gather during prefill; `None` for none.
    fn request(&self, split: &Split, obs_window: Option<usize>) -> Option<StatRequest>;

    /// Whether the policy prunes this prompt at all (CSP, as released, leaves text-only
    /// prompts alone).
    fn applies(&self, _modality: &[Modality]) -> bool {
        true
    }

    /// The budget for a prompt with these token modalities (`B` of `L` by default).
    ///
    /// # Errors
    /// A budget that keeps nothing.
    fn budget_split(&self, cfg: &PolicyConfig, modality: &[Modality]) -> Result<Split> {
        cfg.split(modality.len())
    }

    /// Granularity when `--kv-granularity` is not given.
    fn natural_granularity(&self) -> Granularity {
        Granularity::Global
    }

    /// Eviction while decoding, set up from the prefill's retention (PrefixKV's fixed-point
    /// FIFO); `None` for policies that evict once.
    fn decode_eviction(&self, _input: &Input<'_>, _retention: &Retention) -> Option<prefixkv::FixedPoint> {
        None
    }

    /// The per-head (or single) choices.
    ///
    /// # Errors
    /// Missing statistics.
    fn choose(&self, input: &Input<'_>) -> Result<Vec<HeadChoice>>;
}

/// The final retention of a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Retention {
    /// Per prompt token: kept in the cache (at `layer`/`head` granularity: by some layer or
    /// head — the union).
    pub keep: Vec<bool>,
    /// Number of choices keeping each token.
    pub votes: Vec<u32>,
    /// Score summed over choices.
    pub score: Vec<f32>,
    /// The granularity applied.
    pub granularity: Granularity,
    /// What each (layer, KV head) attends to, at `layer`/`head` granularity.
    pub per_head: Option<HeadKeep>,
}

impl Retention {
    /// Cells kept (physically).
    #[must_use]
    pub fn kept(&self) -> usize {
        self.keep.iter().filter(|k| **k).count()
    }

    /// Mean number of tokens a (layer, KV head) attends to.
    #[must_use]
    pub fn effective(&self) -> f64 {
        self.per_head.as_ref().map_or(self.kept() as f64, HeadKeep::mean_kept)
    }

    /// A retention decided over a subset of the prompt — `tokens[i]` is the prompt index of the
    /// subset's token `i` — as one over all `l` prompt tokens (the others neither kept nor voted).
    #[must_use]
    pub fn expand(&self, tokens: &[usize], l: usize) -> Self {
        let spread = |n: usize| -> Vec<usize> { tokens[..n.min(tokens.len())].to_vec() };
        let mut keep = vec![false; l];
        let mut votes = vec![0; l];
        let mut score = vec![0.0; l];
        for (i, &t) in spread(self.keep.len()).iter().enumerate() {
            keep[t] = self.keep[i];
            votes[t] = self.votes[i];
            score[t] = self.score[i];
        }
        let per_head = self.per_head.as_ref().map(|h| {
            let mut out = HeadKeep::new(h.n_layer, h.n_head_kv, l);
            for layer in 0..h.n_layer {
                for head in 0..h.n_head_kv {
                    let (src, dst) = (h.get(layer, head), out.get_mut(layer, head));
                    for (i, &t) in tokens.iter().enumerate().take(h.l) {
                        dst[t] = src[i];
                    }
                }
            }
            out
        });
        Self { keep, votes, score, granularity: self.granularity, per_head }
    }
}

/// Per-(layer, KV head) keep flags `[layer][head][token]`.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadKeep {
    /// Layers.
    pub n_layer: usize,
    /// KV heads.
    pub n_head_kv: usize,
    /// Prompt tokens.
    pub l: usize,
    data: Vec<bool>,
}

impl HeadKeep {
    /// Nothing kept.
    #[must_use]
    pub fn new(n_layer: usize, n_head_kv: usize, l: usize) -> Self {
        Self { n_layer, n_head_kv, l, data: vec![false; n_layer * n_head_kv * l] }
    }

    /// What (layer, head) keeps.
    #[must_use]
    pub fn get(&self, layer: usize, head: usize) -> &[bool] {
        let o = (layer * self.n_head_kv + head) * self.l;
        &self.data[o..o + self.l]
    }

    fn get_mut(&mut self, layer: usize, head: usize) -> &mut [bool] {
        let o = (layer * self.n_head_kv + head) * self.l;
        &mut self.data[o..o + self.l]
    }

    /// Marks token `t` kept by every layer and head.
    pub fn keep_everywhere(&mut self, t: usize) {
        if t < self.l {
            for c in self.data.chunks_mut(self.l) {
                c[t] = true;
            }
        }
    }

    /// Mean kept per (layer, head).
    #[must_use]
    pub fn mean_kept(&self) -> f64 {
        let n = (self.n_layer * self.n_head_kv).max(1);
        self.data.iter().filter(|k| **k).count() as f64 / n as f64
    }

    /// Tokens some layer or head keeps.
    #[must_use]
    pub fn union(&self) -> Vec<bool> {
        let mut u = vec![false; self.l];
        for c in self.data.chunks(self.l.max(1)) {
            for (a, &b) in u.iter_mut().zip(c) {
                *a |= b;
            }
        }
        u
    }
}

/// Runs a policy and turns its choices into a retention at `granularity` (the policy's own
/// when `None`). At `global`: exactly `min(B, L)` tokens by vote.
///
/// # Errors
/// Policy errors (missing statistics).
pub fn retain(policy: &dyn Policy, input: &Input<'_>, granularity: Option<Granularity>) -> Result<Retention> {
    let choices = policy.choose(input)?;
    let g = granularity.unwrap_or_else(|| policy.natural_granularity());
    let (l, b) = (input.split.l, input.split.b);
    let mut global = select::vote(&choices, l, b);
    let per_layer = choices.iter().any(|c| c.layer.is_some());
    if g == Granularity::Global || !per_layer {
        global.granularity = Granularity::Global;
        return Ok(global);
    }
    let n_layer = choices.iter().filter_map(|c| c.layer).max().map_or(0, |m| m + 1);
    let n_head_kv = input
        .stats
        .map(|s| s.n_head_kv)
        .or_else(|| choices.iter().filter_map(|c| c.head).max().map(|m| m + 1))
        .unwrap_or(1);
    let mut heads = HeadKeep::new(n_layer, n_head_kv, l);
    for layer in 0..n_layer {
        let mine: Vec<&HeadChoice> = choices.iter().filter(|c| c.layer == Some(layer)).collect();
        let per_head = mine.iter().any(|c| c.head.is_some());
        if g == Granularity::Head && per_head {
            for c in &mine {
                let keep = heads.get_mut(layer, c.head.unwrap_or(0));
                c.keep.iter().filter(|&&t| t < l).for_each(|&t| keep[t] = true);
            }
        } else {
            // one set for the layer: its heads voted down to the budget, or the layer's choice
            let set = if per_head {
                let owned: Vec<HeadChoice> = mine.iter().map(|c| (*c).clone()).collect();
                select::vote(&owned, l, b).keep
            } else {
                let mut k = vec![false; l];
                mine.iter().flat_map(|c| &c.keep).filter(|&&t| t < l).for_each(|&t| k[t] = true);
                k
            };
            for head in 0..n_head_kv {
                heads.get_mut(layer, head).copy_from_slice(&set);
            }
        }
    }
    Ok(Retention { keep: heads.union(), votes: global.votes, score: global.score, granularity: g, per_head: Some(heads) })
}

/// Errors for policies that need statistics and got none.
pub(crate) fn need_stats<'a>(input: &Input<'a>, name: &str) -> Result<&'a AttentionStats> {
    input.stats.ok_or_else(|| Error::Config {
        field: "--kv-policy",
        reason: format!("{name} needs attention statistics from the prefill"),
    })
}

/// Per-(layer, KV head) choices from one score vector each, plus the recent window: the shape
/// of H2O and SnapKV.
pub(crate) fn per_head(stats: &AttentionStats, split: &Split, score: impl Fn(usize, usize) -> Vec<f32>) -> Vec<HeadChoice> {
    let mut out = Vec::with_capacity(stats.n_layer * stats.n_head_kv);
    for layer in 0..stats.n_layer {
        for head in 0..stats.n_head_kv {
            let s = score(layer, head);
            let mut keep = select::top_k(&s, split.candidates(), split.k);
            keep.extend(split.recent_window());
            out.push(HeadChoice { layer: Some(layer), head: Some(head), keep, score: s });
        }
    }
    out
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn budget_parsing() {
        assert_eq!("0.2".parse::<Budget>().unwrap(), Budget::Fraction(0.2));
        assert_eq!("1.0".parse::<Budget>().unwrap(), Budget::Fraction(1.0));
        assert_eq!("512".parse::<Budget>().unwrap(), Budget::Cells(512));
        for b in ["0.2", "1.0", "0.05", "512"] {
            assert_eq!(b.parse::<Budget>().unwrap().to_string(), b, "display round-trips");
        }
        for bad in ["0", "0.0", "1.5", "-0.1", "x", "-3"] {
            assert!(bad.parse::<Budget>().is_err(), "{bad}");
        }
    }

    #[test]
    fn split_follows_the_paper() {
        let s = Split::new(Budget::Fraction(0.2), 1000, 1.0).unwrap();
        assert_eq!((s.b, s.recent, s.r, s.k), (200, 100, 100, 100));
        let s = Split::new(Budget::Fraction(0.2), 1000, 1.5).unwrap();
        assert_eq!((s.b, s.r, s.k), (200, 150, 50));
        let s = Split::new(Budget::Cells(10), 1000, 5.0).unwrap();
        assert_eq!((s.b, s.r, s.k), (10, 10, 0), "R is capped at B");
        let s = Split::new(Budget::Cells(1), 1000, 1.0).unwrap();
        assert_eq!((s.b, s.r, s.k), (1, 1, 0), "the last token is always kept");
        let s = Split::new(Budget::Cells(5000), 1000, 1.0).unwrap();
        assert!(!s.prunes());
        assert!(Split::new(Budget::Fraction(0.001), 100, 1.0).is_err());
    }

    #[test]
    fn config_ranges() {
        assert!(PolicyConfig::default().validate().is_ok());
        assert!(PolicyConfig { cross_ratio: 1.2, ..Default::default() }.validate().is_err());
        assert!(PolicyConfig { recent_bias: 0.0, ..Default::default() }.validate().is_err());
        assert!(PolicyConfig { csp_n: -1.0, ..Default::default() }.validate().is_err());
        assert!(PolicyConfig { obs_window: Some(0), ..Default::default() }.validate().is_err());
    }
}
