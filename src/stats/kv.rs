//! Statistics of the cached keys and values themselves — no attention: what KNorm, value-norm
//! ranking and KeyDiff score tokens by. llama.cpp computes them on the device after the prefill
//! (or at a bounded eviction) with our patch `0009-kv-stats-scan` ([`crate::llama::Context::kv_scan`]);
//! [`KvStats::from_scan`] maps its cells to prompt tokens.
//!
//! Shapes: each statistic is `[layer][kv head][token]`, like [`super::AttentionStats`]'s columns.
//! Keys are post-RoPE as cached: norms and cosines do not change under RoPE's rotation.

use std::collections::HashMap;

use crate::llama::KvScanLayer;

/// Which statistics of the cache a policy needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvRequest {
    /// `‖k‖₂` per token and KV head (KNorm).
    pub knorm: bool,
    /// `‖v‖₂` (value-norm ranking).
    pub vnorm: bool,
    /// `cos(k, ā)`, `ā` the mean unit key of the KV head over every cached token (KeyDiff).
    pub keydiff: bool,
    /// Expected Attention's `z` per token and query head, from the query moments the policy
    /// observed ([`super::Rows::Moments`]).
    pub expected: Option<ExpectedRequest>,
}

/// How Expected Attention's query distribution is formed from the observed moments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpectedRequest {
    /// Future query positions the mean rotation averages over (from the next position on).
    pub n_future: usize,
    /// Use the covariance (else the mean only).
    pub cov: bool,
}

impl KvRequest {
    /// The union of two requests.
    #[must_use]
    pub fn union(self, o: Self) -> Self {
        Self { knorm: self.knorm || o.knorm, vnorm: self.vnorm || o.vnorm, keydiff: self.keydiff || o.keydiff, expected: self.expected.or(o.expected) }
    }
}

/// One statistic, `[layer][kv head][token]`.
#[derive(Debug, Clone, PartialEq)]
struct Table {
    data: Vec<f32>,
}

/// The cache statistics of a prompt's tokens (see the module doc).
#[derive(Debug, Clone, PartialEq)]
pub struct KvStats {
    /// Layers.
    pub n_layer: usize,
    /// KV heads.
    pub n_head_kv: usize,
    /// Tokens (columns).
    pub n_tokens: usize,
    knorm: Option<Table>,
    vnorm: Option<Table>,
    keydiff: Option<Table>,
    /// Query heads of `z`.
    pub n_head: usize,
    /// Expected Attention's `z`, `[layer][query head][token]`.
    z: Option<Table>,
}

impl KvStats {
    /// Zeros for what `req` asks (tests and hand-built statistics fill them in).
    #[must_use]
    pub fn new(n_layer: usize, n_head_kv: usize, n_tokens: usize, req: KvRequest) -> Self {
        Self::with_heads(n_layer, n_head_kv, n_head_kv, n_tokens, req)
    }

    /// Zeros, with `n_head` query heads for Expected Attention's `z`.
    #[must_use]
    pub fn with_heads(n_layer: usize, n_head_kv: usize, n_head: usize, n_tokens: usize, req: KvRequest) -> Self {
        let table = |on: bool, heads: usize| on.then(|| Table { data: vec![0.0; n_layer * heads * n_tokens] });
        Self {
            n_layer,
            n_head_kv,
            n_tokens,
            knorm: table(req.knorm, n_head_kv),
            vnorm: table(req.vnorm, n_head_kv),
            keydiff: table(req.keydiff, n_head_kv),
            n_head,
            z: table(req.expected.is_some(), n_head),
        }
    }

