//! A session: one llama.cpp context holding one sequence's KV cache, filled chunk by chunk,
//! optionally observed, then pruned and compacted.

use std::time::Instant;

use super::bounded::{Bounded, Eviction};
use super::event::{ms, Event};
use super::{Engine, EngineRef, Prompt};
use crate::config::{ContextConfig, FlashAttn, ObserverMode};
use crate::error::{Error, Result};
use crate::llama::observer::Observer;
use crate::llama::{self, Context, ContextParams, KvInfo, Logits};
use crate::stats::{AttentionStats, Collector, KvRequest, KvStats, QueryMoments, Reducer, Rope, StatRequest};
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
    /// Bytes of attention data read out of llama.cpp for the statistics (the graph path's sums;
    /// the host path's `kq` rows where they were copied from device memory).
    pub observe_bytes: u64,
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
    pub(super) engine: EngineRef<'e>,
    pub(super) lctx: Context,
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
    /// Flash attention is paused while the prefill is observed on the host and resumed after it.
    resume_flash_attn: bool,
    /// How the prefill was observed: `"graph"` (patch 0005), `"host"` (`cb_eval`), or not.
    observer_mode: Option<&'static str>,
    /// Whether flash attention ran while the prompt was read.
    prefill_flash_attn: bool,
    /// Compact on the device where llama.cpp can ([`ContextConfig::kv_compact_on_device`]).
    compact_on_device: bool,
    /// How the cache was last compacted, and the bytes compactions moved.
    compaction: Option<&'static str>,
    compact_bytes: u64,
    /// Eviction while decoding (PrefixKV's fixed-point FIFO); entries are positions.
    pub(super) decode_eviction: Option<Box<dyn DecodeEviction>>,
    decode_evicted: usize,
    /// Current key of every prompt token read, −1 once evicted: its position, or where llama.cpp
    /// names cells by rank ([`Session::ranked`], M-RoPE) its rank among the cached cells.
    pub(super) token_pos: Vec<i32>,
    /// llama.cpp names this cache's cells by rank (patch 0014: 2-D positions, M-RoPE): keys are
    /// ranks `0..n`, renumbered after every eviction, not positions.
    ranked: bool,
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

/// The attention scale the model applies to `q·k` (`{arch}.attention.scale`, else 1/√d_head).
fn attention_scale(engine: &Engine) -> f32 {
    let model = engine.model();
    let arch = model.meta("general.architecture").unwrap_or_default();
    if let Some(s) = model.meta(&format!("{arch}.attention.scale")).and_then(|v| v.parse::<f32>().ok()) {
        if s > 0.0 {
            return s;
        }
    }
    1.0 / (head_dim(engine) as f32).sqrt()
}

/// Elements per key head (`{arch}.attention.key_length`, else n_embd / n_head).
fn head_dim(engine: &Engine) -> u32 {
    let model = engine.model();
    let arch = model.meta("general.architecture").unwrap_or_default();
    model
        .meta(&format!("{arch}.attention.key_length"))
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or_else(|| (model.n_embd() as u32 / model.n_head().max(1)).max(1))
}

