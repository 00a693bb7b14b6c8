//! The graph path: what a [`Reducer`]'s requests ask of llama.cpp's in-graph statistics (patch
//! 0005, flash attention left on) as a [`GraphPlan`], and the sums that come back placed into
//! the same [`AttentionStats`](super::AttentionStats) the host path fills.
//!
//! One variant per request (its n-softmax), two columns per request: `2k` gathers the text
//! query rows of request k's window, `2k + 1` the media rows. A window is `first_row..horizon`
//! ([`super::window::first_row`]). AirCache's elite window ([`Rows::Elite`]) depends on the
//! layer's own attention of the last row: its variant is an *elite* one (patch 0008) — column
//! `2k` marks the candidate rows (the text rows before the horizon and the last token), the
//! per-position key classes say which keys are text and which may be elite, and llama.cpp picks
//! the elite set per layer on the device and returns the elite rows' mean (media keys only),
//! as [`super::elite`] computes it on the host.
//! Rows and cells come back by *position*; the reducer maps positions to prompt tokens with the
//! table the engine gives when it installs the plan (positions move under `--kv-shift`).

use super::{window, Bucket, GraphPlan, GraphSums, Reducer, Rows};

/// Rows per chunk of the extra `QKᵀ`: bounds the extra compute buffer (at LLaVA-7B shapes,
/// 9k cells × 128 rows × 32 heads × 4 B ≈ 150 MB per tensor).
const ROWS_CHUNK: i32 = 128;

impl Reducer {
    /// Whether these requests can be computed in the graph.
    #[must_use]
    pub fn graph_capable(&self) -> bool {
        !self.reqs.is_empty() && 2 * self.reqs.len() <= GraphPlan::MAX_COLS
    }

    /// The plan for the prompt tokens still to be read, `n_read..`, and the position map: token
    /// `u < n_read` sits at `token_pos[u]` (−1: evicted), token `t ≥ n_read` will be written at
    /// `next_pos + (t − n_read)`. `None` when the requests cannot be computed in the graph.
    pub fn graph_plan(&mut self, n_read: usize, token_pos: &[i32], next_pos: i32) -> Option<GraphPlan> {
        if !self.graph_capable() {
            return None;
        }
        let l = self.bucket.len();
        let future = |t: usize| i64::from(next_pos) + (t - n_read) as i64;
        let n_pos = usize::try_from(future(l.max(n_read))).ok()?.max(token_pos.iter().filter_map(|&p| usize::try_from(p).ok()).map(|p| p + 1).max().unwrap_or(0));
        let mut token_of_pos = vec![-1i64; n_pos];
        for (u, &p) in token_pos.iter().enumerate().take(n_read) {
            if let Ok(p) = usize::try_from(p) {
                token_of_pos[p] = u as i64;
            }
        }
        let mut cols_of_pos = vec![0u64; n_pos];
        for t in n_read..l {
            let p = usize::try_from(future(t)).ok()?;
            token_of_pos[p] = t as i64;
        }
        let mut elite_alpha = Vec::new();
        let mut moments = Vec::new();
        for (k, req) in self.reqs.iter().enumerate() {
            if let Rows::Moments { skip } = req.rows {
                // every row still to be read from `skip` on, once (column 2k)
                for t in skip.max(n_read)..self.horizon {
                    cols_of_pos[future(t) as usize] |= 1u64 << (2 * k);
                }
                moments.resize(self.reqs.len(), 0);
                moments[k] = 1;
                continue;
            }
            if let Rows::Elite { alpha, .. } = req.rows {
                if self.horizon <= n_read {
                    // the anchor was read already: a variant without rows observes nothing
                    continue;
                }
                // candidates: the text rows still to be read before the horizon, and the last
                // token; llama.cpp keeps those of the ubatch that holds the last token
                for t in n_read..self.horizon {
                    if self.bucket[t] == Bucket::Text || t + 1 == self.horizon {
                        cols_of_pos[future(t) as usize] |= 1u64 << (2 * k);
                    }
                }
                elite_alpha.resize(self.reqs.len(), 0.0);
                elite_alpha[k] = alpha;
                continue;
            }
            let first = window::first_row(req.rows, self.horizon, (0, 0)).max(n_read);
            for t in first..self.horizon {
                let p = future(t) as usize;
                cols_of_pos[p] |= 1u64 << (2 * k + self.bucket[t] as usize);
            }
        }
        let (mut key_of_pos, mut elite_last) = (Vec::new(), -1);
        if !elite_alpha.is_empty() {
            let keep_sink = self.reqs.iter().any(|r| matches!(r.rows, Rows::Elite { keep_sink: true, .. }));
            key_of_pos = token_of_pos
                .iter()
                .map(|&u| match usize::try_from(u).ok().filter(|&u| u < l && self.bucket[u] == Bucket::Text) {
                    Some(u) if keep_sink || u != 0 => GraphPlan::KEY_TEXT | GraphPlan::KEY_ELIGIBLE,
                    Some(_) => GraphPlan::KEY_TEXT,
                    None => 0,
                })
                .collect();
            elite_last = i32::try_from(future(self.horizon - 1)).ok()?;
        }
        self.token_of_pos = token_of_pos;
        Some(GraphPlan {
            n: self.reqs.iter().map(|r| r.n).collect(),
            col_var: (0..2 * self.reqs.len()).map(|c| (c / 2) as i32).collect(),
            cols_of_pos,
            rows_chunk: ROWS_CHUNK,
            force_transpose: false,
            elite_alpha,
            key_of_pos,
            elite_last,
            moments,
        })
    }

