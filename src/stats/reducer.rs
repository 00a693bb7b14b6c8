//! The reduction: one layer's `kq` logits → per-(KV head, key token) column sums for every
//! request at once (the exponentials of a row are computed once and shared), KV heads spread
//! over threads. What counts as a row, a visible key or a probability is decided by
//! [`super::window`], [`super::cells`] and [`super::softmax`]; AirCache's window by
//! [`super::elite`].

use std::ops::Range;

use super::cells::Cells;
use super::softmax::{accumulate, causal, exponentials, weight};
use super::{elite, window, AttentionSink, AttentionStats, Bucket, GraphSums, KqShape, LayerRows, Rows, StatRequest};
use crate::span::Modality;

/// One (layer, KV head)'s text and media sums of one request, `[token]` each.
type Sums<'a> = (&'a mut [f32], &'a mut [f32]);

/// Accumulates [`AttentionStats`] from `kq` tensors, one ubatch at a time — one set per
/// request, so several policies can be served by a single prefill (the exponentials of a row are
/// computed once and shared).
#[derive(Debug)]
pub struct Reducer {
    pub(super) reqs: Vec<StatRequest>,
    scale: f32,
    pub(super) bucket: Vec<Bucket>,
    cells: Cells,
    /// Windows end here: the prompt's end, or the next eviction of a bounded prefill.
    pub(super) horizon: usize,
    threads: usize,
    pub(super) stats: Vec<AttentionStats>,
    /// Graph path: prompt token at each position (−1: none), from the installed plan.
    pub(super) token_of_pos: Vec<i64>,
    /// Graph path: one past the last prompt token whose cell the sums covered.
    pub(super) graph_seen: usize,
    /// Milliseconds spent reducing.
    pub ms: f64,
}

impl Reducer {
    /// A reducer for a prompt whose tokens have the given modalities.
    #[must_use]
    pub fn new(reqs: Vec<StatRequest>, modality: &[Modality], n_layer: usize, n_head_kv: usize, scale: f32, threads: usize) -> Self {
        let stats = reqs.iter().map(|_| AttentionStats::new(n_layer, n_head_kv, modality.len())).collect();
        Self {
            reqs,
            scale,
            bucket: modality.iter().map(|m| Bucket::of(*m)).collect(),
            cells: Cells::default(),
            horizon: modality.len(),
            threads: threads.max(1),
            stats,
            token_of_pos: Vec::new(),
            graph_seen: 0,
            ms: 0.0,
        }
    }

    /// The statistics gathered so far, one per request.
    #[must_use]
    pub fn stats(&self) -> &[AttentionStats] {
        &self.stats
    }

    /// Takes the statistics, one per request.
    #[must_use]
    pub fn into_stats(self) -> Vec<AttentionStats> {
        self.stats
    }

    /// Takes the statistics out, one per request, leaving none.
    pub(super) fn take_stats(&mut self) -> Vec<AttentionStats> {
        std::mem::take(&mut self.stats)
    }

    /// Prompt tokens seen so far.
    #[must_use]
    pub fn tokens_seen(&self) -> usize {
        self.cells.tokens_seen().max(self.graph_seen)
    }

    /// Bounded prefill: the windows of the following ubatches end before token `horizon` (the
    /// next eviction point; the prompt's length for the final pass).
    pub fn set_horizon(&mut self, horizon: usize) {
        self.horizon = horizon.min(self.bucket.len());
    }

    /// After an eviction packed the surviving tokens (`kept(token)`) into the first cells, in
    /// their cell order: remaps cells to tokens and restarts window statistics (`Rows::All`
    /// keeps its running sums).
    pub fn on_compact(&mut self, kept: &dyn Fn(usize) -> bool) {
        self.cells.on_compact(kept);
        for (req, st) in self.reqs.iter().zip(&mut self.stats) {
            if window::restarts(req.rows) {
                st.clear();
            }
        }
    }

    /// A new ubatch: its tokens (the next prompt tokens, in order) were written to `cells`.
    pub fn on_ubatch(&mut self, cells: &[i64]) {
        self.cells.on_ubatch(cells);
    }

    /// First prompt token index request `k` reads rows from.
    fn first_row(&self, k: usize) -> usize {
        window::first_row(self.reqs[k].rows, self.horizon, self.cells.ubatch())
    }

    /// Rows of the current ubatch whose statistics some request wants (a suffix), as
    /// `start..end` row indices.
    #[must_use]
    pub fn wanted_rows(&self) -> Range<usize> {
        // query moments come from the graph only: they want no logits
        let from = (0..self.reqs.len()).filter(|&k| !matches!(self.reqs[k].rows, Rows::Moments { .. })).map(|k| self.first_row(k)).min().unwrap_or(self.horizon);
        window::wanted(self.cells.ubatch(), self.horizon, from)
    }

