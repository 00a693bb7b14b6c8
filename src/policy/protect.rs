//! Protected sink tokens for the window-based policies (CSP, SnapKV, AirCache, PrefixKV): the
//! first tokens of the prompt and the first tokens of each image, kept whatever the window's
//! scores and counted in the budget, as StreamingLLM keeps its attention sinks.
//!
//! Why (issue 16): with the question asked after pruning, a prompt ends with an image, so CSP's
//! window is the last patches of that image; earlier images enter only through a few self slots
//! and CSP never keeps the first embedding of image 1, a heavy hitter every answer needs. The
//! released methods have no such protection: `Protect::default()` (nothing protected) is the
//! faithful mode.

use serde::{Deserialize, Serialize};

use crate::span::Modality;

/// Which tokens are protected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Protect {
    /// The first tokens of the prompt (of what the cache holds, in a bounded prefill).
    pub first: usize,
    /// The first tokens of each image (of each run of image tokens in what the cache holds).
    pub per_image: usize,
}

impl Protect {
    /// Whether anything is protected.
    #[must_use]
    pub fn any(&self) -> bool {
        self.first > 0 || self.per_image > 0
    }

    /// The protected tokens below `end` (the start of the recent window), ascending.
    #[must_use]
    pub fn tokens(&self, modality: &[Modality], end: usize) -> Vec<usize> {
        let end = end.min(modality.len());
        let mut keep = vec![false; end];
        keep.iter_mut().take(self.first).for_each(|k| *k = true);
        if self.per_image > 0 {
            let mut t = 0;
            while t < end {
                if modality[t] != Modality::Text && (t == 0 || modality[t - 1] == Modality::Text) {
                    keep[t..(t + self.per_image).min(end)].iter_mut().for_each(|k| *k = true);
                }
                t += 1;
            }
        }
        (0..end).filter(|&t| keep[t]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::Modality::{Image as I, Text as T};

    #[test]
    fn first_tokens_and_image_heads() {
        let m = [T, T, I, I, I, T, I, I, T, T];
        assert_eq!(Protect::default().tokens(&m, 10), Vec::<usize>::new());
        assert_eq!(Protect { first: 3, per_image: 0 }.tokens(&m, 10), vec![0, 1, 2]);
        assert_eq!(Protect { first: 1, per_image: 2 }.tokens(&m, 10), vec![0, 2, 3, 6, 7]);
        // nothing at or after the recent window
        assert_eq!(Protect { first: 1, per_image: 2 }.tokens(&m, 7), vec![0, 2, 3, 6]);
        // an image at the very start
        assert_eq!(Protect { first: 0, per_image: 1 }.tokens(&[I, I, T], 3), vec![0]);
    }
}
