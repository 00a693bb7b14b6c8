//! `random`: a seeded random selection plus the recent window — the floor any attention-based
//! policy has to beat.
//!
//! Shapes: the recent R tokens, plus k = B − R tokens drawn uniformly from `[0, L − R)`
//! (SplitMix64 scores, top-k), so the same seed keeps the same tokens.

use super::{select, HeadChoice, Input, Policy, Split};
use crate::error::Result;
use crate::observe::StatRequest;
use crate::rng::Rng;

/// Random selection.
#[derive(Debug, Clone, Copy, Default)]
pub struct Random {
    /// Seed.
    pub seed: u64,
}

impl Policy for Random {
    fn name(&self) -> &'static str {
        "random"
    }
    fn request(&self, _: &Split, _: Option<usize>) -> Option<StatRequest> {
        None
    }
    fn choose(&self, input: &Input<'_>) -> Result<Vec<HeadChoice>> {
        let split = input.split;
        let mut rng = Rng::new(self.seed, "random-policy");
        let score: Vec<f32> = (0..split.l).map(|_| rng.uniform()).collect();
        let mut keep = select::top_k(&score, split.candidates(), split.k);
        keep.extend(split.recent_window());
        Ok(vec![HeadChoice { layer: None, head: None, keep, score }])
    }
}
