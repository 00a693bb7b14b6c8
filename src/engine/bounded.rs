//! The bounded prefill's plan (`--kv-max-cells M`, see [`super::stream`]): the prompt cut into
//! [`Piece`]s (media chunks whole, text in slices) and the evictions [`schedule`]d before the
//! pieces that would not fit. Pure: it depends only on the piece sizes, so the observer knows
//! in advance where each observation window ends.

use std::ops::Range;

use serde::Serialize;

use super::Prompt;
use crate::config::{ContextConfig, KvCap};
use crate::error::{Error, Result};
use crate::span::Modality;

/// One unit of the bounded prefill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// The prompt span (mtmd chunk) it belongs to.
    pub span: usize,
    /// Prompt token indices.
    pub tokens: Range<usize>,
    /// Whether it is text (a slice of a text chunk) rather than a whole media chunk.
    pub text: bool,
}

impl Piece {
    /// Tokens in the piece.
    #[must_use]
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the piece is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// Cuts a prompt's spans into pieces: media chunks whole, text in slices of at most `max_text`.
#[must_use]
pub fn pieces(spans: &[crate::span::Span], max_text: usize) -> Vec<Piece> {
    let max_text = max_text.max(1);
    let mut out = Vec::new();
    for (i, s) in spans.iter().enumerate() {
        if s.modality == Modality::Text {
            let mut a = s.tokens.start;
            while a < s.tokens.end {
                let b = (a + max_text).min(s.tokens.end);
                out.push(Piece { span: i, tokens: a..b, text: true });
                a = b;
            }
        } else {
            out.push(Piece { span: i, tokens: s.tokens.clone(), text: false });
        }
    }
    out
}

/// A planned eviction: before piece `piece` (whose first token is `at_token`), keep `keep` of
/// the cached cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Index of the piece it precedes.
    pub piece: usize,
    /// Prompt tokens read before it.
    pub at_token: usize,
    /// Cells kept.
    pub keep: usize,
}

/// Plans the evictions of a bounded prefill over pieces of `sizes` tokens: before each piece
/// that would not fit in `cap` cells, keep `cap − size − reserve'` where `reserve' =
/// min(reserve, (cap − size)/2)`.
///
/// # Errors
/// The index of a piece that cannot fit with at least one cell beside it.
pub fn schedule(sizes: &[usize], cap: usize, reserve: usize) -> std::result::Result<Vec<Step>, usize> {
    let mut steps = Vec::new();
    let (mut used, mut read) = (0usize, 0usize);
    for (i, &n) in sizes.iter().enumerate() {
        if n >= cap && i > 0 || n > cap {
            return Err(i);
        }
        if used + n > cap {
            let room = cap - n;
            let keep = room - reserve.min(room / 2);
            steps.push(Step { piece: i, at_token: read, keep });
            used = keep;
        }
        used += n;
        read += n;
    }
    Ok(steps)
}

/// One eviction, as reported in the JSON (`evictions`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Eviction {
    /// Prompt tokens read when it happened (the prompt's length for the prompt-end pass).
    pub at_token: usize,
    /// Cells removed.
    pub removed: usize,
    /// Cells kept.
    pub kept: usize,
    /// Milliseconds scoring, removing and compacting.
    pub ms: f64,
}

/// A bounded prefill's settings and plan.
#[derive(Debug, Clone)]
pub struct Bounded {
    /// The cap in cells.
    pub cap: u32,
    /// Cells left free after an eviction.
    pub reserve: u32,
    /// Renumber positions after each eviction.
    pub shift: bool,
    /// The prompt's pieces.
    pub pieces: Vec<Piece>,
    /// The planned evictions (empty when the prompt fits).
    pub steps: Vec<Step>,
    /// Tokens evaluated after the prompt-end pass (the deferred question).
    pub n_deferred: usize,
    /// Tokens to generate (`-n`, when given and `--kv-reserve` is not): the prompt-end pass leaves
    /// room for them, so generation stays under the cap too.
    pub n_generate: usize,
}