    /// From a scan of the cache: column `i` is the cell at position `positions[i]`. Cells at
    /// other positions are ignored; a token without a cell in some layer is an error, as is a
    /// layer missing from the scan or a statistic `req` asked for that the scan lacks.
    ///
    /// # Errors
    /// A one-line reason.
    pub fn from_scan(scan: &[KvScanLayer], n_layer: usize, positions: &[i32], req: KvRequest) -> Result<Self, String> {
        let n_head_kv = scan.iter().map(|l| l.n_head_kv).max().unwrap_or(0);
        let n_head = scan.iter().map(|l| l.n_head).max().unwrap_or(0);
        let mut out = Self::with_heads(n_layer, n_head_kv, n_head, positions.len(), req);
        let column: HashMap<i32, usize> = positions.iter().enumerate().map(|(i, &p)| (p, i)).collect();
        let mut seen = vec![false; n_layer];
        for l in scan {
            if let (Some(z), Some(table)) = (&l.z, &mut out.z) {
                // Expected Attention's scan: `z` only, `[query head][cell]`
                if l.layer >= n_layer || l.n_head != n_head || z.len() != n_head * l.cell_pos.len() {
                    return Err(format!("the Expected Attention scan returned layer {} with {} heads", l.layer, l.n_head));
                }
                seen[l.layer] = true;
                let mut found = 0;
                for (c, &pos) in l.cell_pos.iter().enumerate() {
                    let Some(&t) = column.get(&pos) else { continue };
                    found += 1;
                    for h in 0..n_head {
                        table.data[(l.layer * n_head + h) * positions.len() + t] = z[h * l.cell_pos.len() + c];
                    }
                }
                if found != positions.len() {
                    return Err(format!("the Expected Attention scan found {found} of {} tokens in layer {}", positions.len(), l.layer));
                }
                continue;
            }
            if l.layer >= n_layer || l.n_head_kv != n_head_kv {
                return Err(format!("the KV scan returned layer {} with {} KV heads (expected < {n_layer} layers of {n_head_kv})", l.layer, l.n_head_kv));
            }
            seen[l.layer] = true;
            let mut found = 0;
            for (c, &pos) in l.cell_pos.iter().enumerate() {
                let Some(&t) = column.get(&pos) else { continue };
                found += 1;
                for (table, src) in [(&mut out.knorm, &l.knorm), (&mut out.vnorm, &l.vnorm), (&mut out.keydiff, &l.kdiff)] {
                    let Some(table) = table else { continue };
                    let src = src.as_ref().ok_or("the KV scan lacks a statistic that was asked for")?;
                    for h in 0..n_head_kv {
                        table.data[(l.layer * n_head_kv + h) * positions.len() + t] = src[c * n_head_kv + h];
                    }
                }
            }
            if found != positions.len() {
                return Err(format!("the KV scan found {found} of {} tokens in layer {}", positions.len(), l.layer));
            }
        }
        if let Some(l) = seen.iter().position(|s| !s) {
            return Err(format!("the KV scan has no layer {l}"));
        }
        Ok(out)
    }

    fn row<'a>(&self, t: &'a Option<Table>, layer: usize, head: usize) -> Option<&'a [f32]> {
        let o = (layer * self.n_head_kv + head) * self.n_tokens;
        t.as_ref().map(|t| &t.data[o..o + self.n_tokens])
    }

    fn row_mut<'a>(n_head_kv: usize, n_tokens: usize, t: &'a mut Option<Table>, layer: usize, head: usize) -> Option<&'a mut [f32]> {
        let o = (layer * n_head_kv + head) * n_tokens;
        t.as_mut().map(|t| &mut t.data[o..o + n_tokens])
    }

    /// `‖k‖₂` of every token in one (layer, KV head), when scanned.
    #[must_use]
    pub fn knorm(&self, layer: usize, head: usize) -> Option<&[f32]> {
        self.row(&self.knorm, layer, head)
    }

    /// `‖v‖₂`.
    #[must_use]
    pub fn vnorm(&self, layer: usize, head: usize) -> Option<&[f32]> {
        self.row(&self.vnorm, layer, head)
    }

    /// `cos(k, ā)`.
    #[must_use]
    pub fn keydiff(&self, layer: usize, head: usize) -> Option<&[f32]> {
        self.row(&self.keydiff, layer, head)
    }

    /// Expected Attention's `z` of every token for one (layer, query head), when scanned.
    #[must_use]
    pub fn z(&self, layer: usize, head: usize) -> Option<&[f32]> {
        let o = (layer * self.n_head + head) * self.n_tokens;
        self.z.as_ref().map(|t| &t.data[o..o + self.n_tokens])
    }

    /// Mutable `z` (tests).
    pub fn z_mut(&mut self, layer: usize, head: usize) -> Option<&mut [f32]> {
        let o = (layer * self.n_head + head) * self.n_tokens;
        self.z.as_mut().map(|t| &mut t.data[o..o + self.n_tokens])
    }

    /// Mutable `‖k‖₂` (tests).
    pub fn knorm_mut(&mut self, layer: usize, head: usize) -> Option<&mut [f32]> {
        Self::row_mut(self.n_head_kv, self.n_tokens, &mut self.knorm, layer, head)
    }

    /// Mutable `‖v‖₂` (tests).
    pub fn vnorm_mut(&mut self, layer: usize, head: usize) -> Option<&mut [f32]> {
        Self::row_mut(self.n_head_kv, self.n_tokens, &mut self.vnorm, layer, head)
    }

    /// Mutable `cos(k, ā)` (tests).
    pub fn keydiff_mut(&mut self, layer: usize, head: usize) -> Option<&mut [f32]> {
        Self::row_mut(self.n_head_kv, self.n_tokens, &mut self.keydiff, layer, head)
    }
}

