//! AirCache's elite observation window (methods §3.2, [`super::Rows::Elite`]), per layer:
//!
//! 1. the last prompt token's attention over the text keys only (softmax, mean over query
//!    heads) picks the elite text keys: those at least `alpha` times the strongest (the first
//!    token only with `keep_sink`), plus the last token itself;
//! 2. each elite query row present in the final ubatch attends over the media keys and the
//!    elite text keys only (causal); the media columns of the text bucket get the mean of those
//!    rows' probabilities.
//!
//! Both softmaxes run in f64 over few rows ([`super::softmax::exp_f64`]).

use super::softmax::exp_f64;
use super::{AttentionStats, Bucket, LayerRows};

/// Adds one layer's elite-window statistics to `st`; `last` is the prompt's last token (the
/// horizon's), which must be one of the slab's rows (else nothing happens). Called for the
/// ubatch that holds it, whose rows all count.
pub(super) fn reduce(st: &mut AttentionStats, layer: &LayerRows<'_, '_>, last: u32, alpha: f32, keep_sink: bool) {
    let shape = layer.shape;
    let cols = &layer.keys.cols;
    let row_tokens = layer.row_tokens;
    let Some(r_last) = row_tokens.iter().position(|&t| t == last) else { return };
    // 1. the last token's attention over text keys only, head mean
    let text_cols: Vec<(usize, u32)> = cols.iter().copied().filter(|&(_, u)| layer.is_text(u) && u <= last).collect();
    let mut att = vec![0f64; text_cols.len()];
    for h in 0..shape.n_head {
        let (e, z) = exp_f64(layer.row(h, r_last), &text_cols, layer.scale);
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
    let observed: Vec<(usize, u32)> = row_tokens.iter().enumerate().filter(|&(_, &t)| elite.binary_search(&t).is_ok()).map(|(r, &t)| (r, t)).collect();
    let n_head_kv = st.n_head_kv;
    let group = (shape.n_head / n_head_kv).max(1);
    let n_tokens = st.n_tokens;
    // keys of each observed elite row (the same for every head): media + elite text, causal
    let row_keys: Vec<Vec<(usize, u32)>> = observed
        .iter()
        .map(|&(_, t)| cols.iter().copied().filter(|&(_, u)| u <= t && (!layer.is_text(u) || elite.binary_search(&u).is_ok())).collect())
        .collect();
    st.n_rows = [observed.len(), 0];
    for h in 0..shape.n_head {
        let g = (h / group).min(n_head_kv - 1);
        let mut acc = vec![0f64; n_tokens];
        for (&(r, _), keys) in observed.iter().zip(&row_keys) {
            let (e, z) = exp_f64(layer.row(h, r), keys, layer.scale);
            for (&(_, u), v) in keys.iter().zip(e) {
                if !layer.is_text(u) {
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
