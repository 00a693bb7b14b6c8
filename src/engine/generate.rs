//! Token generation after prefill: llama.cpp's sampler chain (in llama.cpp's order: penalties,
//! top-k, top-p, min-p, temperature, distribution), streaming UTF-8-safe text pieces.

use std::time::Instant;

use serde::Serialize;

use super::event::{ms, Event, StopReason};
use super::session::Session;
use crate::config::SamplingConfig;
use crate::error::{Error, Result};
use crate::llama::{Logits, Sampler, Step};

/// Result of a generation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Generated {
    /// Text (end-of-generation token excluded).
    pub text: String,
    /// Token ids, including a final end-of-generation token if one was sampled.
    pub tokens: Vec<i32>,
    /// Milliseconds sampling and decoding the generated tokens.
    pub decode_ms: f64,
    /// Why it stopped.
    pub stop: StopReason,
    /// Seed the sampler used.
    pub seed: u32,
}

fn sampler_chain(cfg: &SamplingConfig, seed: u32, n_vocab: i32, n_ctx: u32) -> Sampler {
    let mut chain = Vec::new();
    if cfg.repeat_penalty != 1.0 && cfg.repeat_last_n != 0 {
        // -1 = the whole context (llama.cpp's convention; the sampler itself takes a count).
        // llama.cpp clamps the window to the context; so does this (a huge -repeat-last-n would
        // otherwise allocate a ring buffer of that many tokens)
        let n_ctx = i32::try_from(n_ctx).unwrap_or(i32::MAX);
        let last_n = if cfg.repeat_last_n < 0 { n_ctx } else { cfg.repeat_last_n.min(n_ctx) };
        chain.push(Step::Penalties { n_vocab, last_n, repeat: cfg.repeat_penalty });
    }
    if cfg.temp <= 0.0 {
        chain.push(Step::Greedy);
    } else {
        if cfg.top_k > 0 {
            chain.push(Step::TopK(cfg.top_k));
        }
        if cfg.top_p < 1.0 {
            chain.push(Step::TopP(cfg.top_p));
        }
        if cfg.min_p > 0.0 {
            chain.push(Step::MinP(cfg.min_p));
        }
        chain.push(Step::Temp(cfg.temp));
        chain.push(Step::Dist(seed));
    }
    Sampler::chain(&chain)
}

/// A random seed when none was given (llama.cpp's `--seed -1`).
fn random_seed() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish() as u32
}

/// Turns token bytes into text without splitting UTF-8 characters across pieces.
#[derive(Debug, Default)]
pub(crate) struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Appends bytes; returns the text that is complete now.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).expect("valid prefix"));
                    match e.error_len() {
                        // incomplete character at the end: wait for more bytes
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Whatever is left (an incomplete character becomes U+FFFD).
    pub(crate) fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

impl Session<'_> {
    /// Generates from the logits left by the prefill.
    ///
    /// # Errors
    /// Invalid sampling settings; llama.cpp decode failures.
    pub fn generate(
        &mut self,
        cfg: &SamplingConfig,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<Generated> {
        self.generate_until(cfg, &mut |e| {
            on_event(e);
            true
        })
    }

    /// [`Session::generate`] whose callback can stop it: returning `false` stops after the
    /// token just shown ([`StopReason::Cancelled`]), with every token shown in the cache.
    ///
    /// # Errors
    /// Invalid sampling settings; llama.cpp decode failures.
    pub fn generate_until(
        &mut self,
        cfg: &SamplingConfig,
        on_event: &mut dyn FnMut(Event<'_>) -> bool,
    ) -> Result<Generated> {
        cfg.validate()?;
        let mut go_on = true;
        let seed = cfg.seed.unwrap_or_else(random_seed);
        let engine = self.engine.clone();
        let model = engine.model();
        let mut sampler = sampler_chain(cfg, seed, model.n_vocab(), self.n_ctx);
        let mut utf8 = Utf8Stream::default();
        let mut text = String::new();
        let mut tokens = Vec::new();
        let t = Instant::now();
        let limit = if cfg.n_predict < 0 { usize::MAX } else { cfg.n_predict as usize };
        let kv = self.kv_info();
        let (mut cells_used, cells) = (kv.n_used, kv.n_cells.max(self.n_ctx));
        let stop = loop {
            if tokens.len() >= limit {
                break StopReason::Length;
            }
            if !go_on || self.engine.cancel.is_cancelled() {
                break StopReason::Cancelled;
            }
            let logits = self.last_logits().ok_or(Error::Llama { op: "read logits", code: -1 })?;
            let tok = sampler.sample(logits).ok_or(Error::Llama { op: "sample", code: -1 })?;
            self.first_logits = None;
            tokens.push(tok);
            let eog = model.is_eog(tok);
            if eog && !cfg.ignore_eos {
                break StopReason::Eos;
            }
            if !eog {
                let piece = utf8.push(&model.token_bytes(tok, false));
                if !piece.is_empty() {
                    go_on &= on_event(Event::Text(&piece));
                    text.push_str(&piece);
                }
            }
            if tokens.len() >= limit {
                break StopReason::Length;
            }
            if cells_used >= cells {
                break StopReason::Context;
            }
            if let Err(e) = self.lctx.decode(&[tok], self.n_past, Logits::Last) {
                if self.engine.cancel.is_cancelled() {
                    break StopReason::Cancelled;
                }
                return Err(e);
            }
            self.after_decode(self.n_past)?;
            self.n_past += 1;
            cells_used += 1;
        };
        let rest = utf8.finish();
        if !rest.is_empty() {
            let _ = on_event(Event::Text(&rest));
            text.push_str(&rest);
        }
        Ok(Generated { text, tokens, decode_ms: ms(t), stop, seed })
    }
}

#[cfg(test)]
mod tests {
    use super::Utf8Stream;

    #[test]
    fn utf8_pieces_are_never_split() {
        let mut s = Utf8Stream::default();
        let e = "é".as_bytes();
        assert_eq!(s.push(&e[..1]), "");
        assert_eq!(s.push(&e[1..]), "é");
        assert_eq!(s.push(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(s.push(&"€".as_bytes()[..2]), "");
        assert_eq!(s.finish(), "\u{fffd}");
    }
}
