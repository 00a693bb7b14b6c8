//! A session: one llama.cpp context holding one sequence's KV cache, filled chunk by chunk,
//! optionally observed, then pruned and compacted.

use std::num::NonZeroU32;
use std::time::Instant;

use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::context::session::LlamaStateSeqFlags;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_sys_2 as sys;

use super::bounded::{Bounded, Eviction};
use super::event::{decode_code, ms, Event};
use super::{Engine, Prompt};
use crate::config::{CacheType, ContextConfig, FlashAttn};
use crate::error::{Error, Result};
use crate::llama::observer::Observer;
use crate::llama::{self, KvInfo, ObservedContext};
use crate::stats::{AttentionStats, Collector, Reducer, StatRequest};
use crate::policy::DecodeEviction;
use crate::policy::HeadKeep;
use crate::span::Modality;

/// How the prompt is evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillMode {
    /// csp-llava's path: one chunk at a time through the raw pointers, image encoding timed
    /// apart from decoding.
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
    /// Milliseconds evaluating prompt tokens in the language model (encoding and the
    /// observer's own reduction excluded).
    pub prefill_ms: f64,
    /// Milliseconds the observer spent reducing attention.
    pub observe_ms: f64,
    /// Tokens evaluated.
    pub n_tokens: usize,
}

/// Timings and sizes of an eviction.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EvictStats {
    /// Cells removed.
    pub removed: usize,
    /// Milliseconds removing and compacting (and shrinking).
    pub ms: f64,
}

/// A llama.cpp context sized for one request.
pub struct Session<'e> {
    pub(super) engine: &'e Engine,
    pub(super) lctx: ObservedContext<'e>,
    params: LlamaContextParams,
    /// Next position to write.
    pub(super) n_past: i32,
    pub(super) n_ctx: u32,
    pub(super) n_batch: u32,
    pub(super) flash_attn: bool,
    /// Logits of the prompt's last token, kept across eviction and shrinking.
    pub(super) first_logits: Option<Vec<f32>>,
    observe_ms: f64,
    /// The statistics the observer feeds (shared with it), when the session observes.
    collector: Option<Collector>,
    /// Flash attention is paused while the prefill is observed and resumed after it.
    resume_flash_attn: bool,
    /// Eviction while decoding (PrefixKV's fixed-point FIFO); entries are positions.
    pub(super) decode_eviction: Option<Box<dyn DecodeEviction>>,
    decode_evicted: usize,
    /// Current position of every prompt token read, −1 once evicted (empty under M-RoPE).
    pub(super) token_pos: Vec<i32>,
    /// Prompt tokens read so far.
    pub(super) n_read: usize,
    /// The bounded prefill (`--kv-max-cells`), when the session has a cap.
    pub(super) bounded: Option<Bounded>,
    /// Evictions so far (bounded prefill, then the prompt-end pass).
    pub(super) evictions: Vec<Eviction>,
    /// Most cells ever occupied in contexts this session replaced (`--kv-shrink`).
    cells_peak: u32,
    /// The largest KV buffer (bytes) of the contexts this session replaced.
    alloc_peak: u64,
    /// Cells a shrink keeps free after the kept ones (`None`: `-n`, or the rest of the context).
    pub(super) shrink_room: Option<u32>,
    /// Highest position written so far.
    max_pos: i32,
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

/// The attention scale the model applies to `q·k` (`{arch}.attention.scale`, else 1/√d_head).
fn attention_scale(engine: &Engine) -> f32 {
    let model = engine.model();
    let arch = model.meta_val_str("general.architecture").unwrap_or_default();
    if let Some(s) = model.meta_val_str(&format!("{arch}.attention.scale")).ok().and_then(|v| v.parse::<f32>().ok()) {
        if s > 0.0 {
            return s;
        }
    }
    1.0 / (head_dim(engine) as f32).sqrt()
}

/// Elements per key head (`{arch}.attention.key_length`, else n_embd / n_head).
fn head_dim(engine: &Engine) -> u32 {
    let model = engine.model();
    let arch = model.meta_val_str("general.architecture").unwrap_or_default();
    model
        .meta_val_str(&format!("{arch}.attention.key_length"))
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or_else(|| (model.n_embd() as u32 / model.n_head().max(1)).max(1))
}

