//! Moments of the prompt's pre-RoPE queries, per (layer, query head) — what Expected Attention
//! estimates future queries from (`Rows::Moments`; the in-graph observer computes the sums,
//! patch 0013) — and the mean RoPE rotation that carries them to the positions of future
//! queries.
//!
//! Shapes: `s1 [layer][head][d]` = Σ q, `s2 [layer][head][d][d]` = Σ q qᵀ, accumulated in f64
//! over the observed rows (the same rows in every layer).

/// Running sums of the observed query rows (see the module doc).
#[derive(Debug, Clone, PartialEq)]
pub struct QueryMoments {
    /// Layers.
    pub n_layer: usize,
    /// Query heads.
    pub n_head: usize,
    /// Head size.
    pub d: usize,
    /// Rows summed, per layer.
    pub rows: Vec<usize>,
    s1: Vec<f64>,
    s2: Vec<f64>,
}

/// How a model rotates queries and keys (llama.cpp's RoPE parameters).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    /// Rotated dimensions (`rope.dimension_count`; the head size when absent).
    pub n_rot: usize,
    /// `rope.freq_base`.
    pub freq_base: f64,
    /// The trained frequency scale (`1 / rope.scaling.factor` for linear scaling).
    pub freq_scale: f64,
    /// NEOX layout (pairs `(i, i + n_rot/2)`) instead of NORM (pairs `(2i, 2i + 1)`).
    pub neox: bool,
}

impl Rope {
    /// The pairs of dimensions rotated together, with each pair's index `i` (θ_i = base^(−2i/n_rot)).
    fn pairs(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        (0..self.n_rot / 2).map(move |i| if self.neox { (i, i, i + self.n_rot / 2) } else { (i, 2 * i, 2 * i + 1) })
    }

    /// The mean rotation over positions `p0..p0 + n`: per pair, `(mean cos pθ_i, mean sin pθ_i)`.
    #[must_use]
    pub fn mean_rotation(&self, p0: usize, n: usize) -> Vec<(f64, f64)> {
        let n = n.max(1);
        (0..self.n_rot / 2)
            .map(|i| {
                let theta = self.freq_scale * self.freq_base.powf(-2.0 * i as f64 / self.n_rot as f64);
                let (mut c, mut s) = (0.0, 0.0);
                for p in p0..p0 + n {
                    let a = p as f64 * theta;
                    c += a.cos();
                    s += a.sin();
                }
                (c / n as f64, s / n as f64)
            })
            .collect()
    }

    /// `R̄ x` in place (`rot` from [`Rope::mean_rotation`]; dimensions past `n_rot` unchanged).
    pub fn rotate(&self, rot: &[(f64, f64)], x: &mut [f64]) {
        for (i, a, b) in self.pairs() {
            let (c, s) = rot[i];
            let (xa, xb) = (x[a], x[b]);
            x[a] = c * xa - s * xb;
            x[b] = s * xa + c * xb;
        }
    }
}

impl QueryMoments {
    /// No rows yet.
    #[must_use]
    pub fn new(n_layer: usize, n_head: usize, d: usize) -> Self {
        Self { n_layer, n_head, d, rows: vec![0; n_layer], s1: vec![0.0; n_layer * n_head * d], s2: vec![0.0; n_layer * n_head * d * d] }
    }

    /// Adds one layer's sums over `n_rows` rows: `data` is `[n_head][1 + d][d]` (per head the
    /// sum of the rows, then the sum of their outer products), as llama.cpp returns them.
    ///
    /// # Errors
    /// A layer or shape that does not match.
    pub fn add(&mut self, layer: usize, n_rows: usize, n_head: usize, d: usize, data: &[f32]) -> Result<(), String> {
        if layer >= self.n_layer || n_head != self.n_head || d != self.d || data.len() != n_head * (1 + d) * d {
            return Err(format!("query moments of layer {layer} with {n_head} heads of {d} (expected < {} layers, {} heads of {})", self.n_layer, self.n_head, self.d));
        }
        self.rows[layer] += n_rows;
        for h in 0..n_head {
            let src = &data[h * (1 + d) * d..(h + 1) * (1 + d) * d];
            let o = (layer * n_head + h) * d;
            for (acc, &x) in self.s1[o..o + d].iter_mut().zip(&src[..d]) {
                *acc += f64::from(x);
            }
            for (acc, &x) in self.s2[o * d..(o + d) * d].iter_mut().zip(&src[d..]) {
                *acc += f64::from(x);
            }
        }
        Ok(())
    }

    /// Mean and population covariance of one (layer, head)'s rows (zeros without rows).
    #[must_use]
    pub fn mean_cov(&self, layer: usize, head: usize) -> (Vec<f64>, Vec<f64>) {
        let d = self.d;
        let n = self.rows[layer].max(1) as f64;
        let o = (layer * self.n_head + head) * d;
        let mu: Vec<f64> = self.s1[o..o + d].iter().map(|s| s / n).collect();
        let mut cov: Vec<f64> = self.s2[o * d..(o + d) * d].iter().map(|s| s / n).collect();
        for i in 0..d {
            for j in 0..d {
                cov[i * d + j] -= mu[i] * mu[j];
            }
        }
        (mu, cov)
    }

