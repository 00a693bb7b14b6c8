//! `random`: a seeded random selection plus the recent window — the floor any attention-based
//! policy has to beat.
//!
//! Shapes: the recent R tokens, plus k = B − R tokens drawn uniformly from `[0, L − R)`
//! (SplitMix64 scores, top-k), so the same seed keeps the same tokens.

use serde::{Deserialize, Serialize};

use super::{Budget, Build, Input, Pick, Policy, PolicyParams};
use crate::error::Result;
use crate::rng::Rng;

/// Random selection, and its parameters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Random {
    /// Seed.
    pub seed: u64,
}

impl PolicyParams for Random {}

impl Build for Random {
    type Params = Self;
    fn build(params: &Self, _: Budget) -> Result<Self> {
        Ok(*params)
    }
}

impl Policy for Random {
    fn name(&self) -> &'static str {
        "random"
    }
    fn pick(&self, input: &Input<'_>) -> Result<Vec<Pick>> {
        let mut rng = Rng::new(self.seed, "random-policy");
        let score: Vec<f32> = (0..input.split.l).map(|_| rng.uniform()).collect();
        Ok(vec![Pick { layer: None, head: None, score, keep: None }])
    }
}
