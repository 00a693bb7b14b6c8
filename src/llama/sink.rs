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
/// Statistics computed inside llama.cpp's graph (issue 15, `research/observe-in-graph.md`) plug
/// in behind the same seam: a second producer in `llama/` (reading the per-layer `attn_obs`
/// sums `[n_kv, columns, n_head_kv]` and `cell_pos` after each observed ubatch, with flash
/// attention left on) feeds the same sink through one more method, e.g.
/// `on_sums(layer, n_kv, n_head_kv, columns, sums, cell_pos)`, and gets what to compute from
/// one more query, e.g. `graph_request() -> Option<GraphRequest>` (positions of each request's
/// window, the n of each n-softmax, the column of each position: plain numbers defined here, so
/// `llama/` still imports nothing from `stats`). The sink turns sums of cells into sums of
/// prompt tokens with the same cell map it keeps for [`on_ubatch`](Self::on_ubatch); the host
/// reducer stays as the test oracle. Either way the engine reads the result as
/// `stats::AttentionStats`, so policies do not change.
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
}

/// A sink shared between the observer, which feeds it from llama.cpp's callback (locking it
/// for each call), and whoever reads its results between evaluations.
pub type SharedSink = Arc<Mutex<dyn AttentionSink>>;