    /// Reduces one layer's `kq` for the wanted rows. `head_rows(h)` returns head `h`'s rows
    /// `wanted_rows()` as one `[rows × n_kv]` slab (row-major, key cell fastest).
    pub fn reduce<'s>(&mut self, shape: KqShape, head_rows: &(dyn Fn(usize) -> &'s [f32] + Sync)) {
        let t0 = std::time::Instant::now();
        let rows = self.wanted_rows();
        let n_layer = self.stats.first().map_or(0, |s| s.n_layer);
        if rows.is_empty() || shape.layer >= n_layer {
            return;
        }
        let n_head_kv = self.stats[0].n_head_kv;
        let group = (shape.n_head / n_head_kv).max(1);
        // visible key cells, sorted by token index: a row at index t sees the prefix with u ≤ t
        let keys = self.cells.keys(shape.n_kv);
        let first = self.cells.ubatch().0;
        let row_tokens: Vec<u32> = rows.clone().map(|r| first + r as u32).collect();
        let firsts: Vec<usize> = (0..self.reqs.len()).map(|k| self.first_row(k)).collect();
        let ns: Vec<f64> = self.reqs.iter().map(|r| f64::from(r.n)).collect();
        // AirCache's elite window is reduced apart; query moments are not computed on the host
        let is_elite: Vec<bool> = self.reqs.iter().map(|r| matches!(r.rows, Rows::Elite { .. } | Rows::Moments { .. })).collect();
        if shape.layer == 0 {
            for &t in &row_tokens {
                for (k, st) in self.stats.iter_mut().enumerate() {
                    if t as usize >= firsts[k] && !is_elite[k] {
                        st.n_rows[self.bucket[t as usize] as usize] += 1;
                    }
                }
            }
        }

        let layer = LayerRows { shape, keys: &keys, row_tokens: &row_tokens, scale: self.scale, bucket: &self.bucket, head_rows };
        let n_tokens = self.stats[0].n_tokens;
        // work[g][k] = (text sums, media sums) of KV head g for request k
        let mut work: Vec<Vec<Sums<'_>>> = (0..n_head_kv).map(|_| Vec::new()).collect();
        for st in &mut self.stats {
            let (text, media) = st.layer_mut(shape.layer);
            for (g, pair) in text.chunks_mut(n_tokens).zip(media.chunks_mut(n_tokens)).enumerate() {
                work[g].push(pair);
            }
        }
        let reduce_group = |(g, mut accs): (usize, Vec<Sums<'_>>)| {
            let (cols, identity) = (&layer.keys.cols[..], layer.keys.identity);
            let mut e = Vec::with_capacity(cols.len());
            for h in g * group..(g + 1) * group {
                let slab = head_rows(h);
                for (r, &t) in layer.row_tokens.iter().enumerate() {
                    let logits = &slab[r * shape.n_kv..(r + 1) * shape.n_kv];
                    let vis = causal(cols, t);
                    // e[i] = exp(scale·x − max) for the i-th visible key, in token order
                    let Some((mx, sum)) = exponentials(logits, vis, identity, layer.scale, &mut e) else { continue };
                    let text_row = layer.is_text(t);
                    for (k, (acc_text, acc_media)) in accs.iter_mut().enumerate() {
                        if (t as usize) < firsts[k] || is_elite[k] {
                            continue;
                        }
                        let w = weight(sum, mx, ns[k], group);
                        let acc: &mut [f32] = if text_row { acc_text } else { acc_media };
                        accumulate(acc, vis, &e, identity, w);
                    }
                }
            }
        };
        let work: Vec<_> = work.into_iter().enumerate().collect();
        if self.threads <= 1 || work.len() <= 1 {
            work.into_iter().for_each(reduce_group);
        } else {
            let per_worker = work.len().div_ceil(self.threads);
            let mut work = work;
            std::thread::scope(|s| {
                while !work.is_empty() {
                    let chunk: Vec<_> = work.drain(..per_worker.min(work.len())).collect();
                    let f = &reduce_group;
                    s.spawn(move || chunk.into_iter().for_each(f));
                }
            });
        }
        for (k, st) in self.stats.iter_mut().enumerate() {
            if let Rows::Elite { alpha, keep_sink } = self.reqs[k].rows {
                if firsts[k] < self.horizon {
                    elite::reduce(st, &layer, (self.horizon - 1) as u32, alpha, keep_sink);
                }
            }
        }
        self.ms += t0.elapsed().as_secs_f64() * 1e3;
    }
}

/// The observer's host path feeds a reducer directly.
impl AttentionSink for Reducer {
    fn on_ubatch(&mut self, cells: &[i64]) {
        Reducer::on_ubatch(self, cells);
    }

    fn wanted_rows(&self) -> Range<usize> {
        Reducer::wanted_rows(self)
    }

