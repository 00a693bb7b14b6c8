//! Attention statistics gathered while the prompt is evaluated, reduced on the spot.
//!
//! llama.cpp's graph exposes each layer's raw attention logits as `kq-<il>`, F32
//! `[n_kv, n_rows, n_head]` (key cell fastest; unscaled; no mask applied: the softmax that
//! follows scales, masks and normalises in place). A [`Reducer`] turns one such tensor into
//! per-(layer, KV head, key token) column sums of softmax or n-softmax probabilities over the
//! query rows a policy asked for, split by the query's modality (text vs media). It never keeps
//! the L×L×H matrix: memory is 2 × layers × KV heads × L floats.
//!
//! * Columns are KV **cells**; the reducer maps them to prompt token indices from the cell ids
//!   llama.cpp writes each ubatch to (`attn_inp_k_idxs`), so holes and reused cells are fine.
//! * The causal mask is rebuilt from those indices: a query at prompt index t sees the keys at
//!   indices ≤ t (single sequence, causal attention, 1-D positions — the engine refuses
//!   observation for models where that does not hold).
//! * n-softmax: `p_j = exp(x_j) / (n + Σ exp(x_i))` with `x = scale·q·k` (CSP, methods §1.2);
//!   n = 0 is the ordinary softmax.
//! * Bounded prefill (`--kv-max-cells`): the cache is pruned while the prompt is read. Windows
//!   then end at the next eviction point (the *horizon*) instead of the prompt's end; after the
//!   eviction the survivors are packed into the first cells ([`Reducer::on_compact`]), window
//!   sums restart and `Rows::All` sums keep accumulating (H2O's running heavy hitters).
//! * Grouped-query attention: query heads sharing a KV head are averaged (the mean aggregation
//!   of KVCache-Factory), because the cache — and so eviction — is per KV head.
//!
//! The observer in `llama/` feeds a [`Reducer`] through the [`AttentionSink`] trait it defines
//! (this module depends on `llama`, never the other way); the engine holds the same reducer
//! through a [`Collector`]. Files, one concern each:
//!
//! | file | concern |
//! |---|---|
//! | `mod.rs` | what policies ask for ([`StatRequest`], [`Rows`]) and get ([`AttentionStats`]) |
//! | `reducer.rs` | [`Reducer`]: one layer's `kq` → column sums for every request, threads |
//! | `cells.rs` | the KV cell ↔ prompt token map, and the visible keys of a layer |
//! | `window.rs` | which query rows count: last O, all, the horizon of a bounded prefill |
//! | `softmax.rs` | one row: scale, causal mask, (n-)softmax, grouped-head weight |
//! | `elite.rs` | AirCache's elite observation window |
//! | `graph.rs` | the graph path: requests → [`GraphPlan`], in-graph sums → statistics |
//! | `collector.rs` | [`Collector`]: the engine's handle on the reducer the observer feeds |
//! | `kv.rs` | statistics of the cached keys and values (no attention): [`KvStats`] |
//! | `moments.rs` | moments of the pre-RoPE queries (Expected Attention): [`QueryMoments`], [`Rope`] |

mod cells;
mod collector;
mod elite;
mod graph;
mod kv;
mod moments;
mod reducer;
mod softmax;
mod window;

pub use crate::llama::sink::{AttentionSink, GraphPlan, GraphSums, KqShape, SharedSink};
pub use collector::Collector;
pub use kv::{keydiff_cosines, ExpectedRequest, KvRequest, KvStats};
pub use moments::{QueryMoments, Rope};
pub use reducer::Reducer;
pub use softmax::exp_neg;

use crate::span::Modality;

/// Which query rows statistics are gathered over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rows {
    /// Every prompt query (H2O).
    All,
    /// The last `w` prompt queries (SnapKV, CSP's observation window).
    Last(usize),
    /// AirCache's elite observation window (methods §3.2), per layer: the text keys whose
    /// text-only attention from the last prompt token (head mean) is at least `alpha` times the
    /// largest, plus that token itself. Their query rows attend over the media keys and the
    /// elite text keys only; the media columns of the (text) bucket get the mean of those rows.
    /// Only the final ubatch's rows exist when the last token is read, so elite queries in
    /// earlier ubatches are not observed (they still count as elite keys).
    Elite {
        /// Threshold relative to the strongest text key.
        alpha: f32,
        /// Whether the first prompt token (the attention sink) may be elite.
        keep_sink: bool,
    },
    /// No attention: the sum and the sum of outer products of the pre-RoPE query vectors of
    /// every prompt row from index `skip` on, per (layer, query head) — Expected Attention's
    /// query statistics ([`QueryMoments`], in [`AttentionStats::moments`]). In-graph observer
    /// only (patch 0013); they accumulate across the evictions of a bounded prefill.
    Moments {
        /// Rows before this prompt index are left out (the attention sinks).
        skip: usize,
    },
}