impl<'e> Session<'e> {
    pub(super) fn new(engine: &'e Engine, prompt: &Prompt, cfg: &ContextConfig, observe: Vec<StatRequest>, bounded: Option<Bounded>) -> Result<Self> {
        cfg.validate()?;
        let n_ctx_train = engine.model().n_ctx_train();
        let n_ctx = match &bounded {
            // the KV buffer holds the cap (or -c, if larger), not the prompt
            Some(b) if cfg.n_ctx != 0 && cfg.n_ctx < b.cap => {
                return Err(Error::Config { field: "-c/--ctx-size", reason: format!("{} is smaller than --kv-max-cells ({} cells)", cfg.n_ctx, b.cap) });
            }
            Some(b) => cfg.n_ctx.max(b.cap),
            None if cfg.n_ctx == 0 => n_ctx_train,
            None => cfg.n_ctx,
        };
        let n_tokens = prompt.n_tokens();
        if bounded.is_none() && (n_tokens > n_ctx as usize || prompt.n_positions() > n_ctx as i32) {
            return Err(Error::PromptTooLong {
                n_tokens,
                n_image_tokens: prompt.image_tokens.iter().sum(),
                n_images: prompt.n_images(),
                n_ctx,
                n_ctx_train,
            });
        }
        // Observation reads attention probabilities, which flash attention never materialises:
        // it is paused for the observed prefill and resumed for decoding (patch 0003).
        let observes = !observe.is_empty();
        let fa = match cfg.flash_attn {
            FlashAttn::Off => sys::LLAMA_FLASH_ATTN_TYPE_DISABLED,
            FlashAttn::On => sys::LLAMA_FLASH_ATTN_TYPE_ENABLED,
            FlashAttn::Auto => sys::LLAMA_FLASH_ATTN_TYPE_AUTO,
        };
        if observes && cfg.type_v.is_quantized() {
            return Err(Error::Config {
                field: "-ctv/--cache-type-v",
                reason: "a quantized V cache needs flash attention, which this policy cannot use while it observes; use -ctv f16".into(),
            });
        }
        let hd = head_dim(engine);
        for (flag, t) in [("-ctk/--cache-type-k", cfg.type_k), ("-ctv/--cache-type-v", cfg.type_v)] {
            // every quantized cache type llama.cpp offers has blocks of 32 values
            if t.is_quantized() && hd % 32 != 0 {
                return Err(Error::Config { field: flag, reason: format!("{} stores blocks of 32 values; this model's heads have {hd}", t.name()) });
            }
        }
        let n_batch = cfg.n_batch.min(n_ctx);
        let n_ubatch = cfg.n_ubatch.min(n_batch);
        let threads = engine.config().threads as i32;
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(n_batch)
            .with_n_ubatch(n_ubatch)
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            .with_flash_attention_policy(fa)
            .with_type_k(kv_type(cfg.type_k))
            .with_type_v(kv_type(cfg.type_v));
        let collector = observes.then(|| {
            let model = engine.model();
            let modality = prompt.token_modalities();
            Collector::new(Reducer::new(
                observe.clone(),
                &modality,
                model.n_layer() as usize,
                model.n_head_kv().max(1) as usize,
                attention_scale(engine),
                threads.max(1) as usize,
            ))
        });
        let observer = collector.as_ref().map(|c| Observer::new(Some(c.sink())));
        let mut lctx = ObservedContext::new(engine.model(), params.clone(), observer, Some(engine.cancel.flag()))
            .map_err(|e| Error::Context { n_ctx, reason: e.to_string() })?;
        let flash_attn = llama::flash_attn_enabled(lctx.ctx());
        let resume_flash_attn = observes && flash_attn;
        if resume_flash_attn {
            llama::set_flash_attn(lctx.ctx_mut(), false);
        }
        if cfg.flash_attn == FlashAttn::On && !flash_attn {
            return Err(Error::Config {
                field: "-fa/--flash-attn",
                reason: "flash attention was requested but llama.cpp cannot use it for this model/backend".into(),
            });
        }
        tracing::debug!(n_ctx, n_batch, n_ubatch, flash_attn, observed = observes, "context created");
        Ok(Self {
            engine,
            lctx,
            params,
            n_past: 0,
            n_ctx,
            n_batch,
            flash_attn,
            first_logits: None,
            observe_ms: 0.0,
            collector,
            resume_flash_attn,
            decode_eviction: None,
            decode_evicted: 0,
            token_pos: Vec::new(),
            n_read: 0,
            bounded,
            evictions: Vec::new(),
            cells_peak: 0,
            alloc_peak: 0,
            shrink_room: None,
            max_pos: -1,
        })
    }