impl<'e> Session<'e> {
    pub(super) fn new(engine: EngineRef<'e>, prompt: &Prompt, cfg: &ContextConfig, observe: Vec<StatRequest>, bounded: Option<Bounded>) -> Result<Self> {
        cfg.validate()?;
        let n_ctx_train = engine.model().n_ctx_train();
        let engine_ref = engine.clone();
        let engine: &Engine = &engine_ref;
        let n_ctx = match &bounded {
            // the KV buffer holds the cap (or -c, if larger), not the prompt
            Some(b) if cfg.n_ctx != 0 && cfg.n_ctx < b.cap => {
                return Err(Error::Config { field: "n_ctx", reason: format!("{} is smaller than --kv-max-cells ({} cells)", cfg.n_ctx, b.cap) });
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
        let observes = !observe.is_empty();
        let collector = observes.then(|| {
            let model = engine.model();
            let modality = prompt.token_modalities();
            Collector::new(Reducer::new(
                observe.clone(),
                &modality,
                model.n_layer() as usize,
                model.n_head_kv().max(1) as usize,
                attention_scale(engine),
                engine.config().threads.max(1) as usize,
            ))
        });
        // Statistics are computed inside llama.cpp's graph where the requests allow (patch 0005:
        // flash attention stays on); on the host, observation reads attention probabilities,
        // which flash attention never materialises: it is paused for the observed prefill and
        // resumed for decoding (patch 0003).
        let graph = collector.as_ref().is_some_and(|c| cfg.observer != ObserverMode::Host && c.graph_capable());
        if observes && !graph && cfg.observer == ObserverMode::Graph {
            return Err(Error::Config {
                field: "observer",
                reason: format!("these statistics cannot be computed inside the graph (more than {} windows); use the host observer", crate::stats::GraphPlan::MAX_COLS / 2),
            });
        }
        if observes && !graph && engine.capabilities().non_causal_media {
            return Err(Error::Unsupported {
                what: "the host observer on this model",
                reason: "its image tokens attend bidirectionally and the host observer assumes causal attention; the in-graph observer (--kv-observer graph, the default) uses the model's own mask".into(),
            });
        }
        if observes && !graph && cfg.type_v.is_quantized() {
            return Err(Error::Config {
                field: "type_v",
                reason: "a quantized V cache needs flash attention, which the host observer pauses while it reads the prompt; use -ctv f16 (or the graph observer where the policy allows)".into(),
            });
        }
        let hd = head_dim(engine);
        for (flag, t) in [("type_k", cfg.type_k), ("type_v", cfg.type_v)] {
            // every quantized cache type llama.cpp offers has blocks of 32 values
            if t.is_quantized() && hd % 32 != 0 {
                return Err(Error::Config { field: flag, reason: format!("{} stores blocks of 32 values; this model's heads have {hd}", t.name()) });
            }
        }
        let n_batch = cfg.n_batch.min(n_ctx);
        let n_ubatch = cfg.n_ubatch.min(n_batch);
        let threads = engine.config().threads;
        let params = ContextParams { n_ctx, n_batch, n_ubatch, threads, flash_attn: cfg.flash_attn, type_k: cfg.type_k, type_v: cfg.type_v, swa_full: cfg.swa_full };
        let observer = collector.as_ref().map(|c| if graph { Observer::graph(c.sink()) } else { Observer::new(Some(c.sink())) });
        let mut lctx = Context::new(&engine.model, params, observer, Some(engine.cancel.flag()))?;
        let flash_attn = lctx.flash_attn();
        let ranked = lctx.keys_ranked();
        let resume_flash_attn = observes && !graph && flash_attn;
        if resume_flash_attn {
            lctx.set_flash_attn(false);
        }
        if let (true, Some(c)) = (graph, &collector) {
            lctx.set_graph_plan(c.graph_plan(0, &[], 0).as_ref())?;
        }
        if cfg.flash_attn == FlashAttn::On && !flash_attn {
            return Err(Error::Config {
                field: "flash_attn",
                reason: "flash attention was requested but llama.cpp cannot use it for this model/backend".into(),
            });
        }
        tracing::debug!(n_ctx, n_batch, n_ubatch, flash_attn, observed = observes, "context created");
        Ok(Self {
            engine: engine_ref.clone(),
            lctx,
            n_past: 0,
            n_ctx,
            n_batch,
            flash_attn,
            first_logits: None,
            observe_ms: 0.0,
            collector,
            resume_flash_attn,
            observer_mode: observes.then_some(if graph { "graph" } else { "host" }),
            prefill_flash_attn: flash_attn && !resume_flash_attn,
            compact_on_device: cfg.kv_compact_on_device,
            compaction: None,
            compact_bytes: 0,
            decode_eviction: None,
            decode_evicted: 0,
            token_pos: Vec::new(),
            ranked,
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

    /// The key the next token written gets: its position, or with ranked keys the number of
    /// cells the sequence holds.
    pub(super) fn next_key(&self) -> i32 {
        if self.ranked {
            i32::try_from(self.kv_info().n_used).unwrap_or(i32::MAX)
        } else {
            self.n_past
        }
    }

    pub(super) fn note_pos(&mut self) {
        self.max_pos = self.max_pos.max(self.n_past - 1);
    }

    /// The llama.cpp context.
    #[must_use]
    pub fn context(&self) -> &Context {
        &self.lctx
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

    /// How the prefill was observed: `"graph"`, `"host"`, or `None` (not observed).
    #[must_use]
    pub fn observer_mode(&self) -> Option<&'static str> {
        self.observer_mode
    }

    /// Whether flash attention ran while the prompt was read.
    #[must_use]
    pub fn prefill_flash_attn(&self) -> bool {
        self.prefill_flash_attn
    }

    /// Graph path: installs the plan for the prompt tokens still to be read (after an eviction
    /// moved the windows' horizon, or positions with `--kv-shift`).
    pub(super) fn install_graph_plan(&mut self) -> Result<()> {
        if !self.lctx.observer().is_some_and(|o| o.is_graph() && o.has_sink()) {
            return Ok(());
        }
        let next = self.next_key();
        let plan = self.collector.as_ref().and_then(|c| c.graph_plan(self.n_read, &self.token_pos, next));
        self.lctx.set_graph_plan(plan.as_ref())
    }

    /// Whether flash attention is in use.
    #[must_use]
    pub fn flash_attn(&self) -> bool {
        self.flash_attn
    }

    /// KV cache size and occupancy now.
    #[must_use]
    pub fn kv_info(&self) -> KvInfo {
        self.lctx.kv_info().unwrap_or_default()
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
        self.lctx.last_logits()
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
                field: "kv_max_cells",
                reason: "this prompt needs evictions while it is read: use Engine::prefill_pruned or Session::prefill_bounded".into(),
            });
        }
        let base = self.next_key();
        let res = self.prefill_inner(prompt, mode, on_event);
        if res.is_ok() {
            self.token_pos = if self.ranked { (0..prompt.n_tokens()).map(|t| base + t as i32).collect() } else { prompt.positions().unwrap_or_default() };
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
        if self.lctx.observer().is_some_and(Observer::is_graph) {
            self.lctx.set_graph_plan(None)?;
        }
        if let Some(obs) = self.lctx.observer() {
            obs.deactivate();
            stats.observe_bytes = obs.bytes_read();
            stats.observe_ms = self.collector().map_or(0.0, Collector::ms);
            self.observe_ms = stats.observe_ms;
            stats.prefill_ms = (stats.prefill_ms - stats.observe_ms).max(0.0);
        }
        if std::mem::take(&mut self.resume_flash_attn) {
            self.flash_attn = self.lctx.set_flash_attn(true);
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
                self.n_past = self.engine.mtmd.eval_chunks(&mut self.lctx, &prompt.chunks, self.n_past, self.n_batch)?;
                stats.prefill_ms = ms(t);
            }
            PrefillMode::Chunked => {
                let n_chunks = prompt.spans.len();
                let mut done = 0usize;
                for (i, span) in prompt.spans.iter().enumerate() {
                    self.engine.check_cancel()?;
                    let chunk = prompt.chunks.get(i).expect("one span per chunk");
                    let last = i + 1 == n_chunks;
                    if span.modality == Modality::Text {
                        let t = Instant::now();
                        self.n_past = self.engine.mtmd.eval_text(&mut self.lctx, &chunk, self.n_past, self.n_batch, last)?;
                        stats.prefill_ms += ms(t);
                    } else {
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
    pub(super) fn read_media(&mut self, chunk: &llama::Chunk<'_>, stats: &mut PrefillStats) -> Result<()> {
        let t = Instant::now();
        let (n_past, encode) = self.engine.mtmd.read_media(&mut self.lctx, chunk, self.n_past, self.n_batch)?;
        self.n_past = n_past;
        let encode_ms = encode.as_secs_f64() * 1e3;
        stats.encode_ms += encode_ms;
        stats.prefill_ms += (ms(t) - encode_ms).max(0.0);
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
            let mtmd = &self.engine.mtmd;
            self.n_past = if span.modality == Modality::Text {
                mtmd.eval_text(&mut self.lctx, &chunk, self.n_past, self.n_batch, last)?
            } else {
                mtmd.read_media(&mut self.lctx, &chunk, self.n_past, self.n_batch)?.0
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
        let Some(obs) = self.lctx.observer() else {
            return Ok(Vec::new());
        };
        let (sink, err) = obs.finish();
        if let Some(e) = err {
            return Err(Error::Callback(e));
        }
        let (Some(_), Some(collector)) = (sink, &self.collector) else {
            return Ok(Vec::new());
        };
        if collector.tokens_seen() < prompt.n_tokens() {
            let hint = if self.observer_mode == Some("graph") {
                " (the in-graph statistics cover models attending through llama.cpp's plain KV cache; --kv-observer host reads attention on the host)"
            } else {
                ""
            };
            return Err(Error::Callback(format!("the observer saw {} of {} prompt tokens{hint}", collector.tokens_seen(), prompt.n_tokens())));
        }
        Ok(collector.take_stats())
    }

    /// Statistics of the cached keys and values of `tokens` (prompt indices the cache holds;
    /// column `i` is `tokens[i]`), computed on the context's backend (patch 0009).
    ///
    /// # Errors
    /// Caches the scan does not cover; a token the cache does not hold.
    ///
    /// Expected Attention's `z` ([`KvRequest::expected`]) needs the query moments the prefill
    /// observed (`moments`); the future queries are placed from the next position on.
    pub fn kv_stats(&mut self, req: KvRequest, tokens: &[usize], moments: Option<&QueryMoments>) -> Result<KvStats> {
        let mut scan = self.lctx.kv_scan(llama::KvScanStats { knorm: req.knorm, vnorm: req.vnorm, kdiff: req.keydiff })?;
        if let Some(e) = req.expected {
            let refuse = |reason: String| Error::Unsupported { what: "Expected Attention", reason };
            let moments = moments.filter(|m| m.rows.iter().all(|&r| r > 0)).ok_or_else(|| {
                refuse("no query statistics were observed (they come from the in-graph observer: not with --kv-observer host, nor for models it does not cover)".into())
            })?;
            let rope = self.rope().ok_or_else(|| refuse("the model's text tokens have no 1-D NORM/NEOX RoPE (vision RoPE or none)".into()))?;
            let next = usize::try_from(self.n_past()).unwrap_or(0);
            let (mu, cov) = moments.future(&rope, next, e.n_future, e.cov);
            scan.extend(self.lctx.kv_expected(&mu, cov.as_deref())?);
        }
        let positions: Vec<i32> = tokens.iter().map(|&t| self.token_pos.get(t).copied().unwrap_or(-1)).collect();
        let n_layer = self.lctx.model().n_layer() as usize;
        KvStats::from_scan(&scan, n_layer, &positions, req).map_err(|reason| Error::Unsupported { what: "KV statistics", reason })
    }

    /// The model's RoPE, for rotating query statistics to future (text) positions; `None` unless
    /// a text token's is 1-D NORM or NEOX (M-RoPE's is NEOX: [`llama::Model::rope_neox`]).
    fn rope(&self) -> Option<Rope> {
        let m = self.lctx.model();
        let neox = m.rope_neox()?;
        let arch = m.meta("general.architecture")?;
        let d = m.meta(&format!("{arch}.attention.key_length")).and_then(|v| v.parse().ok());
        let d = d.or_else(|| Some(usize::try_from(m.n_embd()).ok()? / usize::try_from(m.n_head()).ok().filter(|&h| h > 0)?))?;
        let n_rot = m.meta(&format!("{arch}.rope.dimension_count")).and_then(|v| v.parse().ok()).unwrap_or(d);
        let freq_base = m.meta(&format!("{arch}.rope.freq_base")).and_then(|v| v.parse().ok()).unwrap_or(10_000.0);
        Some(Rope { n_rot, freq_base, freq_scale: f64::from(m.rope_freq_scale_train()), neox })
    }

    /// LOOK-M's merge ([`crate::policy::LookM`]): for each (layer, KV head), every cached prompt
    /// token `retention` does not keep there is merged into its most similar kept token's K/V
    /// (patch 0010), before [`Session::evict`] removes it. Returns the pairs merged.
    ///
    /// # Errors
    /// Caches llama.cpp cannot merge (V transposed: flash attention off), llama.cpp failures.
    pub fn merge(&mut self, retention: &crate::policy::Retention, mode: crate::policy::lookm::Merge) -> Result<usize> {
        let mode = match mode {
            crate::policy::lookm::Merge::None => return Ok(0),
            crate::policy::lookm::Merge::Pivot => llama::MergeMode::Pivot,
            crate::policy::lookm::Merge::Avg => llama::MergeMode::Average,
        };
        let cached = self.cached_tokens();
        let pos = |t: usize| self.token_pos.get(t).copied().unwrap_or(-1);
        let Some(n_pos) = cached.iter().map(|&t| pos(t)).max().and_then(|p| usize::try_from(p + 1).ok()) else {
            return Ok(0);
        };
        let n_layer = self.lctx.model().n_layer() as usize;
        let n_head_kv = self.lctx.model().n_head_kv() as usize;
        let mut roles = vec![llama::MergeRole::None; n_layer * n_head_kv * n_pos];
        let mut any_source = false;
        for layer in 0..n_layer {
            for head in 0..n_head_kv {
                let keep = retention.per_head.as_ref().filter(|h| layer < h.n_layer && head < h.n_head_kv).map(|h| h.get(layer, head));
                let o = (layer * n_head_kv + head) * n_pos;
                for &t in &cached {
                    let (Ok(p), true) = (usize::try_from(pos(t)), t < retention.keep.len()) else {
                        continue;
                    };
                    let kept = keep.map_or(retention.keep[t], |k| k.get(t).copied().unwrap_or(false));
                    roles[o + p] = if kept { llama::MergeRole::Target } else { llama::MergeRole::Source };
                    any_source |= !kept;
                }
            }
        }
        if !any_source {
            return Ok(0);
        }
        let (n, _) = self.lctx.kv_merge(mode, n_pos, &roles)?;
        Ok(n)
    }

    /// Removes the cached prompt tokens not in `keep` (one flag per prompt token) and compacts
    /// the survivors into cells `0..kept`, so attention spans only them. Positions are kept, or
    /// renumbered `0..kept` with `--kv-shift`. Under M-RoPE (an image's tokens share a position)
    /// cells are removed by key (patch 0014), and the keys renumbered `0..kept` after.
    ///
    /// # Errors
    /// llama.cpp refusals.
    pub fn evict(&mut self, keep: &[bool]) -> Result<EvictStats> {
        let t = Instant::now();
        if self.token_pos.len() < self.n_read {
            return Err(Error::Unsupported { what: "pruning", reason: "the cache's tokens are not known (a state loaded from bytes)".into() });
        }
        let cached = self.cached_tokens();
        let dropped = |t: usize| !keep.get(t).copied().unwrap_or(true);
        let mut removed = 0;
        if self.ranked {
            let gone: Vec<usize> = cached.iter().copied().filter(|&t| dropped(t)).collect();
            let keys: Vec<i32> = gone.iter().map(|&t| self.token_pos[t]).collect();
            removed = self.lctx.remove_keys(&keys)?;
            if removed != keys.len() {
                return Err(Error::Llama { op: "remove KV cells by key", code: -1 });
            }
            gone.iter().for_each(|&u| self.token_pos[u] = -1);
        }
        let mut i = 0;
        while !self.ranked && i < cached.len() {
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
            self.lctx.remove(p0, p1)?;
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
            if self.ranked {
                for (rank, u) in self.cached_tokens().into_iter().enumerate() {
                    self.token_pos[u] = rank as i32;
                }
            } else if self.bounded.as_ref().is_some_and(|b| b.shift) {
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
                self.lctx.shift(p0, p1, delta)?;
            }
        }
        for (i, &u) in cached.iter().enumerate() {
            self.token_pos[u] = i as i32;
        }
        self.n_past = cached.len() as i32;
        self.lctx.apply_kv_updates();
        Ok(())
    }

    /// Packs the sequence's cells to the front; with `cells`, moves it into a new context of that
    /// many cells and frees the old buffer. On the device where llama.cpp can (patch 0006: K/V
    /// never leave it), else — or with [`ContextConfig::kv_compact_on_device`] off — through a
    /// state round trip in host memory (save, clear, restore).
    fn compact(&mut self, cells: Option<u32>) -> Result<()> {
        match cells {
            None => {
                if self.compact_on_device {
                    match self.lctx.compact_on_device() {
                        Ok(bytes) => {
                            self.note_compaction("device", bytes);
                            return Ok(());
                        }
                        Err(Error::Unsupported { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                let state = self.lctx.save()?;
                self.note_compaction("state", 2 * state.byte_len() as u64);
                self.set_state(&state)?;
            }
            Some(n) => {
                let n_batch = self.n_batch.min(n);
                let old = self.lctx.params();
                let params = ContextParams { n_ctx: n, n_batch, n_ubatch: old.n_ubatch.min(n_batch), ..old };
                let mut lctx = self.lctx.sibling(params)?;
                let on_device = if self.compact_on_device {
                    match self.lctx.copy_to(&mut lctx) {
                        Ok(bytes) => {
                            self.note_compaction("device", bytes);
                            true
                        }
                        Err(Error::Unsupported { .. }) => false,
                        Err(e) => return Err(e),
                    }
                } else {
                    false
                };
                if !on_device {
                    let state = self.lctx.save()?;
                    self.note_compaction("state", 2 * state.byte_len() as u64);
                    lctx.load(&state).map_err(|e| Error::Prompt(format!("cannot move the pruned cache: {e}")))?;
                }
                self.cells_peak = self.kv_cells_peak();
                self.alloc_peak = self.kv_bytes_allocated_peak();
                self.lctx = lctx;
                self.n_ctx = n;
                self.n_batch = n_batch;
                self.flash_attn = self.lctx.flash_attn();
            }
        }
        Ok(())
    }

    fn note_compaction(&mut self, how: &'static str, bytes: u64) {
        self.compaction = Some(how);
        self.compact_bytes += bytes;
    }

    /// How the cache was last compacted: `"device"` (patch 0006) or `"state"` (host round
    /// trip); `None` if it never was.
    #[must_use]
    pub fn compaction(&self) -> Option<&'static str> {
        self.compaction
    }

    /// K+V bytes moved by compactions and shrinks so far (a state round trip counts its save
    /// and its restore).
    #[must_use]
    pub fn compact_bytes(&self) -> u64 {
        self.compact_bytes
    }

    /// Hides from each (layer, KV head) the cached prompt tokens it did not keep (its query
    /// heads' bits in the layer's mask); call after eviction and compaction.
    ///
    /// # Errors
    /// Models or caches the mask patch does not cover.
    pub fn apply_masks(&mut self, heads: &HeadKeep) -> Result<()> {
        if self.token_pos.len() < heads.l {
            return Err(Error::Unsupported { what: "per-head masks", reason: "the cache's tokens are not known (a state loaded from bytes)".into() });
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
                self.lctx.mask_layer(layer, &hidden, bits)?;
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
            self.lctx.set_attn_sinks(layer, &sinks)?;
        }
        Ok(())
    }

    /// Cells masked so far by decode-time eviction.
    #[must_use]
    pub fn decode_evicted(&self) -> usize {
        self.decode_evicted
    }

    /// After a token was decoded at `pos`: the decode-time policy's evictions, as masks (by
    /// key: with ranked keys, the token's rank is the last cell's).
    pub(super) fn after_decode(&mut self, pos: i32) -> Result<()> {
        if self.decode_eviction.is_none() {
            return Ok(());
        }
        let key = if self.ranked { self.next_key() - 1 } else { pos };
        let Some(fp) = self.decode_eviction.as_mut() else {
            return Ok(());
        };
        let dropped = fp.step(key as usize);
        self.decode_evicted += dropped.len();
        for (layer, p) in dropped {
            self.lctx.mask_layer(layer, &[p as i32], u64::MAX)?;
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
    state: llama::SeqSnapshot,
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
    fn set_state(&mut self, state: &llama::SeqSnapshot) -> Result<()> {
        // masks and sinks belong to the contents being replaced (Context::restore drops them)
        self.decode_eviction = None;
        self.lctx.restore(state)
    }

    /// Saves the sequence (cells, position, pending logits), e.g. right after the prefill.
    ///
    /// # Errors
    /// llama.cpp state errors.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let state = self.lctx.save()?;
        Ok(Snapshot { state, logits: self.first_logits.clone(), n_past: self.n_past, token_pos: self.token_pos.clone(), n_read: self.n_read })
    }

    /// Reads `text` after what the cache holds (a later turn of a chat: no BOS, special tokens
    /// parsed), keeping the last token's logits; returns the tokens read.
    ///
    /// # Errors
    /// A text that does not fit the context; llama.cpp evaluation failures.
    pub fn eval_continuation(&mut self, text: &str) -> Result<usize> {
        let engine = self.engine.clone();
        let chunks = engine.mtmd.tokenize_continuation(text)?;
        let n: usize = (0..chunks.len()).filter_map(|i| chunks.get(i)).filter_map(|c| c.text_tokens()).map(|t| t.len()).sum();
        let free = (self.n_ctx as usize).saturating_sub(self.kv_info().n_used as usize);
        if n >= free {
            return Err(Error::Prompt(format!("the next turn ({n} tokens) does not fit the {free} free cells of the context: start over (reset) or raise -c")));
        }
        for i in 0..chunks.len() {
            let chunk = chunks.get(i).expect("index below len");
            self.n_past = engine.mtmd.eval_text(&mut self.lctx, &chunk, self.n_past, self.n_batch, i + 1 == chunks.len())?;
        }
        if n > 0 {
            self.first_logits = None;
            self.first_logits = self.last_logits().map(<[f32]>::to_vec);
        }
        Ok(n)
    }

    /// Reads `n` filler tokens (" the", repeated) after what the cache holds, so generation
    /// that follows runs at depth `n` (`bench -d`, as llama-bench's); in batches, or one at a
    /// time where the policy evicts while decoding. Returns the milliseconds it took.
    ///
    /// # Errors
    /// Depth that does not fit the free cells; llama.cpp evaluation failures.
    pub fn eval_depth(&mut self, n: usize) -> Result<f64> {
        let t = std::time::Instant::now();
        if n == 0 {
            return Ok(0.0);
        }
        let engine = self.engine.clone();
        let chunks = engine.mtmd.tokenize_continuation(" the")?;
        let filler = (0..chunks.len()).filter_map(|i| chunks.get(i)).filter_map(|c| c.text_tokens()).flatten().last().ok_or_else(|| Error::Prompt("no filler token".into()))?;
        let free = (self.n_ctx as usize).saturating_sub(self.kv_info().n_used as usize);
        if n >= free {
            return Err(Error::Config { field: "depth", reason: format!("{n} tokens of depth do not fit the {free} free cells of the context: raise -c or lower -d") });
        }
        let step = if self.decode_eviction.is_some() { 1 } else { self.n_batch as usize };
        let mut left = n;
        while left > 0 {
            let k = left.min(step);
            self.lctx.decode(&vec![filler; k], self.n_past, Logits::Last)?;
            self.n_past += k as i32;
            if self.decode_eviction.is_some() {
                self.after_decode(self.n_past - 1)?;
            }
            left -= k;
        }
        self.first_logits = None;
        self.first_logits = self.last_logits().map(<[f32]>::to_vec);
        Ok(t.elapsed().as_secs_f64() * 1e3)
    }

    /// Removes the cells at positions `p0..p1` (a chat's old turn); the freed cells are reused
    /// by what is read next.
    ///
    /// # Errors
    /// llama.cpp refusing.
    pub(super) fn remove_positions(&mut self, p0: i32, p1: i32) -> Result<()> {
        self.lctx.remove(p0, p1)
    }

    /// Decodes one token after the cache (a sampled token generation stopped at without
    /// reading it).
    ///
    /// # Errors
    /// A full context; llama.cpp decode failures.
    pub(super) fn decode_one(&mut self, token: i32) -> Result<()> {
        if self.kv_info().n_used >= self.n_ctx {
            return Err(Error::Prompt("the context is full".into()));
        }
        self.lctx.decode(&[token], self.n_past, Logits::Last)?;
        self.after_decode(self.n_past)?;
        self.n_past += 1;
        self.first_logits = None;
        Ok(())
    }

    /// Replaces the cache by a state [`Session::state_bytes`] wrote, whose next position is
    /// `n_past`.
    ///
    /// # Errors
    /// llama.cpp refusing the bytes.
    pub(super) fn load_state_bytes(&mut self, bytes: &[u8], n_past: i32) -> Result<()> {
        self.decode_eviction = None;
        self.lctx.load_state_bytes(bytes)?;
        self.n_past = n_past;
        self.first_logits = None;
        self.token_pos.clear();
        self.n_read = 0;
        Ok(())
    }

    /// The cache's state in llama.cpp's format ([`llama::Context::state_bytes`]).
    ///
    /// # Errors
    /// llama.cpp state errors.
    pub fn state_bytes(&self) -> Result<Vec<u8>> {
        self.lctx.state_bytes()
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
            return Err(Error::Config { field: "n_predict", reason: format!("{} teacher-forced tokens exceed the batch size {}", tokens.len(), self.n_batch) });
        }
        self.lctx.decode(tokens, self.n_past, Logits::All)?;
        self.n_past += tokens.len() as i32;
        self.first_logits = None;
        Ok((0..tokens.len()).map(|i| self.lctx.logits_ith(i as i32)).collect())
    }
}
