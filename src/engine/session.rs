//! A session: one llama.cpp context holding one sequence's KV cache, filled chunk by chunk.

use std::num::NonZeroU32;
use std::time::Instant;

use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_sys_2 as sys;

use super::generate::Event;
use super::{Engine, Prompt};
use crate::config::{CacheType, ContextConfig, FlashAttn};
use crate::error::{Error, Result};
use crate::llama::{self, KvInfo};
use crate::span::Modality;

/// How the prompt is evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillMode {
    /// csp-llava's path: one chunk at a time through the raw pointers, image encoding timed
    /// apart from decoding; later stages observe and evict between chunks.
    Chunked,
    /// llama-cpp-2's standard `eval_chunks` (llama.cpp's `mtmd_helper_eval_chunks`): the
    /// reference the chunked path is tested against.
    EvalChunks,
}

/// Timings of a prefill.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PrefillStats {
    /// Milliseconds in the vision encoder (0 in `EvalChunks` mode, where it is not separable).
    pub encode_ms: f64,
    /// Milliseconds evaluating prompt tokens in the language model (encoding excluded).
    pub prefill_ms: f64,
    /// Tokens evaluated.
    pub n_tokens: usize,
}

/// A llama.cpp context sized for one request.
pub struct Session<'e> {
    pub(super) engine: &'e Engine,
    pub(super) ctx: LlamaContext<'e>,
    /// Next position to write.
    pub(super) n_past: i32,
    pub(super) n_ctx: u32,
    pub(super) n_batch: u32,
    pub(super) flash_attn: bool,
}

impl std::fmt::Debug for Session<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("n_past", &self.n_past)
            .field("n_ctx", &self.n_ctx)
            .field("flash_attn", &self.flash_attn)
            .finish_non_exhaustive()
    }
}

fn kv_type(t: CacheType) -> KvCacheType {
    match t {
        CacheType::F32 => KvCacheType::F32,
        CacheType::F16 => KvCacheType::F16,
        CacheType::Bf16 => KvCacheType::BF16,
        CacheType::Q8_0 => KvCacheType::Q8_0,
        CacheType::Q4_0 => KvCacheType::Q4_0,
        CacheType::Q4_1 => KvCacheType::Q4_1,
        CacheType::Iq4Nl => KvCacheType::IQ4_NL,
        CacheType::Q5_0 => KvCacheType::Q5_0,
        CacheType::Q5_1 => KvCacheType::Q5_1,
    }
}

impl<'e> Session<'e> {
    pub(super) fn new(engine: &'e Engine, prompt: &Prompt, cfg: &ContextConfig) -> Result<Self> {
        cfg.validate()?;
        let n_ctx_train = engine.model().n_ctx_train();
        let n_ctx = if cfg.n_ctx == 0 { n_ctx_train } else { cfg.n_ctx };
        let n_tokens = prompt.n_tokens();
        if n_tokens > n_ctx as usize || prompt.n_positions() > n_ctx as i32 {
            return Err(Error::PromptTooLong {
                n_tokens,
                n_image_tokens: prompt.image_tokens.iter().sum(),
                n_images: prompt.n_images(),
                n_ctx,
                n_ctx_train,
            });
        }
        let n_batch = cfg.n_batch.min(n_ctx);
        let n_ubatch = cfg.n_ubatch.min(n_batch);
        let threads = engine.config().threads as i32;
        let fa = match cfg.flash_attn {
            FlashAttn::Auto => sys::LLAMA_FLASH_ATTN_TYPE_AUTO,
            FlashAttn::On => sys::LLAMA_FLASH_ATTN_TYPE_ENABLED,
            FlashAttn::Off => sys::LLAMA_FLASH_ATTN_TYPE_DISABLED,
        };
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(n_batch)
            .with_n_ubatch(n_ubatch)
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            .with_flash_attention_policy(fa)
            .with_type_k(kv_type(cfg.type_k))
            .with_type_v(kv_type(cfg.type_v));
        let ctx = engine
            .model()
            .new_context(crate::llama::backend()?, params)
            .map_err(|e| Error::Context { n_ctx, reason: e.to_string() })?;
        let flash_attn = llama::flash_attn_enabled(&ctx);
        if cfg.flash_attn == FlashAttn::On && !flash_attn {
            return Err(Error::Config {
                field: "-fa/--flash-attn",
                reason: "flash attention was requested but llama.cpp cannot use it for this model/backend".into(),
            });
        }
        tracing::debug!(n_ctx, n_batch, n_ubatch, flash_attn, "context created");
        Ok(Self { engine, ctx, n_past: 0, n_ctx, n_batch, flash_attn })
    }

