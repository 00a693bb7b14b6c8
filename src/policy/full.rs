//! `full`: keep every token — llama.cpp's own cache, the reference every policy is measured
//! against. A policy like the others that never prunes: it applies to no prompt, and a cache cap
//! is refused with it ([`Policy::prunes`]).

use super::{Budget, Build, Input, Pick, Policy};
use crate::error::Result;
use crate::span::Modality;

/// No pruning.
#[derive(Debug, Clone, Copy, Default)]
pub struct Full;

impl Build for Full {
    type Params = ();
    fn build(_: &(), _: Budget) -> Result<Self> {
        Ok(Full)
    }
}

impl Policy for Full {
    fn name(&self) -> &'static str {
        "full"
    }
    fn applies(&self, _: &[Modality]) -> bool {
        false
    }
    fn prunes(&self) -> bool {
        false
    }
    /// Every token before the recent window (the shared selection adds the window).
    fn pick(&self, input: &Input<'_>) -> Result<Vec<Pick>> {
        let l = input.split.l;
        Ok(vec![Pick { layer: None, head: None, score: vec![0.0; l], keep: Some(input.split.candidates().collect()) }])
    }
}
