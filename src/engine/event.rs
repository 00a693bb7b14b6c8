//! What a request reports while it runs and why generation stopped, and the timing helpers the
//! engine's stages share. A leaf: it imports no other engine module, so prefill, bounded
//! prefill and generation can all use it without importing each other.

use std::time::Instant;

use serde::Serialize;

/// Progress and output, reported while a request runs.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Event<'a> {
    /// A prompt chunk was evaluated.
    Prefill {
        /// Chunks done.
        chunk: usize,
        /// All chunks.
        n_chunks: usize,
        /// Tokens done.
        tokens: usize,
        /// All prompt tokens.
        n_tokens: usize,
    },
    /// Generated text (may be empty when a token ends inside a UTF-8 character).
    Text(&'a str),
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StopReason {
    /// An end-of-generation token.
    Eos,
    /// `-n` tokens were generated.
    Length,
    /// The context is full.
    Context,
    /// The engine's cancel handle was used (Ctrl-C).
    Cancelled,
}

/// Milliseconds since `t`.
pub(super) fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}
