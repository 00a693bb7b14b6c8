//! `csp`: Cross-Self Pruning (Pei et al., arXiv 2412.04652; released code `TerryPei/CSP`,
//! `New_LayerWise.__call__`, methods §1), as released.
//!
//! Once, at prefill, per layer and KV head: n-softmax (n = 1) probabilities of the last O prompt
//! queries (O = the recent size, B/2) over the keys before the recent window, summed per key
//! separately for queries of the key's own modality (self: text→text, image→image) and of the
//! other modality (cross). Keep `top_k(self, k_self) ∪ top_k(cross, k_cross) ∪ recent R` with
//! `k_cross = ⌊cross_ratio·k⌋`, `k_self = ⌊(1−cross_ratio)·k⌋`, `k = B − R`. Nothing is evicted
//! while decoding, and a prompt without images is left alone (the reference skips it).
//!
//! Shapes: statistics `[query modality][layer][kv head][L]`; the n-softmax normaliser covers
//! all L keys of each row; `cross_ratio = 0` gives `k_cross = 0, k_self = k` (the reference
//! hard-codes `1, 308` there, taken from one sample).
//!
//! Bounded prefill (`--kv-max-cells`): the same selection runs on what the cache holds before
//! each chunk that would not fit, over the last O tokens read so far; when the cache holds no
//! image token yet, all of `k` goes to self scores.
//!
//! Deviation, documented: the reference *concatenates* the two top-k lists, so a token chosen
//! by both is stored twice (its attention weight doubles at decode). A KV cell cannot be
//! duplicated; we keep the de-duplicated union, and the global vote fills the budget.

use serde::{Deserialize, Serialize};

use super::{need_stats, select, Budget, Build, Input, Pick, Policy, PolicyParams, Split};
use crate::error::{Error, Result};
use crate::stats::{Bucket, Rows, StatRequest};
use crate::span::Modality;

/// Cross-Self Pruning, and its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Csp {
    /// Share of the selected budget for cross-modal attention.
    pub cross_ratio: f64,
    /// n of the n-softmax.
    pub n: f32,
}

impl Default for Csp {
    fn default() -> Self {
        Self { cross_ratio: 0.5, n: 1.0 }
    }
}

impl PolicyParams for Csp {
    fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.cross_ratio) {
            return Err(Error::Config { field: "csp.cross_ratio", reason: format!("{} is outside [0, 1]", self.cross_ratio) });
        }
        if !(self.n >= 0.0 && self.n.is_finite()) {
            return Err(Error::Config { field: "csp.n", reason: format!("{} must be ≥ 0 (0 = plain softmax)", self.n) });
        }
        Ok(())
    }
}

/// The released per-dataset settings (`configs/7b.yaml`): (MileBench dataset, cross_ratio,
/// recent_bias). The paper swaps the biases of EgocentricNavigation and SlideVQA; the config
/// is what produced the numbers.
pub const CSP_PRESETS: &[(&str, f64, f64)] = &[
    ("ALFRED", 0.5, 1.0),
    ("ActionLocalization", 0.1, 1.0),
    ("ActionPrediction", 0.0, 1.0),
    ("ActionSequence", 0.1, 1.0),
    ("CLEVR-Change", 0.1, 1.0),
    ("CharacterOrder", 0.5, 1.0),
    ("CounterfactualInference", 0.1, 1.0),
    ("DocVQA", 0.1, 1.0),
    ("EgocentricNavigation", 0.5, 1.5),
    ("GPR1200", 0.5, 1.0),
    ("IEdit", 0.5, 1.0),
    ("ImageNeedleInAHaystack", 0.5, 1.0),
    ("MMCoQA", 0.5, 1.0),
    ("MovingAttribute", 0.5, 1.0),
    ("MovingDirection", 0.5, 1.0),
    ("MultiModalQA", 0.9, 1.0),
    ("OCR-VQA", 0.5, 1.0),
    ("ObjectExistence", 0.5, 1.0),
    ("ObjectInteraction", 0.5, 1.0),
    ("ObjectShuffle", 0.5, 1.0),
    ("SceneTransition", 0.1, 1.0),
    ("SlideVQA", 0.5, 0.5),
    ("Spot-the-Diff", 0.9, 1.0),
    ("StateChange", 0.5, 1.0),
    ("TQA", 0.5, 1.0),
    ("TextNeedleInAHaystack", 0.5, 1.0),
    ("WebQA", 0.9, 1.0),
    ("WikiVQA", 0.5, 1.0),
    ("nuscenes", 0.5, 1.0),
];

