//! `lookm`: LOOK-M (Wan et al., "LOOK-M: Look-Once Optimization in KV Cache for Efficient
//! Multimodal Long-Context Inference", EMNLP Findings 2024, arXiv 2406.18139; released code
//! SUSTechBruce/LOOK-M, `kv_mode=text_prior_pivot_merge`, `TextPivotMerge_LayerWise`), as
//! released: a text-prior keep-set from the attention each key received over all prompt queries
//! (H2O's statistic), then every evicted token's key and value are merged into the kept token of
//! the same (layer, KV head) whose key is most similar (cosine) — on the device, by llama.cpp
//! patch 0010 (`Context::kv_merge`).
//!
//! Shapes: statistics `[layer][kv head][L]` (softmax, all prompt rows). Per (layer, KV head):
//! candidates `[0, L − r)` ranked by (text first, then score `s(j) = Σ_q A[q, j]`, then
//! position), the first `k = B − r` kept, plus the recent window `[L − r, L)`; the pick's score
//! is `s(j) + L·[text]` (a column sum is at most L, so text ranks first in the vote too).
//! Merge per (layer, KV head), for `x = k` and `x = v`, target `j` with sources `M_j`, `m = |M_j|`:
//! pivot (released default) `x'_j = (x_j + Σ_e (x_e + x_j)/2)/(1 + m)`; average (the paper's
//! Eq. 10) `x'_j = (x_j + Σ_e x_e)/(1 + m)`.
//!
//! Deviation, for a budget that means the same for every policy: where the prompt has more text
//! before the window than `k`, the reference keeps all of it (over budget); this keeps the `k`
//! best text tokens and merges the rest like images. Keys are merged post-RoPE at the kept
//! token's position, as the reference does. The merge needs V rows (flash attention on when the
//! context is made); `--lookm-merge none` keeps the text-prior selection alone.

use serde::{Deserialize, Serialize};

use super::{need_stats, Budget, Build, Input, Pick, Policy, PolicyParams, Split};
use crate::error::Result;
use crate::span::Modality;
use crate::stats::{Rows, StatRequest};

/// How evicted entries are folded into kept ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Merge {
    /// Pivotal merge: each source is averaged with its target first (the released default).
    #[default]
    Pivot,
    /// Average of the target and its sources (the paper's Eq. 10).
    Avg,
    /// No merge: the text-prior selection only.
    None,
}

/// LOOK-M, and its parameters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LookM {
    /// The merge of evicted entries.
    pub merge: Merge,
}

impl PolicyParams for LookM {}

impl Build for LookM {
    type Params = Self;
    fn build(params: &Self, _: Budget) -> Result<Self> {
        Ok(*params)
    }
}

/// The text-prior keep-set of one (layer, KV head): the first `k` candidates of `[0, end)` by
/// (text first, score descending, position ascending).
#[must_use]
pub fn text_prior(score: &[f32], modality: &[Modality], end: usize, k: usize) -> Vec<usize> {
    let mut cand: Vec<usize> = (0..end.min(score.len())).collect();
    let text = |j: usize| modality.get(j).is_some_and(|m| *m == Modality::Text);
    cand.sort_by(|&a, &b| text(b).cmp(&text(a)).then(score[b].total_cmp(&score[a])).then(a.cmp(&b)));
    cand.truncate(k);
    cand.sort_unstable();
    cand
}

impl Policy for LookM {
    fn name(&self) -> &'static str {
        "lookm"
    }
    fn request(&self, _: &Split, obs_window: Option<usize>) -> Option<StatRequest> {
        Some(StatRequest { rows: obs_window.map_or(Rows::All, Rows::Last), n: 0.0 })
    }
    fn applies(&self, modality: &[Modality]) -> bool {
        modality.iter().any(|m| *m != Modality::Text)
    }
    fn merge(&self) -> Option<Merge> {
        (self.merge != Merge::None).then_some(self.merge)
    }
    fn pick(&self, input: &Input<'_>) -> Result<Vec<Pick>> {
        let stats = need_stats(input, "lookm")?;
        let split = input.split;
        let end = split.l - split.r;
        let bonus = split.l as f32;
        let mut picks = Pick::per_head(stats, |layer, head| stats.total(layer, head));
        for p in &mut picks {
            p.keep = Some(text_prior(&p.score, input.modality, end, split.k));
            for (s, m) in p.score.iter_mut().zip(input.modality) {
                if *m == Modality::Text {
                    *s += bonus;
                }
            }
        }
        Ok(picks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::Modality::{Image as I, Text as T};

    const MODALITY: [Modality; 10] = [T, T, I, I, I, I, T, T, T, T];
    const S: [f32; 10] = [0.1, 0.2, 0.9, 0.1, 0.3, 0.05, 0.4, 0.0, 0.0, 0.0];

    #[test]
    fn text_fills_the_budget_first() {
        // B = 6: r = 3 (t7..t9), k = 3 over [0, 7): the three text tokens t0, t1, t6
        assert_eq!(text_prior(&S, &MODALITY, 7, 3), vec![0, 1, 6]);
    }

    #[test]
    fn images_by_score_after_the_text() {
        // B = 8: r = 4 (t6..t9), k = 4 over [0, 6): t0, t1, then i2 (0.9) and i4 (0.3)
        assert_eq!(text_prior(&S, &MODALITY, 6, 4), vec![0, 1, 2, 4]);
    }

    #[test]
    fn too_much_text_keeps_the_best_text_within_budget() {
        // B = 4: r = 2, k = 2 over [0, 8): four text candidates, the best two by score (t6, t1)
        assert_eq!(text_prior(&S, &MODALITY, 8, 2), vec![1, 6]);
    }

    #[test]
    fn ties_go_to_the_earlier_position() {
        let s = [0.5, 0.5, 0.5, 0.5];
        assert_eq!(text_prior(&s, &[I, I, I, I], 4, 2), vec![0, 1]);
    }
}
