//! The seam between what llama.cpp shows of attention and the statistics made of it.
//!
//! [`observer`](super::observer) reads tensors out of llama.cpp's graph and hands them to an
//! [`AttentionSink`]; it knows nothing of requests, windows or buckets. The statistics
//! (`crate::stats`) implement the trait, so the dependency runs stats → llama, never back.

use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Shape of one `kq-<il>` tensor (F32 `[n_kv, n_rows, n_head]`, key cell fastest).
#[derive(Debug, Clone, Copy)]
pub struct KqShape {
    /// Layer.
    pub layer: usize,
    /// Key cells (columns), padded by llama.cpp.
    pub n_kv: usize,
    /// Query rows of this ubatch.
    pub n_rows: usize,
    /// Query heads.
    pub n_head: usize,
}

/// Receives what llama.cpp's graph shows of attention while a prompt is evaluated, ubatch by
/// ubatch, and turns it into statistics of its own.
///
/// The host path (today): the observer (`cb_eval`) reads, per ubatch, the KV cells its tokens
/// are written to ([`on_ubatch`](Self::on_ubatch), from `cache_k_l0`'s `SET_ROWS` index input,
/// i.e. `attn_inp_k_idxs`), then per layer the raw logits `kq-<il>` of the rows the sink asks
/// for ([`wanted_rows`](Self::wanted_rows), checked before the node is read: every read splits
/// the graph and synchronises) and hands them over ([`on_logits`](Self::on_logits)). Scale,
/// causal mask and (n-)softmax are the sink's business. `crate::stats::Reducer` implements it.
///
/// The graph path (patch `0005-attn-observer-in-graph`, flash attention left on): llama.cpp
/// computes, inside its graph, per layer and observed ubatch, the sums over query rows of the
/// (n-)softmax probabilities each KV cell receives, per KV head (mean over its query heads) and
/// per *column* (a request's window × the query's modality), as [`GraphPlan`] asks; the
/// observer hands them over as [`GraphSums`] ([`on_sums`](Self::on_sums)) with each cell's
/// position, so no `kq` and no cell map leave llama.cpp. The host reducer stays as the test
/// oracle (AirCache's elite window is a plan too, with patch 0008). Either way the engine
/// reads the result as `stats::AttentionStats`, so policies do not change.
pub trait AttentionSink: Send {
    /// A new ubatch: its tokens (the prompt's next ones, in order) are written to `cells`
    /// (one per token; a negative index means none).
    fn on_ubatch(&mut self, cells: &[i64]);

    /// Rows of the current ubatch whose logits are wanted: a suffix `start..end` of its rows,
    /// empty when none (then no `kq-<il>` of this ubatch is read).
    fn wanted_rows(&self) -> Range<usize>;

    /// One layer's raw logits (unscaled, unmasked) for the rows
    /// [`wanted_rows`](Self::wanted_rows) returned: `head_rows(h)` is head `h`'s rows as one
    /// `[rows × n_kv]` slab (row-major, key cell fastest), borrowed in place from host memory or
    /// copied from the device.
    fn on_logits<'s>(&mut self, shape: KqShape, head_rows: &(dyn Fn(usize) -> &'s [f32] + Sync));

    /// One layer's in-graph sums of one variant (the graph path); `Err` stops observing.
    ///
    /// # Errors
    /// Sums the sink cannot place (a plan it did not make).
    fn on_sums(&mut self, sums: &GraphSums<'_>) -> Result<(), String>;
}

/// What the graph computes (`llama_attn_obs_params`): variants (one n-softmax each), columns
/// (each of one variant), and for every position the columns its query row adds to.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphPlan {
    /// n of each variant's n-softmax (0 = softmax).
    pub n: Vec<f32>,
    /// The variant of each column (at most [`GraphPlan::MAX_COLS`] columns).
    pub col_var: Vec<i32>,
    /// Per position: bit c set = the query row at that position adds to column c.
    pub cols_of_pos: Vec<u64>,
    /// Query rows per chunk of the extra `QKᵀ` (bounds the extra compute buffer; 0 = 128).
    pub rows_chunk: i32,
    /// Reduce with `mul_mat(transpose)` even where the backend has `OUT_PROD` (tests).
    pub force_transpose: bool,
    /// Per variant: `> 0` makes it AirCache's elite window with this α (patch 0008), computed
    /// in the ubatch that holds `elite_last`; empty = no elite variant.
    pub elite_alpha: Vec<f32>,
    /// Per position (with an elite variant): bit 0 = a text key, bit 1 = a text key that may join
    /// the elite set ([`GraphPlan::KEY_TEXT`], [`GraphPlan::KEY_ELIGIBLE`]).
    pub key_of_pos: Vec<u8>,
    /// Position of the prompt's last token (the elite window's anchor).
    pub elite_last: i32,
    /// Per variant: nonzero makes it a query-moments variant (patch 0013): the pre-RoPE query
    /// rows of its columns are summed (once each) instead of attention; empty = none.
    pub moments: Vec<u8>,
}

impl GraphPlan {
    /// Columns llama.cpp accepts.
    pub const MAX_COLS: usize = 64;
    /// `key_of_pos`: a text key (`LLAMA_ATTN_OBS_KEY_TEXT`).
    pub const KEY_TEXT: u8 = 1;
    /// `key_of_pos`: a text key that may join the elite set (`LLAMA_ATTN_OBS_KEY_ELIGIBLE`).
    pub const KEY_ELIGIBLE: u8 = 2;
}

/// One layer's sums of one variant, for one observed ubatch (`llama_attn_obs_result`).
#[derive(Debug, Clone, Copy)]
pub struct GraphSums<'a> {
    /// Layer.
    pub layer: usize,
    /// Variant.
    pub var: usize,
    /// KV cells of the ubatch's view.
    pub n_kv: usize,
    /// KV heads.
    pub n_head_kv: usize,
    /// The plan's column of each local column (ascending).
    pub cols: &'a [i32],
    /// `[n_head_kv][cols.len()][n_kv]`, cell fastest.
    pub sums: &'a [f32],
    /// Position of each cell in the observed sequence (−1: empty or another sequence).
    pub cell_pos: &'a [i32],
    /// Positions of the ubatch rows this variant observed (an elite variant: its candidates).
    pub row_pos: &'a [i32],
    /// An elite variant: how many candidate rows were elite in this layer (the sums are already
    /// their mean); 0 otherwise.
    pub n_elite_rows: usize,
    /// A query-moments variant: its sums instead of attention (then `sums` and `cell_pos` are
    /// empty and `n_kv` is 0).
    pub q_moments: Option<QueryMomentSums<'a>>,
}

/// One layer's query moments over the rows of one ubatch (patch 0013).
#[derive(Debug, Clone, Copy)]
pub struct QueryMomentSums<'a> {
    /// Query heads.
    pub n_head: usize,
    /// Head size.
    pub d: usize,
    /// `[n_head][1 + d][d]`: per head Σ q over the rows, then Σ q qᵀ.
    pub data: &'a [f32],
}

/// A sink shared between the observer, which feeds it from llama.cpp's callback (locking it
/// for each call), and whoever reads its results between evaluations.
pub type SharedSink = Arc<Mutex<dyn AttentionSink>>;