    /// The llama.cpp context.
    #[must_use]
    pub fn context(&self) -> &LlamaContext<'e> {
        &self.ctx
    }

    /// Context size in cells.
    #[must_use]
    pub fn n_ctx(&self) -> u32 {
        self.n_ctx
    }

    /// Next position to be written.
    #[must_use]
    pub fn n_past(&self) -> i32 {
        self.n_past
    }

    /// Whether flash attention is in use.
    #[must_use]
    pub fn flash_attn(&self) -> bool {
        self.flash_attn
    }

    /// KV cache size and occupancy now.
    #[must_use]
    pub fn kv_info(&self) -> KvInfo {
        llama::kv_info(&self.ctx).unwrap_or_default()
    }

    /// Logits after the last evaluation (the prompt's last token after a prefill).
    #[must_use]
    pub fn last_logits(&self) -> Option<&[f32]> {
        let n_vocab = usize::try_from(self.engine.model().n_vocab()).unwrap_or(0);
        llama::last_logits(&self.ctx, n_vocab)
    }

    /// Evaluates the whole prompt into the KV cache; the last token's logits are kept.
    ///
    /// # Errors
    /// llama.cpp evaluation failures.
    pub fn prefill(
        &mut self,
        prompt: &Prompt,
        mode: PrefillMode,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<PrefillStats> {
        let mut stats = PrefillStats { n_tokens: prompt.n_tokens(), ..Default::default() };
        match mode {
            PrefillMode::EvalChunks => {
                let t = Instant::now();
                let mut mtmd = self.engine.mtmd.borrow_mut();
                self.n_past = prompt
                    .chunks
                    .eval_chunks(&mut mtmd, &mut self.ctx, self.n_past, 0, self.n_batch as i32, true)
                    .map_err(|e| Error::Prompt(format!("eval_chunks failed: {e}")))?;
                stats.prefill_ms = ms(t);
            }
            PrefillMode::Chunked => {
                let n_chunks = prompt.spans.len();
                let mut done = 0usize;
                for (i, span) in prompt.spans.iter().enumerate() {
                    let chunk = prompt.chunks.get(i).expect("one span per chunk");
                    let last = i + 1 == n_chunks;
                    if span.modality == Modality::Text {
                        let t = Instant::now();
                        self.n_past = llama::eval_text_chunk(
                            &self.engine.mtmd(),
                            &mut self.ctx,
                            &chunk,
                            self.n_past,
                            self.n_batch,
                            last,
                        )?;
                        stats.prefill_ms += ms(t);
                    } else {
                        let t = Instant::now();
                        llama::encode_media_chunk(&self.engine.mtmd(), &chunk)?;
                        stats.encode_ms += ms(t);
                        let t = Instant::now();
                        self.n_past = llama::decode_media_chunk(
                            &self.engine.mtmd(),
                            &mut self.ctx,
                            &chunk,
                            self.n_past,
                            self.n_batch,
                        )?;
                        stats.prefill_ms += ms(t);
                    }
                    done += span.n_tokens();
                    on_event(Event::Prefill { chunk: i + 1, n_chunks, tokens: done, n_tokens: stats.n_tokens });
                }
            }
        }
        Ok(stats)
    }
}

pub(super) fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}