    /// The largest K+V buffer this session has allocated (the prefill's, before a shrink).
    #[must_use]
    pub fn kv_bytes_allocated_peak(&self) -> u64 {
        self.alloc_peak.max(self.kv_info().bytes_allocated())
    }

    /// The most cells the cache ever held (llama.cpp's high-water mark, across the contexts
    /// this session used).
    #[must_use]
    pub fn kv_cells_peak(&self) -> u32 {
        self.cells_peak.max(self.kv_info().n_used_peak)
    }

    /// The highest position written so far (prompt or generated).
    #[must_use]
    pub fn max_pos(&self) -> i32 {
        self.max_pos.max(self.n_past - 1)
    }

    /// The model's trained context.
    #[must_use]
    pub fn n_ctx_train(&self) -> u32 {
        self.engine.model().n_ctx_train()
    }

    pub(super) fn note_pos(&mut self) {
        self.max_pos = self.max_pos.max(self.n_past - 1);
    }

    /// The llama.cpp context.
    #[must_use]
    pub fn context(&self) -> &LlamaContext<'e> {
        self.lctx.ctx()
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
        llama::kv_info(self.lctx.ctx()).unwrap_or_default()
    }

    /// The attention observer, when the session observes.
    #[must_use]
    pub fn observer(&self) -> Option<&Observer> {
        self.lctx.observer()
    }

    /// Logits of the prompt's last token (kept from the prefill), or of the last evaluation.
    #[must_use]
    pub fn last_logits(&self) -> Option<&[f32]> {
        if let Some(l) = &self.first_logits {
            return Some(l);
        }
        let n_vocab = usize::try_from(self.engine.model().n_vocab()).unwrap_or(0);
        llama::last_logits(self.lctx.ctx(), n_vocab)
    }

    /// Milliseconds the observer spent reducing attention during the prefill.
    #[must_use]
    pub fn observe_ms(&self) -> f64 {
        self.observe_ms
    }

    /// The statistics while the observer still feeds them: none once taken or after an
    /// observer failure, nor once the context (and its observer) was replaced.
    pub(super) fn collector(&self) -> Option<&Collector> {
        self.lctx.observer().filter(|obs| obs.has_sink()).and(self.collector.as_ref())
    }

    /// An observer failure, if the observer reported one (it aborts the computation). Detaches
    /// the statistics.
    fn observer_error(&self) -> Option<Error> {
        let obs = self.lctx.observer()?;
        let (sink, err) = obs.finish();
        drop(sink);
        err.map(Error::Callback)
    }

    /// Evaluates the whole prompt into the KV cache; the last token's logits are kept.
    ///
    /// # Errors
    /// llama.cpp evaluation failures; observer failures.
    pub fn prefill(
        &mut self,
        prompt: &Prompt,
        mode: PrefillMode,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<PrefillStats> {
        if self.bounded.as_ref().is_some_and(Bounded::evicts) {
            return Err(Error::Config {
                field: "--kv-max-cells",
                reason: "this prompt needs evictions while it is read: use Engine::prefill_pruned or Session::prefill_bounded".into(),
            });
        }
        let res = self.prefill_inner(prompt, mode, on_event);
        if res.is_ok() {
            self.token_pos = prompt.positions().unwrap_or_default();
            self.n_read = prompt.n_tokens();
            self.note_pos();
        }
        self.finish_prefill(res)
    }

    /// Stops observing, resumes flash attention and keeps the last logits after a prefill.
    pub(super) fn finish_prefill(&mut self, res: Result<PrefillStats>) -> Result<PrefillStats> {
        if res.is_err() {
            // an evaluation llama.cpp aborted on request
            self.engine.check_cancel()?;
            if let Some(e) = self.observer_error() {
                return Err(e);
            }
        }
        let mut stats = res?;
        if let Some(obs) = self.lctx.observer() {
            obs.deactivate();
            stats.observe_ms = self.collector().map_or(0.0, Collector::ms);
            self.observe_ms = stats.observe_ms;
            stats.prefill_ms = (stats.prefill_ms - stats.observe_ms).max(0.0);
        }
        if std::mem::take(&mut self.resume_flash_attn) {
            self.flash_attn = llama::set_flash_attn(self.lctx.ctx_mut(), true);
        }
        let logits = self.last_logits().map(<[f32]>::to_vec);
        self.first_logits = logits;
        Ok(stats)
    }

    fn prefill_inner(
        &mut self,
        prompt: &Prompt,
        mode: PrefillMode,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<PrefillStats> {
        self.first_logits = None;
        let mut stats = PrefillStats { n_tokens: prompt.n_tokens(), ..Default::default() };
        match mode {
            PrefillMode::EvalChunks => {
                let t = Instant::now();
                let mut mtmd = self.engine.mtmd();
                self.n_past = prompt
                    .chunks
                    .eval_chunks(&mut mtmd, self.lctx.ctx_mut(), self.n_past, 0, self.n_batch as i32, true)
                    .map_err(|e| Error::Prompt(format!("eval_chunks failed: {e}")))?;
                stats.prefill_ms = ms(t);
            }
            PrefillMode::Chunked => {
                let n_chunks = prompt.spans.len();
                let mut done = 0usize;
                for (i, span) in prompt.spans.iter().enumerate() {
                    self.engine.check_cancel()?;
                    let chunk = prompt.chunks.get(i).expect("one span per chunk");
                    let last = i + 1 == n_chunks;
                    let mtmd = self.engine.mtmd();
                    if span.modality == Modality::Text {
                        let t = Instant::now();
                        self.n_past = llama::eval_text_chunk(&mtmd, self.lctx.ctx_mut(), &chunk, self.n_past, self.n_batch, last)?;
                        stats.prefill_ms += ms(t);
                    } else {
                        drop(mtmd);
                        self.read_media(&chunk, &mut stats)?;
                    }
                    done += span.n_tokens();
                    on_event(Event::Prefill { chunk: i + 1, n_chunks, tokens: done, n_tokens: stats.n_tokens });
                }
            }
        }
        Ok(stats)
    }

    /// Encodes an image chunk and decodes its embeddings after the cache, timing both.
    pub(super) fn read_media(&mut self, chunk: &llama_cpp_2::mtmd::MtmdInputChunk<'_>, stats: &mut PrefillStats) -> Result<()> {
        let mtmd = self.engine.mtmd();
        let t = Instant::now();
        llama::encode_media_chunk(&mtmd, chunk)?;
        stats.encode_ms += ms(t);
        let t = Instant::now();
        self.n_past = llama::decode_media_chunk(&mtmd, self.lctx.ctx_mut(), chunk, self.n_past, self.n_batch)?;
        stats.prefill_ms += ms(t);
        Ok(())
    }

    /// Evaluates the spans [`Prompt::defer_question`] held back (not observed), keeping the
    /// logits of the last token for generation.
    ///
    /// # Errors
    /// llama.cpp evaluation failures.
    pub fn eval_deferred(&mut self, prompt: &Prompt) -> Result<()> {
        let first = prompt.spans.len();
        for (k, span) in prompt.deferred.iter().enumerate() {
            let chunk = prompt.chunks.get(first + k).expect("deferred span has a chunk");
            let last = k + 1 == prompt.deferred.len();
            let mtmd = self.engine.mtmd();
            self.n_past = if span.modality == Modality::Text {
                llama::eval_text_chunk(&mtmd, self.lctx.ctx_mut(), &chunk, self.n_past, self.n_batch, last)?
            } else {
                llama::encode_media_chunk(&mtmd, &chunk)?;
                llama::decode_media_chunk(&mtmd, self.lctx.ctx_mut(), &chunk, self.n_past, self.n_batch)?
            };
        }
        if !prompt.deferred.is_empty() {
            self.first_logits = None;
            self.first_logits = self.last_logits().map(<[f32]>::to_vec);
        }
        Ok(())
    }

    /// Takes the attention statistics gathered during the prefill, one per request (empty
    /// when the session did not observe).
    ///
    /// # Errors
    /// An observer failure, or statistics that did not see the whole prompt.
    pub fn take_stats(&self, prompt: &Prompt) -> Result<Vec<AttentionStats>> {
        let Some(obs) = self.lctx.observer() else { return Ok(Vec::new()) };
        let (sink, err) = obs.finish();
        if let Some(e) = err {
            return Err(Error::Callback(e));
        }
        let (Some(_), Some(collector)) = (sink, &self.collector) else { return Ok(Vec::new()) };
        if collector.tokens_seen() < prompt.n_tokens() {
            return Err(Error::Callback(format!(
                "the observer saw {} of {} prompt tokens",
                collector.tokens_seen(),
                prompt.n_tokens()
            )));
        }
        Ok(collector.take_stats())
    }

    /// Removes the cached prompt tokens not in `keep` (one flag per prompt token) and compacts
    /// the survivors into cells `0..kept`, so attention spans only them. Positions are kept, or
    /// renumbered `0..kept` with `--kv-shift`.
    ///
    /// # Errors
    /// Models whose positions are not one per token (M-RoPE), llama.cpp refusals.
    pub fn evict(&mut self, keep: &[bool]) -> Result<EvictStats> {
        let t = Instant::now();
        if self.token_pos.len() < self.n_read {
            return Err(Error::Unsupported {
                what: "pruning",
                reason: "this model gives image tokens 2-D positions (M-RoPE); removing single tokens needs cell-level removal, which csp-llava does not have yet".into(),
            });
        }
        let cached = self.cached_tokens();
        let dropped = |t: usize| !keep.get(t).copied().unwrap_or(true);
        let mut removed = 0;
        let mut i = 0;
        while i < cached.len() {
            if !dropped(cached[i]) {
                i += 1;
                continue;
            }
            // a run of dropped tokens with no kept one between them: one position range
            let start = i;
            while i < cached.len() && dropped(cached[i]) {
                i += 1;
            }
            let (p0, p1) = (self.token_pos[cached[start]], self.token_pos[cached[i - 1]] + 1);
            self.lctx
                .ctx_mut()
                .kv_cache_seq_rm(0, Some(p0 as u32), Some(p1 as u32))
                .map_err(|_| Error::Llama { op: "remove KV cells", code: -1 })?;
            for &u in &cached[start..i] {
                self.token_pos[u] = -1;
            }
            removed += i - start;
        }
        if removed > 0 {
            self.compact(None)?;
            if let Some(c) = self.collector() {
                let pos = &self.token_pos;
                c.on_compact(&|u| pos.get(u).is_some_and(|&p| p >= 0));
            }
            if self.bounded.as_ref().is_some_and(|b| b.shift) {
                self.shift_positions()?;
            }
        }
        Ok(EvictStats { removed, ms: ms(t) })
    }

    /// `--kv-shift`: renumbers the cached prompt tokens `0..n` (RoPE re-applied to their keys
    /// now), so positions stay inside the trained context.
    fn shift_positions(&mut self) -> Result<()> {
        self.note_pos();
        let cached = self.cached_tokens();
        let mut i = 0;
        while i < cached.len() {
            let delta = i as i32 - self.token_pos[cached[i]];
            let start = i;
            while i < cached.len() && i as i32 - self.token_pos[cached[i]] == delta {
                i += 1;
            }
            if delta != 0 {
                let (p0, p1) = (self.token_pos[cached[start]], self.token_pos[cached[i - 1]] + 1);
                self.lctx
                    .ctx_mut()
                    .kv_cache_seq_add(0, Some(p0 as u32), Some(p1 as u32), delta)
                    .map_err(|_| Error::Llama { op: "shift KV positions", code: -1 })?;
            }
        }
        for (i, &u) in cached.iter().enumerate() {
            self.token_pos[u] = i as i32;
        }
        self.n_past = cached.len() as i32;
        llama::apply_kv_updates(self.lctx.ctx_mut());
        Ok(())
    }

    /// Packs the sequence's cells to the front (state save, clear, restore); with `cells`,
    /// moves it into a new context of that many cells and frees the old buffer.
    fn compact(&mut self, cells: Option<u32>) -> Result<()> {
        let state = self
            .lctx
            .ctx()
            .state_seq_get(0, LlamaStateSeqFlags::empty())
            .map_err(|e| Error::Prompt(format!("cannot save the sequence state: {e}")))?;
        match cells {
            None => self.set_state(&state)?,
            Some(n) => {
                let n_batch = self.n_batch.min(n);
                let params = self
                    .params
                    .clone()
                    .with_n_ctx(NonZeroU32::new(n))
                    .with_n_batch(n_batch)
                    .with_n_ubatch(self.params.n_ubatch().min(n_batch));
                let mut lctx = ObservedContext::new(self.engine.model(), params, None, Some(self.engine.cancel.flag()))
                    .map_err(|e| Error::Context { n_ctx: n, reason: e.to_string() })?;
                lctx.ctx_mut()
                    .state_seq_set(&state, 0)
                    .map_err(|e| Error::Prompt(format!("cannot move the pruned cache: {e}")))?;
                self.cells_peak = self.kv_cells_peak();
                self.alloc_peak = self.kv_bytes_allocated_peak();
                self.lctx = lctx;
                self.n_ctx = n;
                self.n_batch = n_batch;
                self.flash_attn = llama::flash_attn_enabled(self.lctx.ctx());
            }
        }
        Ok(())
    }

    /// Hides from each (layer, KV head) the cached prompt tokens it did not keep (its query
    /// heads' bits in the layer's mask); call after eviction and compaction.
    ///
    /// # Errors
    /// Models or caches the mask patch does not cover.
    pub fn apply_masks(&mut self, heads: &HeadKeep) -> Result<()> {
        if self.token_pos.len() < heads.l {
            return Err(Error::Unsupported { what: "per-head masks", reason: "M-RoPE positions".into() });
        }
        let positions = self.token_pos.clone();
        let n_head = self.engine.model().n_head() as usize;
        let group = (n_head / heads.n_head_kv.max(1)).max(1);
        if n_head > 64 {
            return Err(Error::Unsupported { what: "per-head retention", reason: format!("{n_head} query heads (at most 64)") });
        }
        let union = heads.union();
        for layer in 0..heads.n_layer {
            for g in 0..heads.n_head_kv {
                let keep = heads.get(layer, g);
                let hidden: Vec<i32> = (0..heads.l).filter(|&t| union[t] && !keep[t] && positions[t] >= 0).map(|t| positions[t]).collect();
                if hidden.is_empty() {
                    continue;
                }
                let bits = (g * group..(g + 1) * group).fold(0u64, |b, h| b | (1u64 << h));
                llama::mask_layer(self.lctx.ctx_mut(), layer, &hidden, bits)?;
            }
        }
        Ok(())
    }

    /// n-softmax at decode: a sink logit `ln n` for every head of every layer.
    ///
    /// # Errors
    /// Models the sink patch does not cover.
    pub fn set_decode_sinks(&mut self, n: f32) -> Result<()> {
        let n_head = self.engine.model().n_head() as usize;
        let sinks = vec![n.ln(); n_head];
        for layer in 0..self.engine.model().n_layer() as usize {
            llama::set_attn_sinks(self.lctx.ctx_mut(), layer, &sinks)?;
        }
        Ok(())
    }

    /// Cells masked so far by decode-time eviction.
    #[must_use]
    pub fn decode_evicted(&self) -> usize {
        self.decode_evicted
    }

    /// After a token was decoded at `pos`: the decode-time policy's evictions, as masks.
    pub(super) fn after_decode(&mut self, pos: i32) -> Result<()> {
        let Some(fp) = self.decode_eviction.as_mut() else { return Ok(()) };
        let dropped = fp.step(pos as usize);
        self.decode_evicted += dropped.len();
        for (layer, p) in dropped {
            llama::mask_layer(self.lctx.ctx_mut(), layer, &[p as i32], u64::MAX)?;
        }
        Ok(())
    }

    /// Moves the cache into a context of `cells` cells (the kept cells plus generation room),
    /// freeing the large buffer.
    ///
    /// # Errors
    /// Context creation or state transfer failures.
    pub fn shrink(&mut self, cells: u32) -> Result<f64> {
        let t = Instant::now();
        let used = self.kv_info().n_used;
        self.compact(Some(cells.max(used + 1)))?;
        Ok(ms(t))
    }
}

/// A saved sequence: its KV cells, the next position and the logits to sample from.
#[derive(Clone)]
pub struct Snapshot {
    state: llama_cpp_2::context::session::SeqState,
    logits: Option<Vec<f32>>,
    n_past: i32,
    token_pos: Vec<i32>,
    n_read: usize,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot").field("bytes", &self.state.byte_len()).field("n_past", &self.n_past).finish()
    }
}

