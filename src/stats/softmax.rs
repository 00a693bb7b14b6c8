//! One query row's probabilities: scale the raw logits, mask them causally (the keys at prompt
//! indices ≤ the row's), and normalise with the n-softmax `exp(x_j) / (n + Σ exp(x_i))`
//! (n = 0: the ordinary softmax), weighted by 1/group so the query heads sharing a KV head are
//! averaged. The hot loop runs in f32 with [`exp_neg`]; sums are carried in f64.

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

/// The causal mask: of the `(cell, token)` keys sorted by token, those a query at token `t`
/// sees.
#[inline]
pub(super) fn causal(keys: &[(usize, u32)], t: u32) -> &[(usize, u32)] {
    &keys[..keys.partition_point(|&(_, u)| u <= t)]
}

/// Fills `e[i] = exp(scale·x − max)` for the i-th visible key `vis[i]` (in token order) of the
/// row `logits` (one value per cell; with `identity`, key i is cell i) and returns the max and
/// `Σ e`; `None` when no visible logit is finite.
#[inline]
pub(super) fn exponentials(logits: &[f32], vis: &[(usize, u32)], identity: bool, scale: f32, e: &mut Vec<f32>) -> Option<(f32, f64)> {
    let mx = if identity {
        logits[..vis.len()].iter().copied().fold(f32::NEG_INFINITY, f32::max) * scale
    } else {
        vis.iter().map(|&(j, _)| logits[j] * scale).fold(f32::NEG_INFINITY, f32::max)
    };
    if !mx.is_finite() {
        return None;
    }
    e.clear();
    if identity {
        e.extend(logits[..vis.len()].iter().map(|&x| exp_neg(x * scale - mx)));
    } else {
        e.extend(vis.iter().map(|&(j, _)| exp_neg(logits[j] * scale - mx)));
    }
    let sum: f64 = e.chunks(256).map(|c| f64::from(c.iter().sum::<f32>())).sum();
    Some((mx, sum))
}

/// The factor turning a row's exponentials into n-softmax probabilities averaged over the
/// `group` query heads of a KV head: `1 / ((Σ e + n·e^{−max}) · group)`.
#[inline]
pub(super) fn weight(sum: f64, mx: f32, n: f64, group: usize) -> f32 {
    let denom = sum + if n > 0.0 { n * (-f64::from(mx)).exp() } else { 0.0 };
    (1.0 / (denom * group as f64)) as f32
}

/// Adds `w · e[i]` to the column of the i-th visible key's token.
#[inline]
pub(super) fn accumulate(acc: &mut [f32], vis: &[(usize, u32)], e: &[f32], identity: bool, w: f32) {
    if identity {
        for (a, &v) in acc[..e.len()].iter_mut().zip(e) {
            *a += v * w;
        }
    } else {
        for (&(_, u), &v) in vis.iter().zip(e) {
            acc[u as usize] += v * w;
        }
    }
}

/// Softmax in f64 of the row `x` over the keys `keys` (`(cell, token)`): the exponentials
/// `exp(scale·x − max)` in key order, and their sum (the slow, exact path of small reductions).
pub(super) fn exp_f64(x: &[f32], keys: &[(usize, u32)], scale: f32) -> (Vec<f64>, f64) {
    let m = keys.iter().map(|&(j, _)| x[j] * scale).fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = keys.iter().map(|&(j, _)| f64::from(x[j] * scale - m).exp()).collect();
    let z: f64 = e.iter().sum();
    (e, z)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
