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

use crate::span::Modality;

/// `exp(x)` for `x ≤ 0` in f32 without a libm call, so the row loops vectorise: Cephes'
/// range reduction `x = k·ln2 + r`, a degree-6 polynomial for `e^r`, then `2^k` through the
/// exponent bits. Relative error below 2e-7; inputs below −87 flush to 0.
#[inline(always)]
#[must_use]
pub fn exp_neg(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.max(-87.0);
    // round(x·log2 e) for x ≤ 0: truncation of a non-positive value is its ceiling (no libm
    // `ceilf`, which would stop vectorisation on baseline x86-64)
    let k = (x * LOG2E - 0.5) as i32 as f32;
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((k as i32 + 127) as u32) << 23)
}

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
}

impl AttentionStats {
    /// All zeros.
    #[must_use]
    pub fn new(n_layer: usize, n_head_kv: usize, n_tokens: usize) -> Self {
        Self { n_layer, n_head_kv, n_tokens, n_rows: [0; 2], data: vec![0.0; 2 * n_layer * n_head_kv * n_tokens] }
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

    /// The statistics of the tokens `tokens` (prompt indices), in that order: the columns a
    /// policy sees when it ranks only what the cache still holds.
    #[must_use]
    pub fn gather(&self, tokens: &[usize]) -> Self {
        let mut out = Self::new(self.n_layer, self.n_head_kv, tokens.len());
        out.n_rows = self.n_rows;
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

/// Shape of one `kq-<il>` tensor.
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

/// Accumulates [`AttentionStats`] from `kq` tensors, one ubatch at a time — one set per
/// request, so several policies can be served by a single prefill (the exponentials of a row are
/// computed once and shared).
#[derive(Debug)]
pub struct Reducer {
    reqs: Vec<StatRequest>,
    scale: f32,
    bucket: Vec<Bucket>,
    /// cell → prompt token index
    cell_token: Vec<Option<u32>>,
    /// prompt token index of the first row of the current ubatch, and its row count
    ubatch: (u32, usize),
    next_token: u32,
    /// Windows end here: the prompt's end, or the next eviction of a bounded prefill.
    horizon: usize,
    threads: usize,
    stats: Vec<AttentionStats>,
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
            cell_token: Vec::new(),
            ubatch: (0, 0),
            next_token: 0,
            horizon: modality.len(),
            threads: threads.max(1),
            stats,
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

    /// Prompt tokens seen so far.
    #[must_use]
    pub fn tokens_seen(&self) -> usize {
        self.next_token as usize
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
        let survivors: Vec<Option<u32>> = self.cell_token.iter().filter(|u| u.is_some_and(|u| kept(u as usize))).copied().collect();
        self.cell_token = survivors;
        for (req, st) in self.reqs.iter().zip(&mut self.stats) {
            if req.rows != Rows::All {
                st.clear();
            }
        }
    }

    /// A new ubatch: its tokens (the next prompt tokens, in order) were written to `cells`.
    pub fn on_ubatch(&mut self, cells: &[i64]) {
        self.ubatch = (self.next_token, cells.len());
        for (r, &c) in cells.iter().enumerate() {
            let Ok(c) = usize::try_from(c) else { continue };
            if self.cell_token.len() <= c {
                self.cell_token.resize(c + 1, None);
            }
            self.cell_token[c] = Some(self.next_token + r as u32);
        }
        self.next_token += cells.len() as u32;
    }

    /// First prompt token index request `k` reads rows from.
    fn first_row(&self, k: usize) -> usize {
        let n_prompt = self.horizon;
        match self.reqs[k].rows {
            Rows::All => 0,
            Rows::Last(w) => n_prompt.saturating_sub(w),
            Rows::Elite { .. } => {
                let (first, n) = (self.ubatch.0 as usize, self.ubatch.1);
                if first < n_prompt && first + n >= n_prompt {
                    first
                } else {
                    n_prompt
                }
            }
        }
    }

    /// Rows of the current ubatch whose statistics some request wants (a suffix), as
    /// `start..end` row indices.
    #[must_use]
    pub fn wanted_rows(&self) -> std::ops::Range<usize> {
        let (first, n) = self.ubatch;
        let n_prompt = self.horizon;
        let from = (0..self.reqs.len()).map(|k| self.first_row(k)).min().unwrap_or(n_prompt);
        let first = first as usize;
        // rows beyond the prompt (decode) are never wanted
        let end = n.min(n_prompt.saturating_sub(first));
        let start = from.saturating_sub(first).min(end);
        start..end
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
        let mut cols: Vec<(usize, u32)> = self
            .cell_token
            .iter()
            .take(shape.n_kv)
            .enumerate()
            .filter_map(|(j, u)| u.map(|u| (j, u)))
            .collect();
        cols.sort_unstable_by_key(|&(_, u)| u);
        // After a plain prefill, cell j holds token j: visible keys are a contiguous prefix.
        let identity = cols.iter().enumerate().all(|(i, &(j, u))| i == j && j == u as usize);
        let first = self.ubatch.0;
        let row_tokens: Vec<u32> = rows.clone().map(|r| first + r as u32).collect();
        let firsts: Vec<usize> = (0..self.reqs.len()).map(|k| self.first_row(k)).collect();
        let ns: Vec<f64> = self.reqs.iter().map(|r| f64::from(r.n)).collect();
        let elite: Vec<bool> = self.reqs.iter().map(|r| matches!(r.rows, Rows::Elite { .. })).collect();
        if shape.layer == 0 {
            for &t in &row_tokens {
                for (k, st) in self.stats.iter_mut().enumerate() {
                    if t as usize >= firsts[k] && !elite[k] {
                        st.n_rows[self.bucket[t as usize] as usize] += 1;
                    }
                }
            }
        }

        let n_tokens = self.stats[0].n_tokens;
        let scale = self.scale;
        let bucket = &self.bucket;
        let layer_len = n_head_kv * n_tokens;
        // work[g][k] = (text sums, media sums) of KV head g for request k
        let mut work: Vec<Vec<(&mut [f32], &mut [f32])>> = (0..n_head_kv).map(|_| Vec::new()).collect();
        for st in &mut self.stats {
            let (text_all, media_all) = st.data.split_at_mut(n_layer * layer_len);
            let text = &mut text_all[shape.layer * layer_len..][..layer_len];
            let media = &mut media_all[shape.layer * layer_len..][..layer_len];
            for (g, pair) in text.chunks_mut(n_tokens).zip(media.chunks_mut(n_tokens)).enumerate() {
                work[g].push(pair);
            }
        }
        let reduce_group = |(g, mut accs): (usize, Vec<(&mut [f32], &mut [f32])>)| {
            let mut e = Vec::with_capacity(cols.len());
            for h in g * group..(g + 1) * group {
                let slab = head_rows(h);
                for (r, &t) in row_tokens.iter().enumerate() {
                    let logits = &slab[r * shape.n_kv..(r + 1) * shape.n_kv];
                    let vis = &cols[..cols.partition_point(|&(_, u)| u <= t)];
                    // e[i] = exp(scale·x − max) for the i-th visible key, in token order
                    let mx = if identity {
                        logits[..vis.len()].iter().copied().fold(f32::NEG_INFINITY, f32::max) * scale
                    } else {
                        vis.iter().map(|&(j, _)| logits[j] * scale).fold(f32::NEG_INFINITY, f32::max)
                    };
                    if !mx.is_finite() {
                        continue;
                    }
                    e.clear();
                    if identity {
                        e.extend(logits[..vis.len()].iter().map(|&x| exp_neg(x * scale - mx)));
                    } else {
                        e.extend(vis.iter().map(|&(j, _)| exp_neg(logits[j] * scale - mx)));
                    }
                    let sum: f64 = e.chunks(256).map(|c| f64::from(c.iter().sum::<f32>())).sum();
                    let text_row = bucket[t as usize] == Bucket::Text;
                    for (k, (acc_text, acc_media)) in accs.iter_mut().enumerate() {
                        if (t as usize) < firsts[k] || elite[k] {
                            continue;
                        }
                        let denom = sum + if ns[k] > 0.0 { ns[k] * (-f64::from(mx)).exp() } else { 0.0 };
                        let w = (1.0 / (denom * group as f64)) as f32;
                        let acc: &mut [f32] = if text_row { acc_text } else { acc_media };
                        if identity {
                            for (a, &v) in acc[..e.len()].iter_mut().zip(&e) {
                                *a += v * w;
                            }
                        } else {
                            for (&(_, u), &v) in vis.iter().zip(&e) {
                                acc[u as usize] += v * w;
                            }
                        }
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
        for k in 0..self.reqs.len() {
            if let Rows::Elite { alpha, keep_sink } = self.reqs[k].rows {
                if firsts[k] < self.horizon {
                    self.reduce_elite(k, shape, &cols, &row_tokens, rows.start, alpha, keep_sink, head_rows);
                }
            }
        }
        self.ms += t0.elapsed().as_secs_f64() * 1e3;
    }

    /// AirCache's elite window for one layer (see [`Rows::Elite`]); `cols` are the visible
    /// (cell, token) pairs sorted by token, `row_tokens` the tokens of the slab rows (which start
    /// at ubatch row `row0`).
    #[allow(clippy::too_many_arguments)]
    fn reduce_elite<'s>(
        &mut self,
        k: usize,
        shape: KqShape,
        cols: &[(usize, u32)],
        row_tokens: &[u32],
        row0: usize,
        alpha: f32,
        keep_sink: bool,
        head_rows: &(dyn Fn(usize) -> &'s [f32] + Sync),
    ) {
        let last = (self.horizon - 1) as u32;
        let Some(r_last) = row_tokens.iter().position(|&t| t == last) else { return };
        let first_row = self.first_row(k);
        let scale = self.scale;
        let bucket = &self.bucket;
        let is_text = |u: u32| bucket[u as usize] == Bucket::Text;
        let row = |h: usize, r: usize| &head_rows(h)[r * shape.n_kv..(r + 1) * shape.n_kv];
        // 1. the last token's attention over text keys only, head mean
        let text_cols: Vec<(usize, u32)> = cols.iter().copied().filter(|&(_, u)| is_text(u) && u <= last).collect();
        let mut att = vec![0f64; text_cols.len()];
        for h in 0..shape.n_head {
            let x = row(h, r_last);
            let m = text_cols.iter().map(|&(j, _)| x[j] * scale).fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f64> = text_cols.iter().map(|&(j, _)| f64::from(x[j] * scale - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for (a, v) in att.iter_mut().zip(e) {
                *a += v / z / shape.n_head as f64;
            }
        }
        let eligible = |u: u32| keep_sink || u != 0;
        let top = text_cols.iter().zip(&att).filter(|((_, u), _)| eligible(*u)).map(|(_, &a)| a).fold(0.0, f64::max);
        let mut elite: Vec<u32> = text_cols
            .iter()
            .zip(&att)
            .filter(|((_, u), &a)| eligible(*u) && a >= f64::from(alpha) * top)
            .map(|((_, u), _)| *u)
            .collect();
        if !elite.contains(&last) {
            elite.push(last);
        }
        elite.sort_unstable();
        // 2. elite rows we have, over media keys + elite text keys
        let observed: Vec<(usize, u32)> = row_tokens
            .iter()
            .enumerate()
            .filter(|&(r, &t)| row0 + r >= first_row.saturating_sub(self.ubatch.0 as usize) && elite.binary_search(&t).is_ok())
            .map(|(r, &t)| (r, t))
            .collect();
        let n_head_kv = self.stats[k].n_head_kv;
        let group = (shape.n_head / n_head_kv).max(1);
        let n_tokens = self.stats[k].n_tokens;
        // keys of each observed elite row (the same for every head): media + elite text, causal
        let row_keys: Vec<Vec<(usize, u32)>> = observed
            .iter()
            .map(|&(_, t)| cols.iter().copied().filter(|&(_, u)| u <= t && (!is_text(u) || elite.binary_search(&u).is_ok())).collect())
            .collect();
        let st = &mut self.stats[k];
        st.n_rows = [observed.len(), 0];
        for h in 0..shape.n_head {
            let g = (h / group).min(n_head_kv - 1);
            let mut acc = vec![0f64; n_tokens];
            for (&(r, _), keys) in observed.iter().zip(&row_keys) {
                let x = row(h, r);
                let m = keys.iter().map(|&(j, _)| x[j] * scale).fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f64> = keys.iter().map(|&(j, _)| f64::from(x[j] * scale - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (&(_, u), v) in keys.iter().zip(e) {
                    if !is_text(u) {
                        acc[u as usize] += v / z;
                    }
                }
            }
            let w = 1.0 / (observed.len().max(1) * group) as f64;
            let col = st.column_mut(Bucket::Text, shape.layer, g);
            for (c, a) in col.iter_mut().zip(acc) {
                *c += (a * w) as f32;
            }
        }
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
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -90.0f32;
        while x <= 0.0 {
            let (a, b) = (f64::from(exp_neg(x)), f64::from(x).exp());
            if b > 1e-37 {
                worst = worst.max((a - b).abs() / b);
            } else {
                assert!(a < 1e-36);
            }
            x += 0.001_37;
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp_neg(0.0), 1.0);
        assert_eq!(exp_neg(-1000.0), exp_neg(-87.0));
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