/// Looks up a preset by name (case-insensitive): `(cross_ratio, recent_bias)`.
#[must_use]
pub fn preset(name: &str) -> Option<(f64, f64)> {
    CSP_PRESETS.iter().find(|(n, _, _)| n.eq_ignore_ascii_case(name)).map(|&(_, c, r)| (c, r))
}

impl Build for Csp {
    type Params = Self;
    fn build(params: &Self, _: Budget) -> Result<Self> {
        Ok(*params)
    }
}

impl Csp {
    /// `(k_self, k_cross)` for a selection budget `k`.
    #[must_use]
    pub fn split_k(&self, k: usize) -> (usize, usize) {
        let k_cross = (k as f64 * self.cross_ratio).floor() as usize;
        let k_self = (k as f64 * (1.0 - self.cross_ratio)).floor() as usize;
        (k_self, k_cross)
    }
}

impl Policy for Csp {
    fn name(&self) -> &'static str {
        "csp"
    }

    fn protects_sinks(&self) -> bool {
        true
    }

    fn request(&self, split: &Split, obs_window: Option<usize>) -> Option<StatRequest> {
        let o = obs_window.unwrap_or(split.recent).max(1);
        Some(StatRequest { rows: Rows::Last(o), n: self.n })
    }

    fn applies(&self, modality: &[Modality]) -> bool {
        modality.iter().any(|m| *m != Modality::Text)
    }

    /// Per (layer, KV head): the self top-k, then the cross top-k not already kept.
    fn pick(&self, input: &Input<'_>) -> Result<Vec<Pick>> {
        let stats = need_stats(input, "csp")?;
        let split = input.split;
        // no media (a text-only stretch of a bounded prefill): self scores only
        let text_only = input.modality.iter().all(|m| *m == Modality::Text);
        let (k_self, k_cross) = if text_only { (split.k, 0) } else { self.split_k(split.k) };
        let is_text: Vec<bool> = input.modality.iter().map(|m| *m == Modality::Text).collect();
        let mut out = Vec::with_capacity(stats.n_layer * stats.n_head_kv);
        let mut mark = vec![false; split.l];
        for layer in 0..stats.n_layer {
            for head in 0..stats.n_head_kv {
                let from_text = stats.column(Bucket::Text, layer, head);
                let from_media = stats.column(Bucket::Media, layer, head);
                let (mut s_self, mut s_cross) = (vec![0f32; split.l], vec![0f32; split.l]);
                for j in 0..split.l {
                    let (same, other) = if is_text[j] { (from_text[j], from_media[j]) } else { (from_media[j], from_text[j]) };
                    s_self[j] = same;
                    s_cross[j] = other;
                }
                let mut keep = select::top_k(&s_self, split.candidates(), k_self);
                mark.iter_mut().for_each(|m| *m = false);
                keep.iter().for_each(|&t| mark[t] = true);
                keep.extend(select::top_k(&s_cross, split.candidates(), k_cross).into_iter().filter(|&t| !mark[t]));
                let score = s_self.iter().zip(&s_cross).map(|(a, b)| a + b).collect();
                out.push(Pick { layer: Some(layer), head: Some(head), score, keep: Some(keep) });
            }
        }
        Ok(out)
    }
}
