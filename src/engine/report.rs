//! What a run reports: the `--json` object and the stderr timing line. Field names and meanings
//! are stable; later stages add fields.

use serde::Serialize;

use super::generate::{Generated, StopReason};
use super::session::{PrefillStats, Session};
use super::Prompt;
use crate::llama::KvInfo;

/// The outcome of one request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunReport {
    /// Generated text.
    pub text: String,
    /// All prompt tokens, image tokens included.
    pub n_prompt_tokens: usize,
    /// Number of images.
    pub n_images: usize,
    /// Tokens per image, in `--image` order.
    pub image_tokens: Vec<usize>,
    /// Generated tokens (a final end-of-generation token included).
    pub n_generated: usize,
    /// Milliseconds in the vision encoder.
    pub encode_ms: f64,
    /// Milliseconds evaluating the prompt in the language model (encoding excluded).
    pub prefill_ms: f64,
    /// Prompt tokens per second of `prefill_ms`.
    pub prefill_tok_s: f64,
    /// Milliseconds sampling and decoding generated tokens.
    pub decode_ms: f64,
    /// Generated tokens per second of `decode_ms`.
    pub decode_tok_s: f64,
    /// Flash attention as actually used: "on" or "off".
    pub flash_attn: &'static str,
    /// KV cells occupied when decoding starts.
    pub kv_cells: u32,
    /// K+V bytes of those cells.
    pub kv_bytes: u64,
    /// KV cells allocated (the context size).
    pub kv_cells_allocated: u32,
    /// K+V bytes llama.cpp allocated.
    pub kv_bytes_allocated: u64,
    /// KV policy: "full" (no pruning).
    pub policy: &'static str,
    /// Context size.
    pub n_ctx: u32,
    /// Sampler seed.
    pub seed: u32,
    /// Why generation stopped: "eos", "length" or "context".
    pub stop: StopReason,
}

fn per_s(n: usize, ms: f64) -> f64 {
    if ms > 0.0 {
        n as f64 * 1e3 / ms
    } else {
        0.0
    }
}

impl RunReport {
    pub(super) fn new(
        prompt: &Prompt,
        session: &Session<'_>,
        prefill: &PrefillStats,
        kv: KvInfo,
        generated: Generated,
    ) -> Self {
        let n_generated = generated.tokens.len();
        Self {
            text: generated.text,
            n_prompt_tokens: prompt.n_tokens(),
            n_images: prompt.n_images(),
            image_tokens: prompt.image_tokens.clone(),
            n_generated,
            encode_ms: prefill.encode_ms,
            prefill_ms: prefill.prefill_ms,
            prefill_tok_s: per_s(prompt.n_tokens(), prefill.prefill_ms),
            decode_ms: generated.decode_ms,
            decode_tok_s: per_s(n_generated, generated.decode_ms),
            flash_attn: if session.flash_attn() { "on" } else { "off" },
            kv_cells: kv.n_used,
            kv_bytes: kv.bytes_used(),
            kv_cells_allocated: kv.n_cells,
            kv_bytes_allocated: kv.bytes_allocated(),
            policy: "full",
            n_ctx: session.n_ctx(),
            seed: generated.seed,
            stop: generated.stop,
        }
    }

    /// The human timing line printed on stderr.
    #[must_use]
    pub fn timing_line(&self) -> String {
        format!(
            "encode {:.1} ms ({} image(s)) | prompt {} tok, {:.1} tok/s | gen {} tok, {:.1} tok/s | KV {} cells, {} (allocated {}) | policy {}, flash-attn {}",
            self.encode_ms,
            self.n_images,
            self.n_prompt_tokens,
            self.prefill_tok_s,
            self.n_generated,
            self.decode_tok_s,
            self.kv_cells,
            human_bytes(self.kv_bytes),
            human_bytes(self.kv_bytes_allocated),
            self.policy,
            self.flash_attn,
        )
    }
}

/// 1536 → "1.5 KiB".
#[must_use]
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