/// What a policy asks the observer for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StatRequest {
    /// Query rows.
    pub rows: Rows,
    /// n of the n-softmax; 0 = ordinary softmax.
    pub n: f32,
}

/// Query modality buckets the sums are split by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    /// Text queries.
    Text = 0,
    /// Image (or audio) queries.
    Media = 1,
}

impl Bucket {
    /// The bucket of a token's modality.
    #[must_use]
    pub fn of(m: Modality) -> Self {
        if m == Modality::Text {
            Bucket::Text
        } else {
            Bucket::Media
        }
    }
}

/// Column sums `[bucket][layer][kv head][token]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionStats {
    /// Layers.
    pub n_layer: usize,
    /// KV heads.
    pub n_head_kv: usize,
    /// Prompt tokens (columns).
    pub n_tokens: usize,
    /// Query rows that contributed, per bucket.
    pub n_rows: [usize; 2],
    data: Vec<f32>,
    /// [`Rows::Moments`] requests: the query moments (`None` until the observer sent some).
    pub moments: Option<QueryMoments>,
}

impl AttentionStats {
    /// All zeros.
    #[must_use]
    pub fn new(n_layer: usize, n_head_kv: usize, n_tokens: usize) -> Self {
        Self { n_layer, n_head_kv, n_tokens, n_rows: [0; 2], data: vec![0.0; 2 * n_layer * n_head_kv * n_tokens], moments: None }
    }

    fn offset(&self, b: Bucket, layer: usize, head: usize) -> usize {
        ((b as usize * self.n_layer + layer) * self.n_head_kv + head) * self.n_tokens
    }

    /// Attention each token received from queries of bucket `b`, in one (layer, KV head).
    #[must_use]
    pub fn column(&self, b: Bucket, layer: usize, head: usize) -> &[f32] {
        let o = self.offset(b, layer, head);
        &self.data[o..o + self.n_tokens]
    }

    /// Mutable access (tests and hand-built statistics).
    pub fn column_mut(&mut self, b: Bucket, layer: usize, head: usize) -> &mut [f32] {
        let o = self.offset(b, layer, head);
        &mut self.data[o..o + self.n_tokens]
    }

    /// The text and media sums of one layer, `[kv head][token]` each (the reducer writes every
    /// KV head of a layer at once).
    fn layer_mut(&mut self, layer: usize) -> (&mut [f32], &mut [f32]) {
        let layer_len = self.n_head_kv * self.n_tokens;
        let (text_all, media_all) = self.data.split_at_mut(self.n_layer * layer_len);
        (&mut text_all[layer * layer_len..][..layer_len], &mut media_all[layer * layer_len..][..layer_len])
    }

    /// The statistics of the tokens `tokens` (prompt indices), in that order: the columns a
    /// policy sees when it ranks only what the cache still holds.
    #[must_use]
    pub fn gather(&self, tokens: &[usize]) -> Self {
        let mut out = Self::new(self.n_layer, self.n_head_kv, tokens.len());
        out.n_rows = self.n_rows;
        out.moments.clone_from(&self.moments);
        for b in [Bucket::Text, Bucket::Media] {
            for layer in 0..self.n_layer {
                for head in 0..self.n_head_kv {
                    let src = self.column(b, layer, head);
                    for (d, &t) in out.column_mut(b, layer, head).iter_mut().zip(tokens) {
                        *d = src[t];
                    }
                }
            }
        }
        out
    }

    fn clear(&mut self) {
        self.n_rows = [0; 2];
        self.data.iter_mut().for_each(|v| *v = 0.0);
    }

    /// Text + media sums.
    #[must_use]
    pub fn total(&self, layer: usize, head: usize) -> Vec<f32> {
        let t = self.column(Bucket::Text, layer, head);
        let m = self.column(Bucket::Media, layer, head);
        t.iter().zip(m).map(|(a, b)| a + b).collect()
    }
}

/// One layer's `kq` as the reductions read it.
struct LayerRows<'a, 's> {
    shape: KqShape,
    /// The occupied key cells, sorted by token.
    keys: &'a cells::Keys,
    /// Prompt token of each slab row.
    row_tokens: &'a [u32],
    /// The attention scale applied to the raw logits.
    scale: f32,
    /// Bucket of each prompt token.
    bucket: &'a [Bucket],
    /// Head `h`'s rows as one slab (see [`AttentionSink::on_logits`]).
    head_rows: &'a (dyn Fn(usize) -> &'s [f32] + Sync),
}

impl<'s> LayerRows<'_, 's> {
    /// Head `h`'s logits of slab row `r`, one per cell.
    fn row(&self, h: usize, r: usize) -> &'s [f32] {
        &(self.head_rows)(h)[r * self.shape.n_kv..(r + 1) * self.shape.n_kv]
    }

    fn is_text(&self, u: u32) -> bool {
        self.bucket[u as usize] == Bucket::Text
    }
}
