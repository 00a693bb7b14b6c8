//! Where each modality sits in the prompt. A policy that treats image and text tokens differently
//! (CSP's cross vs self attention) reads these spans; the report's per-image token counts come
//! from them too.
//!
//! A span is one mtmd chunk: a run of text tokens, or (part of) one image. One image may become
//! several chunks (LLaVA-1.6 any-resolution slices); they share the image's index. Positions and
//! KV cells differ under M-RoPE (Qwen2-VL: an image takes fewer positions than tokens), so both
//! are kept.

use std::ops::Range;

use serde::Serialize;

/// The modality of a prompt span.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Modality {
    /// Text tokens (the chat template's and the user's).
    Text,
    /// Image embeddings.
    Image,
    /// Audio embeddings.
    Audio,
}

/// One chunk of the prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Span {
    /// Text, image or audio.
    pub modality: Modality,
    /// For media: index of the image (order of `--image`); `None` for text.
    pub media: Option<usize>,
    /// Token (KV cell) indices of the span in prompt order: `tokens.len()` cells.
    pub tokens: Range<usize>,
    /// Positions the span occupies.
    pub pos: Range<i32>,
}

impl Span {
    /// Number of tokens (KV cells) in the span.
    #[must_use]
    pub fn n_tokens(&self) -> usize {
        self.tokens.len()
    }
}

/// Tokens per media item, in media order (several chunks of one image are summed).
#[must_use]
pub fn media_tokens(spans: &[Span], n_media: usize) -> Vec<usize> {
    let mut out = vec![0; n_media];
    for s in spans {
        if let Some(m) = s.media {
            if let Some(slot) = out.get_mut(m) {
                *slot += s.n_tokens();
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_of_one_image_add_up() {
        let spans = vec![
            Span { modality: Modality::Text, media: None, tokens: 0..3, pos: 0..3 },
            Span { modality: Modality::Image, media: Some(0), tokens: 3..7, pos: 3..7 },
            Span { modality: Modality::Image, media: Some(0), tokens: 7..9, pos: 7..9 },
            Span { modality: Modality::Image, media: Some(1), tokens: 9..14, pos: 9..14 },
        ];
        assert_eq!(media_tokens(&spans, 2), vec![6, 5]);
    }
}