    /// Places one layer's sums of one variant (request) into its statistics.
    ///
    /// # Errors
    /// Sums of a plan this reducer did not make.
    pub fn add_sums(&mut self, s: &GraphSums<'_>) -> Result<(), String> {
        let t0 = std::time::Instant::now();
        let Some(st) = self.stats.get_mut(s.var) else { return Err(format!("attention sums of variant {} (no such request)", s.var)) };
        if s.layer >= st.n_layer || (s.q_moments.is_none() && s.n_head_kv != st.n_head_kv) {
            return Err(format!("attention sums of layer {} with {} KV heads (expected < {} layers, {} heads)", s.layer, s.n_head_kv, st.n_layer, st.n_head_kv));
        }
        if let Some(q) = s.q_moments {
            // Expected Attention's query moments (the same rows in every layer)
            if !matches!(self.reqs.get(s.var).map(|r| r.rows), Some(Rows::Moments { .. })) {
                return Err(format!("query moments of variant {} (not a moments request)", s.var));
            }
            for &p in s.row_pos {
                if let Some(u) = usize::try_from(p).ok().and_then(|p| self.token_of_pos.get(p)).and_then(|&u| usize::try_from(u).ok()) {
                    self.graph_seen = self.graph_seen.max(u + 1);
                }
            }
            let n_layer = st.n_layer;
            let m = st.moments.get_or_insert_with(|| super::QueryMoments::new(n_layer, q.n_head, q.d));
            m.add(s.layer, s.row_pos.len(), q.n_head, q.d, q.data)?;
            self.ms += t0.elapsed().as_secs_f64() * 1e3;
            return Ok(());
        }
        let token = |p: i32| usize::try_from(p).ok().and_then(|p| self.token_of_pos.get(p)).and_then(|&u| usize::try_from(u).ok());
        let cells: Vec<(usize, usize)> = s.cell_pos.iter().enumerate().filter_map(|(j, &p)| token(p).filter(|&u| u < st.n_tokens).map(|u| (j, u))).collect();
        if let Some(&(_, u)) = cells.iter().max_by_key(|c| c.1) {
            self.graph_seen = self.graph_seen.max(u + 1);
        }
        let elite = matches!(self.reqs.get(s.var).map(|r| r.rows), Some(Rows::Elite { .. }));
        if elite {
            // the elite rows' mean, already normalised (as `elite::reduce` writes it)
            st.n_rows = [s.n_elite_rows, 0];
        } else if s.layer == 0 {
            for &p in s.row_pos {
                if let Some(u) = token(p).filter(|&u| u < self.bucket.len()) {
                    st.n_rows[self.bucket[u] as usize] += 1;
                }
            }
        }
        let n_cols = s.cols.len();
        for (ci, &c) in s.cols.iter().enumerate() {
            let bucket = if c % 2 == 0 { Bucket::Text } else { Bucket::Media };
            if usize::try_from(c / 2).ok() != Some(s.var) {
                return Err(format!("attention sums: column {c} is not request {}'s", s.var));
            }
            for h in 0..s.n_head_kv {
                let row = &s.sums[(h * n_cols + ci) * s.n_kv..][..s.n_kv];
                let acc = st.column_mut(bucket, s.layer, h);
                for &(j, u) in &cells {
                    acc[u] += row[j];
                }
            }
        }
        self.ms += t0.elapsed().as_secs_f64() * 1e3;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Reducer, Rows, StatRequest};
    use crate::span::Modality;

