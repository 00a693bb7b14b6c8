//! The selection every policy shares, applied once: a policy's [`Pick`]s become keep-sets
//! ([`Choose`]: the `k` best candidates by score where the policy gave only scores, plus the
//! budget's recent window), and the keep-sets become a [`Retention`] at a granularity
//! ([`retain`]: a vote at `global`, masks at `layer`/`head`).
//!
//! All routines are deterministic: ties go to the earlier position (the references use
//! `torch.topk`, whose tie order is unspecified on CUDA).

use std::cmp::Ordering;
use std::ops::Range;

use super::{Granularity, HeadChoice, HeadKeep, Input, Pick, Policy, Retention, Split};
use crate::error::Result;

/// Score descending, then index ascending; NaN ranks last.
fn by_score_desc(scores: &[f32]) -> impl Fn(&usize, &usize) -> Ordering + '_ {
    move |&a, &b| {
        let (x, y) = (scores[a], scores[b]);
        let x = if x.is_nan() { f32::NEG_INFINITY } else { x };
        let y = if y.is_nan() { f32::NEG_INFINITY } else { y };
        y.partial_cmp(&x).unwrap_or(Ordering::Equal).then(a.cmp(&b))
    }
}

/// The `k` best indices of `candidates` by `scores` (score desc, index asc), in that order.
#[must_use]
pub fn top_k(scores: &[f32], candidates: Range<usize>, k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = candidates.collect();
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    let cmp = by_score_desc(scores);
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, &cmp);
        idx.truncate(k);
    }
    idx.sort_unstable_by(&cmp);
    idx
}

/// 1-D average pooling with zero padding (`avg_pool1d(kernel, stride 1, padding kernel/2,
/// count_include_pad=True)`, as SnapKV).
#[must_use]
pub fn avg_pool(x: &[f32], kernel: usize) -> Vec<f32> {
    let half = kernel / 2;
    let n = x.len();
    let mut prefix = vec![0f64; n + 1];
    for (i, v) in x.iter().enumerate() {
        prefix[i + 1] = prefix[i] + f64::from(*v);
    }
    (0..n)
        .map(|i| {
            let lo = i.saturating_sub(half);
            let hi = (i + half + 1).min(n);
            ((prefix[hi] - prefix[lo]) / kernel as f64) as f32
        })
        .collect()
}

/// Votes per-head choices down to exactly `b` of `l` tokens: the last token first (llama.cpp
/// continues from it: the next position must follow the last cached one), then the `fixed`
/// tokens (kept by rule, so never outvoted by ties), then by the number of choices keeping a
/// token, then by the score summed over all choices, then by position.
///
/// A choice votes for a token it keeps only where its own score for that token is positive, or
/// the token is `fixed` (the recent window and protected sinks, kept by rule). A head whose
/// candidates run out of positive scores fills its keep-set with zero-score tokens by position;
/// every such head picks the *same* tokens, which would otherwise win the vote unanimously over
/// tokens that real scores chose (issue 16: the first 7 tokens of image 1 on a 4-image prompt
/// at 0.2).
#[must_use]
pub fn vote(choices: &[HeadChoice], l: usize, b: usize, fixed: &[usize]) -> Retention {
    let mut votes = vec![0u32; l];
    let mut score = vec![0f32; l];
    let mut is_fixed = vec![false; l];
    fixed.iter().filter(|&&t| t < l).for_each(|&t| is_fixed[t] = true);
    for c in choices {
        for &t in &c.keep {
            if t < l && (is_fixed[t] || c.score.get(t).is_some_and(|&s| s > 0.0)) {
                votes[t] += 1;
            }
        }
        for (s, v) in score.iter_mut().zip(&c.score) {
            *s += v;
        }
    }
    let mut order: Vec<usize> = (0..l).collect();
    let b = b.min(l);
    let last = l.wrapping_sub(1);
    let cmp = |a: &usize, c: &usize| {
        (*c == last)
            .cmp(&(*a == last))
            .then_with(|| is_fixed[*c].cmp(&is_fixed[*a]))
            .then_with(|| votes[*c].cmp(&votes[*a]))
            .then_with(|| by_score_desc(&score)(a, c))
    };
    if b < l && b > 0 {
        order.select_nth_unstable_by(b - 1, cmp);
    }
    let mut keep = vec![false; l];
    for &t in order.iter().take(b) {
        keep[t] = true;
    }
    Retention { keep, votes, score, granularity: Granularity::Global, per_head: None }
}

/// The protected sink tokens of `input` for `policy` (none unless it
/// [`protects_sinks`](Policy::protects_sinks)), at most the budget's `k`.
fn protected(policy: &(impl Policy + ?Sized), input: &Input<'_>) -> Vec<usize> {
    if !policy.protects_sinks() || !input.protect.any() {
        return Vec::new();
    }
    let mut p = input.protect.tokens(input.modality, input.split.l - input.split.r);
    p.truncate(input.split.k);
    p
}

/// Tokens every choice keeps by rule: the recent window, the protected sinks and the policy's
/// own ([`Policy::kept_by_rule`]).
fn fixed_tokens(policy: &dyn Policy, input: &Input<'_>) -> Vec<usize> {
    let mut f = protected(policy, input);
    f.extend(input.split.recent_window());
    f.extend(policy.kept_by_rule(input));
    f
}

