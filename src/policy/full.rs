//! `full`: keep every token — llama.cpp's own cache, the reference every policy is measured
//! against.

use super::{HeadChoice, Input, Policy, Split};
use crate::error::Result;
use crate::observe::StatRequest;
use crate::span::Modality;

/// No pruning.
#[derive(Debug, Clone, Copy, Default)]
pub struct Full;

impl Policy for Full {
    fn name(&self) -> &'static str {
        "full"
    }
    fn request(&self, _: &Split, _: Option<usize>) -> Option<StatRequest> {
        None
    }
    fn applies(&self, _: &[Modality]) -> bool {
        false
    }
    fn choose(&self, input: &Input<'_>) -> Result<Vec<HeadChoice>> {
        let l = input.split.l;
        Ok(vec![HeadChoice { layer: None, head: None, keep: (0..l).collect(), score: vec![0.0; l] }])
    }
}
