//! What a selection decides: per-choice keep-sets ([`HeadChoice`]), and the retention of a
//! prompt ([`Retention`]) with, at `layer`/`head` granularity, what each (layer, KV head) keeps
//! ([`HeadKeep`]).

use super::Granularity;

/// One (layer, KV head)'s choice, one layer's (`head: None`), or the single choice of a policy
/// without statistics (`layer: None`): the policy's picks completed by the shared selection.
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

    pub(super) fn get_mut(&mut self, layer: usize, head: usize) -> &mut [bool] {
        let o = (layer * self.n_head_kv + head) * self.l;
        &mut self.data[o..o + self.l]
    }

    /// Sets whether (layer, head) keeps token `t` (out-of-range arguments are ignored).
    pub fn set(&mut self, layer: usize, head: usize, t: usize, keep: bool) {
        if layer < self.n_layer && head < self.n_head_kv && t < self.l {
            self.get_mut(layer, head)[t] = keep;
        }
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