impl Session<'_> {
    /// Replaces sequence 0 by `state` (its cells land packed from cell 0).
    fn set_state(&mut self, state: &llama_cpp_2::context::session::SeqState) -> Result<()> {
        // masks and sinks belong to the contents being replaced
        llama::clear_overrides(self.lctx.ctx_mut(), self.engine.model().n_layer() as usize);
        self.decode_eviction = None;
        self.lctx
            .ctx_mut()
            .clear_kv_cache_seq(Some(0), None, None)
            .map_err(|_| Error::Llama { op: "clear KV sequence", code: -1 })?;
        self.lctx
            .ctx_mut()
            .state_seq_set(state, 0)
            .map_err(|e| Error::Prompt(format!("cannot restore the sequence state: {e}")))?;
        Ok(())
    }

    /// Saves the sequence (cells, position, pending logits), e.g. right after the prefill.
    ///
    /// # Errors
    /// llama.cpp state errors.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let state = self
            .lctx
            .ctx()
            .state_seq_get(0, LlamaStateSeqFlags::empty())
            .map_err(|e| Error::Prompt(format!("cannot save the sequence state: {e}")))?;
        Ok(Snapshot { state, logits: self.first_logits.clone(), n_past: self.n_past, token_pos: self.token_pos.clone(), n_read: self.n_read })
    }

    /// Restores a snapshot in place of the current sequence.
    ///
    /// # Errors
    /// llama.cpp state errors.
    pub fn restore(&mut self, snap: &Snapshot) -> Result<()> {
        self.set_state(&snap.state)?;
        self.first_logits.clone_from(&snap.logits);
        self.n_past = snap.n_past;
        self.token_pos.clone_from(&snap.token_pos);
        self.n_read = snap.n_read;
        Ok(())
    }

    /// Teacher forcing: evaluates `tokens` in one batch after the current sequence and returns
    /// the logits after each of them (`logits[i]` predicts the token after `tokens[i]`).
    ///
    /// # Errors
    /// A batch larger than the context's batch size; llama.cpp decode failures.
    pub fn teacher_forced(&mut self, tokens: &[i32]) -> Result<Vec<Vec<f32>>> {
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        if self.decode_eviction.is_some() {
            // decode-time eviction acts after every step: one token at a time
            let mut out = Vec::with_capacity(tokens.len());
            for &t in tokens {
                out.extend(self.teacher_forced_batch(&[t])?);
                self.after_decode(self.n_past - 1)?;
            }
            return Ok(out);
        }
        self.teacher_forced_batch(tokens)
    }

    fn teacher_forced_batch(&mut self, tokens: &[i32]) -> Result<Vec<Vec<f32>>> {
        if tokens.len() > self.n_batch as usize {
            return Err(Error::Config { field: "-n/--n-predict", reason: format!("{} teacher-forced tokens exceed the batch size {}", tokens.len(), self.n_batch) });
        }
        let mut batch = llama_cpp_2::llama_batch::LlamaBatch::new(tokens.len(), 1);
        for (i, &t) in tokens.iter().enumerate() {
            batch
                .add(llama_cpp_2::token::LlamaToken(t), self.n_past + i as i32, &[0], true)
                .map_err(|_| Error::Llama { op: "batch add", code: -1 })?;
        }
        self.lctx.ctx_mut().decode(&mut batch).map_err(|e| Error::Llama { op: "decode", code: decode_code(&e) })?;
        self.n_past += tokens.len() as i32;
        self.first_logits = None;
        Ok((0..tokens.len()).map(|i| self.lctx.ctx().get_logits_ith(i as i32).to_vec()).collect())
    }
}