/// KeyDiff's score on the host, for tests and hand-built keys: `cos(k_j, ā)` with `ā` the mean of
/// the unit keys (`keys`: one key per token, all of one length).
#[must_use]
pub fn keydiff_cosines(keys: &[Vec<f64>]) -> Vec<f64> {
    let unit = |k: &[f64]| {
        let n = k.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        k.iter().map(|x| x / n).collect::<Vec<_>>()
    };
    let d = keys.first().map_or(0, Vec::len);
    let mut a = vec![0.0; d];
    for k in keys {
        for (a, x) in a.iter_mut().zip(unit(k)) {
            *a += x / keys.len() as f64;
        }
    }
    let a = unit(&a);
    keys.iter().map(|k| unit(k).iter().zip(&a).map(|(x, y)| x * y).sum()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keydiff_known_answer() {
        // t2 = 5·t1: the same cosine (norm-invariant); the anchor is (0.8, 0.2) before norming
        let keys = vec![vec![0.0, 1.0], vec![1.0, 0.0], vec![5.0, 0.0], vec![1.0, 0.0], vec![1.0, 0.0]];
        let c = keydiff_cosines(&keys);
        let want = [0.242_535_6, 0.970_142_5, 0.970_142_5, 0.970_142_5, 0.970_142_5];
        for (c, w) in c.iter().zip(want) {
            assert!((c - w).abs() < 1e-6, "{c} vs {w}");
        }
    }

    #[test]
    fn scan_cells_map_to_tokens_by_position() {
        let req = KvRequest { knorm: true, ..KvRequest::default() };
        // two layers, one head; cells hold positions 7, 3, 5 (holes and order do not matter)
        let layer = |i: usize, base: f32| KvScanLayer {
            layer: i,
            n_head_kv: 1,
            cell_pos: vec![7, 3, 9, 5],
            knorm: Some(vec![base + 7.0, base + 3.0, base + 9.0, base + 5.0]),
            vnorm: None,
            kdiff: None,
            ..KvScanLayer::default()
        };
        let s = KvStats::from_scan(&[layer(0, 0.0), layer(1, 100.0)], 2, &[3, 5, 7], req).unwrap();
        assert_eq!(s.knorm(0, 0).unwrap(), &[3.0, 5.0, 7.0]);
        assert_eq!(s.knorm(1, 0).unwrap(), &[103.0, 105.0, 107.0]);
        assert!(s.vnorm(0, 0).is_none());
        // a token the cache does not hold, a missing layer, a missing statistic: errors
        assert!(KvStats::from_scan(&[layer(0, 0.0), layer(1, 0.0)], 2, &[3, 4], req).is_err());
        assert!(KvStats::from_scan(&[layer(0, 0.0)], 2, &[3], req).is_err());
        assert!(KvStats::from_scan(&[layer(0, 0.0), layer(1, 0.0)], 2, &[3], KvRequest { vnorm: true, ..req }).is_err());
    }
}