/// The shared completion of a policy's picks, as a method: `policy.choose(&input)`.
pub trait Choose {
    /// Every [`Pick`] of [`Policy::pick`] as a keep-set: the policy's own tokens, or the `k`
    /// best candidates (`[0, L − r)`) by its scores; then the recent window `[L − r, L)`.
    ///
    /// # Errors
    /// The policy's errors (missing statistics).
    fn choose(&self, input: &Input<'_>) -> Result<Vec<HeadChoice>>;
}

impl<P: Policy + ?Sized> Choose for P {
    fn choose(&self, input: &Input<'_>) -> Result<Vec<HeadChoice>> {
        let split = input.split;
        // protected sinks take their cells out of the policy's k
        let sinks = protected(self, input);
        let inner = Input { split: Split { k: split.k - sinks.len(), ..split }, ..*input };
        let mut is_sink = vec![false; split.l];
        sinks.iter().for_each(|&t| is_sink[t] = true);
        Ok(self
            .pick(&inner)?
            .into_iter()
            .map(|Pick { layer, head, score, keep }| {
                let mut keep = keep.unwrap_or_else(|| {
                    let mut best = top_k(&score, split.candidates(), inner.split.k + sinks.len());
                    best.retain(|&t| !is_sink[t]);
                    best.truncate(inner.split.k);
                    best
                });
                let want = keep.len();
                keep.retain(|&t| !is_sink[t]);
                if keep.len() < want {
                    // the policy chose protected tokens itself: the next best by its score
                    let mut taken = is_sink.clone();
                    keep.iter().for_each(|&t| taken[t] = true);
                    let more = top_k(&score, split.candidates(), want + sinks.len() + keep.len());
                    keep.extend(more.into_iter().filter(|&t| !taken[t]).take(want - keep.len()));
                }
                keep.extend(&sinks);
                keep.extend(split.recent_window());
                HeadChoice { layer, head, keep, score }
            })
            .collect())
    }
}

/// Runs a policy and turns its choices into a retention at `granularity` (the policy's own
/// when `None`). At `global`: exactly `min(B, L)` tokens by vote.
///
/// # Errors
/// Policy errors (missing statistics).
pub fn retain(policy: &dyn Policy, input: &Input<'_>, granularity: Option<Granularity>) -> Result<Retention> {
    let choices = policy.choose(input)?;
    let g = granularity.unwrap_or_else(|| policy.granularity());
    let (l, b) = (input.split.l, input.split.b);
    let fixed = fixed_tokens(policy, input);
    let mut global = vote(&choices, l, b, &fixed);
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
                vote(&owned, l, b, &fixed).keep
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_deterministic_with_ties() {
        let s = [0.5, 0.9, 0.5, 0.1, 0.9, f32::NAN];
        assert_eq!(top_k(&s, 0..6, 3), vec![1, 4, 0]);
        assert_eq!(top_k(&s, 2..6, 2), vec![4, 2]);
        assert_eq!(top_k(&s, 0..6, 0), Vec::<usize>::new());
        assert_eq!(top_k(&s, 0..3, 10), vec![1, 0, 2]);
    }

    #[test]
    fn pooling_pads_with_zeros() {
        let p = avg_pool(&[5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 10.0], 5);
        assert_eq!(p, vec![1.0, 1.0, 1.0, 0.0, 2.0, 2.0, 2.0]);
    }

    #[test]
    fn vote_ranks_by_count_then_score_then_position() {
        let l = 6;
        let choices = vec![
            HeadChoice { layer: None, head: None, keep: vec![0, 5], score: vec![0.5, 3.0, 1.0, 1.0, 0.0, 0.0] },
            HeadChoice { layer: None, head: None, keep: vec![1, 5], score: vec![0.0, 0.5, 0.0, 0.0, 0.0, 0.0] },
            HeadChoice { layer: None, head: None, keep: vec![2, 3, 5], score: vec![0.0, 0.0, 0.5, 0.5, 0.0, 0.0] },
        ];
        // votes: 0:1 1:1 2:1 3:1 4:0 5:3 (recent, score 0); summed scores 0:0.5 1:3.5 2:1.5 3:1.5
        let r = vote(&choices, l, 3, &[5]);
        assert_eq!(r.keep, vec![false, true, true, false, false, true]);
        assert_eq!(r.votes, vec![1, 1, 1, 1, 0, 3]);
        assert_eq!(vote(&choices, l, 6, &[5]).keep, vec![true; 6]);
        // the last token outranks every vote count: a budget of one keeps it
        let first_and_last = vec![HeadChoice { layer: None, head: None, keep: vec![0, 5], score: vec![9.0, 0.0, 0.0, 0.0, 0.0, 0.0] }; 2];
        assert_eq!(vote(&first_and_last, l, 1, &[5]).keep, vec![false, false, false, false, false, true]);
        assert_eq!(vote(&choices[..1], l, 1, &[5]).keep, vec![false, false, false, false, false, true]);
    }

    #[test]
    fn zero_score_fill_does_not_outvote_real_scores() {
        // four heads ran out of positive candidates and filled with tokens 0 and 1 by position;
        // two heads chose token 4 and one token 3 by their scores
        let l = 8;
        let fill = HeadChoice { layer: None, head: None, keep: vec![0, 1, 7], score: vec![0.0; 8] };
        let mut chose4 = fill.clone();
        chose4.keep = vec![4, 7];
        chose4.score[4] = 0.2;
        let mut chose3 = fill.clone();
        chose3.keep = vec![3, 7];
        chose3.score[3] = 0.9;
        let choices = vec![fill.clone(), fill.clone(), fill.clone(), fill, chose4.clone(), chose4, chose3];
        let r = vote(&choices, l, 3, &[7]);
        assert_eq!(r.votes, vec![0, 0, 0, 1, 2, 0, 0, 7], "fill picks carry no vote; the recent window does");
        assert_eq!(r.keep, vec![false, false, false, true, true, false, false, true]);
    }
}