    fn on_logits<'s>(&mut self, shape: KqShape, head_rows: &(dyn Fn(usize) -> &'s [f32] + Sync)) {
        self.reduce(shape, head_rows);
    }

    fn on_sums(&mut self, sums: &GraphSums<'_>) -> Result<(), String> {
        self.add_sums(sums)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 3 tokens (text, image, text), 1 layer, 2 query heads sharing 1 KV head, all in one
    /// ubatch written to cells 2, 0, 1 (cells ≠ token order on purpose).
    #[test]
    fn column_sums_match_a_hand_computation() {
        let modality = [Modality::Text, Modality::Image, Modality::Text];
        for (n, rows) in [(0.0f32, Rows::All), (1.0, Rows::Last(2))] {
            let mut r = Reducer::new(vec![StatRequest { rows, n }], &modality, 1, 1, 0.5, 1);
            r.on_ubatch(&[2, 0, 1]);
            let n_kv = 4; // padded: cell 3 is empty
            // raw logits per head, rows = tokens 0..3, columns = cells 0..4
            let logits: [[f32; 12]; 2] = [
                [1.0, 9.0, 2.0, 9.0, /**/ 4.0, 9.0, 0.0, 9.0, /**/ 2.0, 6.0, -2.0, 9.0],
                [3.0, 9.0, 1.0, 9.0, /**/ 0.0, 9.0, 2.0, 9.0, /**/ -4.0, 0.0, 4.0, 9.0],
            ];
            let want = r.wanted_rows();
            let slabs: Vec<Vec<f32>> = logits.iter().map(|l| l[want.start * n_kv..want.end * n_kv].to_vec()).collect();
            let get = |h: usize| -> &[f32] { &slabs[h] };
            r.reduce(KqShape { layer: 0, n_kv, n_rows: 3, n_head: 2 }, &get);

            // expected: token u lives in cell c(u) = [2, 0, 1][u]
            let cell = [2usize, 0, 1];
            let mut exp = [[0f64; 3]; 2]; // [bucket][token]
            for h in 0..2 {
                for t in want.clone() {
                    let xs: Vec<f64> = (0..=t).map(|u| f64::from(logits[h][t * n_kv + cell[u]]) * 0.5).collect();
                    let z: f64 = xs.iter().map(|x| x.exp()).sum::<f64>() + f64::from(n);
                    let b = Bucket::of(modality[t]) as usize;
                    for (u, x) in xs.iter().enumerate() {
                        exp[b][u] += x.exp() / z / 2.0;
                    }
                }
            }
            for (b, bucket) in [Bucket::Text, Bucket::Media].into_iter().enumerate() {
                let got = r.stats()[0].column(bucket, 0, 0);
                for u in 0..3 {
                    assert!((f64::from(got[u]) - exp[b][u]).abs() < 1e-6, "n={n} bucket {b} token {u}: {} vs {}", got[u], exp[b][u]);
                }
            }
        }
    }

    #[test]
    fn several_requests_in_one_pass_equal_separate_passes() {
        let modality = [Modality::Text, Modality::Image, Modality::Image, Modality::Text, Modality::Text];
        let reqs = [StatRequest { rows: Rows::All, n: 0.0 }, StatRequest { rows: Rows::Last(2), n: 1.0 }, StatRequest { rows: Rows::Last(4), n: 0.5 }];
        let logits: Vec<f32> = (0..2 * 5 * 5).map(|i| ((i * 37) % 11) as f32 / 3.0 - 1.5).collect();
        let run = |reqs: Vec<StatRequest>| {
            let mut r = Reducer::new(reqs, &modality, 1, 1, 0.7, 1);
            r.on_ubatch(&[0, 1, 2, 3, 4]);
            let want = r.wanted_rows();
            let slabs: Vec<Vec<f32>> = (0..2).map(|h| logits[h * 25 + want.start * 5..h * 25 + want.end * 5].to_vec()).collect();
            let get = |h: usize| -> &[f32] { &slabs[h] };
            r.reduce(KqShape { layer: 0, n_kv: 5, n_rows: 5, n_head: 2 }, &get);
            r.into_stats()
        };
        let together = run(reqs.to_vec());
        for (k, req) in reqs.iter().enumerate() {
            assert_eq!(together[k], run(vec![*req])[0], "request {k}");
        }
    }

    #[test]
    fn window_rows_across_ubatches() {
        let modality = [Modality::Text; 10];
        let mut r = Reducer::new(vec![StatRequest { rows: Rows::Last(3), n: 1.0 }], &modality, 1, 1, 1.0, 1);
        r.on_ubatch(&[0, 1, 2, 3, 4, 5]);
        assert!(r.wanted_rows().is_empty());
        r.on_ubatch(&[6, 7, 8]);
        assert_eq!(r.wanted_rows(), 1..3);
        r.on_ubatch(&[9]);
        assert_eq!(r.wanted_rows(), 0..1);
        r.on_ubatch(&[10]); // a decode token: never wanted
        assert!(r.wanted_rows().is_empty());
    }
}