impl Bounded {
    /// Plans the bounded prefill of `prompt` under `cap`.
    ///
    /// # Errors
    /// A chunk (an image) larger than the cap, with the size needed.
    pub fn new(prompt: &Prompt, ctx: &ContextConfig, cap: KvCap, n_predict: i32) -> Result<Self> {
        let n_deferred: usize = prompt.deferred.iter().map(crate::span::Span::n_tokens).sum();
        let cap_cells = cap.cells(prompt.n_tokens() + n_deferred);
        let reserve = ctx.kv_reserve.unwrap_or_else(|| KvCap::default_reserve(cap_cells, n_predict));
        let max_text = (ctx.n_batch as usize).min(cap_cells as usize / 4).max(1);
        let pieces = pieces(&prompt.spans, max_text);
        let sizes: Vec<usize> = pieces.iter().map(Piece::len).collect();
        let steps = schedule(&sizes, cap_cells as usize, reserve as usize).map_err(|i| {
            let p = &pieces[i];
            let what = match prompt.spans[p.span].media {
                Some(m) => format!("image {} ({})", m + 1, prompt.image_names.get(m).map_or("?", String::as_str)),
                None => "a text chunk".to_owned(),
            };
            Error::Config {
                field: "kv_max_cells",
                reason: format!("{what} takes {} cells and cannot be read in parts; the cap of {cap_cells} cells must be at least {}", p.len(), p.len() + 1),
            }
        })?;
        if n_deferred >= cap_cells as usize {
            return Err(Error::Config {
                field: "kv_max_cells",
                reason: format!("the question ({n_deferred} tokens, read after pruning) does not fit in {cap_cells} cells"),
            });
        }
        let n_generate = if ctx.kv_reserve.is_none() { usize::try_from(n_predict).unwrap_or(0) } else { 0 };
        let room = cap_cells as usize - n_deferred;
        if n_generate > room / 2 {
            tracing::warn!(
                "-n {n_predict} is more than half of the {room} cells the cap of {cap_cells} leaves after the question: the prompt keeps {} and generation may pass the cap by up to {} cells",
                room - room / 2,
                n_generate - room / 2
            );
        }
        Ok(Self { cap: cap_cells, reserve, shift: ctx.kv_shift, pieces, steps, n_deferred, n_generate })
    }

    /// Whether the prompt needs evictions while it is read.
    #[must_use]
    pub fn evicts(&self) -> bool {
        !self.steps.is_empty()
    }

    /// The most cells the prompt-end pass may keep: room for the deferred question and the
    /// reserve or the tokens to generate, whichever is more (at most half the room).
    #[must_use]
    pub fn final_limit(&self) -> usize {
        let room = self.cap as usize - self.n_deferred;
        room - (self.reserve as usize).max(self.n_generate).min(room / 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::Span;

    #[test]
    fn schedule_keeps_the_cap() {
        // 1 text + 16 images of 64 + text, cap 256, reserve 32
        let mut sizes = vec![5];
        for _ in 0..16 {
            sizes.extend([64, 3]);
        }
        sizes.push(20);
        let steps = schedule(&sizes, 256, 32).unwrap();
        assert!(!steps.is_empty());
        let (mut used, mut s) = (0usize, steps.iter().peekable());
        for (i, &n) in sizes.iter().enumerate() {
            if let Some(st) = s.next_if(|st| st.piece == i) {
                assert!(st.keep < used, "an eviction removes something");
                assert_eq!(st.keep, 256 - n - 32);
                used = st.keep;
            }
            used += n;
            assert!(used <= 256, "piece {i}: {used} cells");
        }
    }

    #[test]
    fn schedule_without_pressure_is_empty_and_oversized_pieces_fail() {
        assert!(schedule(&[10, 64, 10], 100, 16).unwrap().is_empty());
        assert_eq!(schedule(&[10, 64, 10], 64, 16), Err(1), "an image as large as the cap leaves no room");
        assert_eq!(schedule(&[64], 64, 16), Ok(vec![]), "a first piece may fill the cap");
        // room 10 after the piece: the reserve is halved to leave 5
        let st = schedule(&[80, 90], 100, 64).unwrap();
        assert_eq!(st, vec![Step { piece: 1, at_token: 80, keep: 5 }]);
    }

    #[test]
    fn text_is_sliced_and_images_are_whole() {
        let spans = vec![
            Span { modality: Modality::Text, media: None, tokens: 0..10, pos: 0..10 },
            Span { modality: Modality::Image, media: Some(0), tokens: 10..74, pos: 10..74 },
            Span { modality: Modality::Text, media: None, tokens: 74..78, pos: 74..78 },
        ];
        let p = pieces(&spans, 4);
        let lens: Vec<usize> = p.iter().map(Piece::len).collect();
        assert_eq!(lens, vec![4, 4, 2, 64, 4]);
        assert_eq!(p[3], Piece { span: 1, tokens: 10..74, text: false });
        assert!(p.windows(2).all(|w| w[0].tokens.end == w[1].tokens.start));
    }
}
