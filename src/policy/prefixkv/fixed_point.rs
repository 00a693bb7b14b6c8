//! PrefixKV's decode-time part: ElasticCache's fixed-point eviction (methods §2.3), a
//! [`DecodeEviction`].

use crate::policy::DecodeEviction;

/// Offset of the fixed eviction slot from the end of the compressed prompt.
pub const DISTANCE: isize = -25;

/// ElasticCache's fixed-point eviction at decode, per layer (methods §2.3): entries stay in
/// position order; once a layer holds more than `(1 − r_ℓ)·T` of the `T` tokens seen, the entry
/// at its fixed slot is dropped (at most one per step).
#[derive(Debug, Clone, PartialEq)]
pub struct FixedPoint {
    layers: Vec<FifoLayer>,
    seen: usize,
}

#[derive(Debug, Clone, PartialEq)]
struct FifoLayer {
    forget: f64,
    slot: usize,
    /// Entries (prompt token indices, then generated tokens as `L + i`), in position order.
    entries: Vec<usize>,
}

impl FixedPoint {
    /// From each layer's kept prompt tokens (ascending) and forget fractions.
    #[must_use]
    pub fn new(kept: &[Vec<usize>], forget: &[f64], l: usize) -> Self {
        let layers = kept
            .iter()
            .zip(forget)
            .map(|(k, &r)| {
                let compressed = l as isize - (r * l as f64).round() as isize;
                let slot = compressed + DISTANCE;
                let slot = if slot < 1 { k.len() / 2 } else { slot as usize };
                FifoLayer { forget: r, slot, entries: k.clone() }
            })
            .collect();
        Self { layers, seen: l }
    }

    /// A token (index `L + i`) was decoded into every layer: returns the (layer, token) pairs
    /// dropped after it.
    pub fn step(&mut self, token: usize) -> Vec<(usize, usize)> {
        self.seen += 1;
        let seen = self.seen as f64;
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            layer.entries.push(token);
            let over = (layer.entries.len() as f64 - seen * (1.0 - layer.forget)) as i64;
            if over > 0 && layer.slot < layer.entries.len() {
                out.push((i, layer.entries.remove(layer.slot)));
            }
        }
        out
    }

    /// Renames the entries (prompt token indices → the positions they have in the cache, when
    /// the cache holds a subset of the prompt or positions were shifted).
    pub fn remap(&mut self, f: impl Fn(usize) -> usize) {
        for layer in &mut self.layers {
            layer.entries.iter_mut().for_each(|e| *e = f(*e));
        }
    }

    /// Entries each layer holds now.
    #[must_use]
    pub fn sizes(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.entries.len()).collect()
    }
}

impl DecodeEviction for FixedPoint {
    fn remap(&mut self, to_pos: &dyn Fn(usize) -> usize) {
        FixedPoint::remap(self, to_pos);
    }

    fn step(&mut self, pos: usize) -> Vec<(usize, usize)> {
        FixedPoint::step(self, pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_point_keeps_the_layer_ratio() {
        // L = 100, forget 0.5: 50 kept; slot 50 − 25 = 25
        let kept: Vec<usize> = (0..100).step_by(2).collect();
        let mut fp = FixedPoint::new(&[kept.clone(), kept], &[0.5, 0.0], 100);
        let mut dropped = Vec::new();
        for i in 0..40 {
            dropped.extend(fp.step(100 + i));
        }
        let sizes = fp.sizes();
        assert_eq!(sizes[1], 90, "a layer that forgets nothing never evicts");
        // T = 140: (1 − 0.5)·140 = 70 entries
        assert!((sizes[0] as i64 - 70).abs() <= 1, "{sizes:?}");
        assert!(dropped.iter().all(|&(l, _)| l == 0));
        // FIFO from slot 25: first the prompt survivors 50, 52, … in order
        let first: Vec<usize> = dropped.iter().take(3).map(|&(_, t)| t).collect();
        assert_eq!(first, vec![50, 52, 54]);
    }
}