    /// Expected Attention's query distribution for queries at positions `p0..p0 + n_future`:
    /// per (layer, head) `μ′ = R̄ μ` and (with `cov`) `Σ′ = R̄ Σ R̄ᵀ`, as the F32 arrays
    /// `[layer][head][d]` and `[layer][head][d][d]` llama.cpp's scan takes.
    #[must_use]
    pub fn future(&self, rope: &Rope, p0: usize, n_future: usize, cov: bool) -> (Vec<f32>, Option<Vec<f32>>) {
        let d = self.d;
        let rot = rope.mean_rotation(p0, n_future);
        let mut mu_out = Vec::with_capacity(self.n_layer * self.n_head * d);
        let mut cov_out = cov.then(|| Vec::with_capacity(self.n_layer * self.n_head * d * d));
        let mut col = vec![0.0; d];
        for layer in 0..self.n_layer {
            for head in 0..self.n_head {
                let (mut mu, mut c) = self.mean_cov(layer, head);
                rope.rotate(&rot, &mut mu);
                mu_out.extend(mu.iter().map(|&x| x as f32));
                if let Some(out) = &mut cov_out {
                    // R̄ Σ R̄ᵀ: rotate every row (Σ R̄ᵀ, as Σ is symmetric), then every column
                    for row in c.chunks_mut(d) {
                        rope.rotate(&rot, row);
                    }
                    for j in 0..d {
                        for i in 0..d {
                            col[i] = c[i * d + j];
                        }
                        rope.rotate(&rot, &mut col);
                        for i in 0..d {
                            c[i * d + j] = col[i];
                        }
                    }
                    out.extend(c.iter().map(|&x| x as f32));
                }
            }
        }
        (mu_out, cov_out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_rotation_known_answers() {
        // d = 2, θ = 1: one position is the rotation itself; positions 0 and 1 average I and R(1)
        let rope = Rope { n_rot: 2, freq_base: 10000.0, freq_scale: 1.0, neox: false };
        let r = rope.mean_rotation(0, 1);
        assert!((r[0].0 - 1.0).abs() < 1e-12 && r[0].1.abs() < 1e-12);
        let r = rope.mean_rotation(0, 2);
        assert!((r[0].0 - 0.770_151_1).abs() < 1e-6 && (r[0].1 - 0.420_735_5).abs() < 1e-6, "{r:?}");
        let mut x = vec![1.0, 0.0];
        rope.rotate(&r, &mut x);
        assert!((x[0] - 0.770_151_1).abs() < 1e-6 && (x[1] - 0.420_735_5).abs() < 1e-6);
        // dimensions past n_rot are untouched; NEOX pairs (i, i + n_rot/2)
        let rope4 = Rope { n_rot: 4, freq_base: 10000.0, freq_scale: 1.0, neox: true };
        let r = rope4.mean_rotation(3, 1);
        let mut x = vec![1.0, 0.0, 0.0, 0.0, 7.0];
        rope4.rotate(&r, &mut x);
        assert!((x[0] - 3f64.cos()).abs() < 1e-12 && (x[2] - 3f64.sin()).abs() < 1e-12 && x[1] == 0.0 && x[4] == 7.0, "{x:?}");
        let norm = Rope { neox: false, ..rope4 };
        let mut x = vec![1.0, 0.0, 0.0, 0.0];
        norm.rotate(&r, &mut x);
        assert!((x[0] - 3f64.cos()).abs() < 1e-12 && (x[1] - 3f64.sin()).abs() < 1e-12 && x[2] == 0.0);
    }

    #[test]
    fn moments_give_mean_and_population_covariance() {
        // one layer, one head, d = 2; rows (1, 2) and (3, 6) in two ubatches
        let mut m = QueryMoments::new(1, 1, 2);
        let ub = |q: [f32; 2]| [q[0], q[1], q[0] * q[0], q[0] * q[1], q[1] * q[0], q[1] * q[1]];
        m.add(0, 1, 1, 2, &ub([1.0, 2.0])).unwrap();
        m.add(0, 1, 1, 2, &ub([3.0, 6.0])).unwrap();
        let (mu, cov) = m.mean_cov(0, 0);
        assert_eq!(mu, vec![2.0, 4.0]);
        assert_eq!(cov, vec![1.0, 2.0, 2.0, 4.0]);
        assert!(m.add(1, 1, 1, 2, &ub([0.0, 0.0])).is_err());
        assert!(m.add(0, 1, 2, 2, &ub([0.0, 0.0])).is_err());
        // Σ′ = R̄ Σ R̄ᵀ against a direct product; μ′ = R̄ μ
        let rope = Rope { n_rot: 2, freq_base: 10000.0, freq_scale: 1.0, neox: false };
        let (mu2, cov2) = m.future(&rope, 5, 3, true);
        let r = rope.mean_rotation(5, 3)[0];
        let rm = [[r.0, -r.1], [r.1, r.0]];
        let want_mu = [rm[0][0] * 2.0 + rm[0][1] * 4.0, rm[1][0] * 2.0 + rm[1][1] * 4.0];
        let s = [[1.0, 2.0], [2.0, 4.0]];
        let cov2 = cov2.unwrap();
        for i in 0..2 {
            assert!((f64::from(mu2[i]) - want_mu[i]).abs() < 1e-5);
            for j in 0..2 {
                let mut want = 0.0;
                for a in 0..2 {
                    for b in 0..2 {
                        want += rm[i][a] * s[a][b] * rm[j][b];
                    }
                }
                assert!((f64::from(cov2[i * 2 + j]) - want).abs() < 1e-5, "{i}{j}: {} vs {want}", cov2[i * 2 + j]);
            }
        }
    }
}