    #[test]
    fn plans_mark_each_window_by_position_and_modality() {
        let m = [Modality::Text, Modality::Image, Modality::Image, Modality::Text, Modality::Text];
        let reqs = vec![StatRequest { rows: Rows::All, n: 0.0 }, StatRequest { rows: Rows::Last(2), n: 1.0 }];
        let mut r = Reducer::new(reqs, &m, 1, 1, 1.0, 1);
        let plan = r.graph_plan(0, &[], 0).unwrap();
        assert_eq!(plan.n, vec![0.0, 1.0]);
        assert_eq!(plan.col_var, vec![0, 0, 1, 1]);
        // H2O: every row, text → column 0, image → 1; last 2 rows (text) → column 2
        assert_eq!(plan.cols_of_pos, vec![0b0001, 0b0010, 0b0010, 0b0101, 0b0101]);
        // a bounded prefill after reading 3 tokens, token 1 evicted and positions shifted: the
        // next token goes to position 2
        r.set_horizon(5);
        let plan = r.graph_plan(3, &[0, -1, 1], 2).unwrap();
        assert_eq!(plan.cols_of_pos, vec![0, 0, 0b0101, 0b0101]);
        assert!(plan.elite_alpha.is_empty() && plan.key_of_pos.is_empty());
    }

    #[test]
    fn elite_plans_mark_candidates_and_key_classes() {
        let m = [Modality::Text, Modality::Image, Modality::Image, Modality::Text, Modality::Text];
        let reqs = vec![StatRequest { rows: Rows::Last(2), n: 1.0 }, StatRequest { rows: Rows::Elite { alpha: 0.5, keep_sink: false }, n: 0.0 }];
        let mut r = Reducer::new(reqs, &m, 1, 1, 1.0, 1);
        assert!(r.graph_capable());
        let plan = r.graph_plan(0, &[], 0).unwrap();
        assert_eq!(plan.elite_alpha, vec![0.0, 0.5]);
        // elite candidates (column 2): the text rows; the window (columns 0/1): the last two
        assert_eq!(plan.cols_of_pos, vec![0b0100, 0, 0, 0b0101, 0b0101]);
        // token 0 is text but not eligible without keep_sink; images are media keys
        assert_eq!(plan.key_of_pos, vec![1, 0, 0, 3, 3]);
        assert_eq!(plan.elite_last, 4);
        // a prompt ending with an image: the last token is a candidate too
        let m2 = [Modality::Text, Modality::Text, Modality::Image];
        let mut r2 = Reducer::new(vec![StatRequest { rows: Rows::Elite { alpha: 0.9, keep_sink: true }, n: 0.0 }], &m2, 1, 1, 1.0, 1);
        let plan = r2.graph_plan(0, &[], 0).unwrap();
        assert_eq!(plan.cols_of_pos, vec![0b01, 0b01, 0b01]);
        assert_eq!(plan.key_of_pos, vec![3, 3, 0]);
    }

    #[test]
    fn sums_land_on_the_tokens_their_cells_hold() {
        let m = [Modality::Text, Modality::Image, Modality::Text];
        let mut r = Reducer::new(vec![StatRequest { rows: Rows::All, n: 0.0 }], &m, 2, 1, 1.0, 1);
        r.graph_plan(0, &[], 0).unwrap();
        // cells 0..4 hold positions 2, 0, (empty), 1; two local columns (text, media)
        let sums = [1.0, 2.0, 9.0, 3.0, /* media */ 10.0, 20.0, 90.0, 30.0];
        let s = super::GraphSums { layer: 1, var: 0, n_kv: 4, n_head_kv: 1, cols: &[0, 1], sums: &sums, cell_pos: &[2, 0, -1, 1], row_pos: &[0, 1, 2], n_elite_rows: 0, q_moments: None };
        r.add_sums(&s).unwrap();
        let st = &r.stats()[0];
        assert_eq!(st.column(super::Bucket::Text, 1, 0), &[2.0, 3.0, 1.0]);
        assert_eq!(st.column(super::Bucket::Media, 1, 0), &[20.0, 30.0, 10.0]);
        assert_eq!(st.n_rows, [0, 0], "rows are counted once, at layer 0");
        assert_eq!(r.tokens_seen(), 3);
        let bad = super::GraphSums { var: 3, ..s };
        assert!(r.add_sums(&bad).is_err());
    }
}
