//! The engine: load a text model and its projector once, then run requests.
//!
//! ```text
//! Request ─ prompt::build ─▶ Prompt (chunks + spans) ─ Session::prefill ─▶ KV cache
//!                                                       (chunk by chunk)      │
//!                                     RunReport ◀─ Session::generate ◀────────┘
//! ```
//! Attention is observed during the prefill (inside llama.cpp's graph, or on the host) and the
//! policy's [`Plan`] is applied between prefill and generation.
//!
//! | file | holds |
//! |---|---|
//! | `mod.rs` | [`Engine`]: load, prepare, the run ([`Engine::prefill_pruned`], [`Engine::run_prompt`]) |
//! | `prune.rs` | [`Plan`]: what a policy does with a prompt, and applying it to a session |
//! | `session.rs` | [`Session`]: one llama.cpp context; prefill, evict, compact, shrink, masks |
//! | `stream.rs`, `bounded.rs` | the bounded prefill (`--kv-max-cells`): loop and pure schedule |
//! | `generate.rs` | sampling and streaming text |
//! | `prompt.rs`, `template.rs`, `image.rs` | request → chat text, images → mtmd chunks and spans |
//! | `check.rs` | GGUF checks before llama.cpp sees a file |
//! | `event.rs`, `report.rs` | progress events, [`RunReport`] |

mod bounded;
mod chat;
mod check;
mod event;
mod generate;
pub mod image;
pub mod memory;
pub mod prompt;
mod report;
mod prune;
mod session;
pub mod stream;
mod template;

use std::sync::Arc;

pub use bounded::{Bounded, Eviction};
pub use chat::{Answer, Chat, ChatConfig, ChatEvent, ChatStats, Flow};
pub use event::{Event, StopReason};
pub use generate::Generated;
pub use prompt::Prompt;
pub use prune::Plan;
pub use report::{human_bytes, Pruning, RetainedToken, RunReport};
pub use session::{EvictStats, PrefillMode, PrefillStats, Session, Snapshot};

use event::ms;
use crate::config::{ContextConfig, ModelConfig, Request, SamplingConfig};
use crate::stats::StatRequest;
use crate::policy::PolicyConfig;
use crate::error::{Error, Result};
use crate::llama::{self, KvInfo};

/// How a session holds its engine: borrowed (a `Session<'e>` next to `&'e Engine`) or shared
/// (a `Session<'static>` holding an `Arc<Engine>`, which can be stored next to the engine —
/// in an app's state, a chat — and moved to another thread).
#[derive(Debug, Clone)]
pub(crate) enum EngineRef<'e> {
    Borrowed(&'e Engine),
    Shared(Arc<Engine>),
}

impl std::ops::Deref for EngineRef<'_> {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        match self {
            Self::Borrowed(e) => e,
            Self::Shared(e) => e,
        }
    }
}

/// A loaded text model + projector.
pub struct Engine {
    // Both are Send + Sync (the projector encodes one chunk at a time), so the engine is too.
    mtmd: llama::Mtmd,
    model: Arc<llama::Model>,
    cfg: ModelConfig,
    cancel: crate::CancelHandle,
    device: llama::Device,
    caps: Capabilities,
}

/// What the loaded model can do, computed once at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Image tokens get 2-D positions (M-RoPE, Qwen2-VL family): cells are named and removed by
    /// rank (patch 0014), and positions cannot be shifted.
    pub mrope: bool,
    /// Image tokens attend to each other both ways (Gemma 3): observed in the graph with the
    /// model's own mask (patch 0015); the host observer, which assumes causal attention, is
    /// refused.
    pub non_causal_media: bool,
    /// Sliding-window layers (Gemma 2/3): an iSWA memory of two caches, which per-layer/per-head
    /// masks and the KV scans do not cover.
    pub sliding_window: bool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

impl Engine {
    /// Checks and loads the model and projector.
    ///
    /// # Errors
    /// Missing or corrupt files, unsupported model families, a projector whose output width
    /// differs from the model's hidden size, and llama.cpp load failures — each as its own
    /// [`Error`] variant.
    pub fn load(cfg: &ModelConfig) -> Result<Self> {
        let model_header = check::gguf(&cfg.model, "model")?;
        let mmproj_header = check::gguf(&cfg.mmproj, "mmproj")?;
        check::text_model(&cfg.model, &model_header)?;
        check::projector(cfg, &model_header, &mmproj_header)?;

        // Offload by what the machine has at run time (ggml's device list), as llama.cpp does:
        // a default Apple-silicon build has Metal, a CUDA build may run where no GPU is.
        let device = llama::Device::pick(cfg.n_gpu_layers);
        let gpu = device.gpu;
        let model = Arc::new(llama::Model::load(&cfg.model, if gpu { cfg.n_gpu_layers } else { 0 }, cfg.use_mmap)?);
        if model.is_recurrent_or_hybrid() {
            return Err(Error::Unsupported {
                what: "model family",
                reason: format!(
                    "{} is a recurrent/hybrid model; csp-llava prunes a transformer KV cache",
                    model_header.architecture().unwrap_or("?")
                ),
            });
        }
        let mtmd = llama::Mtmd::load(&cfg.mmproj, &model, gpu && cfg.n_gpu_layers > 0, cfg.threads)?;
        tracing::info!(
            model = %cfg.model.display(),
            mmproj = %cfg.mmproj.display(),
            n_layer = model.n_layer(),
            n_embd = model.n_embd(),
            mrope = mtmd.uses_mrope(),
            backend = %device.backend,
            device = %device.name,
            "loaded"
        );
        let arch = model.meta("general.architecture").unwrap_or_default();
        let sliding_window = model.meta(&format!("{arch}.attention.sliding_window")).is_some_and(|w| w != "0");
        let caps = Capabilities { mrope: mtmd.uses_mrope(), non_causal_media: mtmd.uses_non_causal(), sliding_window };
        Ok(Self { mtmd, model, cfg: cfg.clone(), cancel: crate::CancelHandle::new(), device, caps })
    }

    /// The engine's cancellation handle: [`CancelHandle::cancel`](crate::CancelHandle::cancel)
    /// from any thread stops the running request (see [`crate::cancel`]).
    #[must_use]
    pub fn cancel_handle(&self) -> crate::CancelHandle {
        self.cancel.clone()
    }

    /// Shares an existing handle (one made before loading, e.g. by a signal handler).
    pub fn set_cancel_handle(&mut self, handle: crate::CancelHandle) {
        self.cancel = handle;
    }

    /// `Err(Cancelled)` once the handle was cancelled.
    pub(crate) fn check_cancel(&self) -> Result<()> {
        if self.cancel.is_cancelled() {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }

    /// The backend and device the model runs on.
    #[must_use]
    pub fn device(&self) -> &llama::Device {
        &self.device
    }

    /// The text model.
    #[must_use]
    pub fn model(&self) -> &llama::Model {
        &self.model
    }

    /// The projector.
    #[must_use]
    pub fn mtmd(&self) -> &llama::Mtmd {
        &self.mtmd
    }

    /// What the model can do (computed at load).
    #[must_use]
    pub fn capabilities(&self) -> Capabilities {
        self.caps
    }

    /// The configuration the engine was loaded with.
    #[must_use]
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Formats, loads images and tokenizes a request.
    ///
    /// # Errors
    /// Empty prompt, marker/image count mismatch, unreadable images, template failures.
    pub fn prepare(&self, req: &Request) -> Result<Prompt> {
        prompt::build(&self.model, &self.mtmd, req, None)
    }

    /// [`Engine::prepare`] for a run with `ctx`: without `--kv-max-cells`, a prompt that cannot
    /// fit the context (`-c`, or the trained context for 0) is refused with
    /// [`Error::PromptTooLong`] *before any image is decoded* — mtmd counts image tokens from the
    /// sizes the files declare.
    ///
    /// # Errors
    /// As [`Engine::prepare`], and `PromptTooLong`.
    pub fn prepare_for(&self, req: &Request, ctx: &ContextConfig) -> Result<Prompt> {
        let n_ctx_train = self.model.n_ctx_train();
        let fit = ctx.kv_max_cells.is_none().then(|| prompt::Fit { n_ctx: if ctx.n_ctx == 0 { n_ctx_train } else { ctx.n_ctx }, n_ctx_train });
        prompt::build(&self.model, &self.mtmd, req, fit)
    }

    /// The embeddings the language model receives for media chunk `chunk` of `prompt`
    /// (`n_tokens × n_embd`, token-major).
    ///
    /// # Errors
    /// A chunk index that is not media; encoder failures.
    pub fn media_embeddings(&self, prompt: &Prompt, chunk: usize) -> Result<Vec<f32>> {
        let c = prompt.chunks.get(chunk).filter(|_| prompt.spans.get(chunk).is_some_and(|s| s.media.is_some()));
        let c = c.ok_or_else(|| Error::Prompt(format!("chunk {chunk} is not an image")))?;
        self.mtmd.embeddings(&c, self.model.n_embd() as usize)
    }

    /// Creates a session (a llama.cpp context) sized for `prompt`; with `observe`, attention
    /// statistics are gathered during the prefill (flash attention off).
    ///
    /// # Errors
    /// Invalid settings, a prompt longer than the context, context creation failures.
    pub fn session(&self, prompt: &Prompt, ctx: &ContextConfig, observe: Vec<StatRequest>) -> Result<Session<'_>> {
        let bounded = ctx.kv_max_cells.map(|cap| Bounded::new(prompt, ctx, cap, -1)).transpose()?;
        Session::new(EngineRef::Borrowed(self), prompt, ctx, observe, bounded)
    }

    /// [`Engine::session`] holding the engine by `Arc`: a `Session<'static>`, storable next to
    /// the engine and movable to another thread.
    ///
    /// # Errors
    /// As [`Engine::session`].
    pub fn session_shared(self: &Arc<Self>, prompt: &Prompt, ctx: &ContextConfig, observe: Vec<StatRequest>) -> Result<Session<'static>> {
        let bounded = ctx.kv_max_cells.map(|cap| Bounded::new(prompt, ctx, cap, -1)).transpose()?;
        Session::new(EngineRef::Shared(Arc::clone(self)), prompt, ctx, observe, bounded)
    }

    /// Prefill (bounded by `--kv-max-cells` when set: evicting with the plan's policy while the
    /// prompt is read), the prompt-end pruning pass and the deferred question: the session
    /// generation starts from.
    ///
    /// # Errors
    /// Invalid settings, images larger than the cap, llama.cpp and policy failures.
    pub fn prefill_pruned(
        &self,
        prompt: &Prompt,
        ctx: &ContextConfig,
        plan: &Plan,
        n_predict: i32,
        mode: PrefillMode,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<Prefilled<'_>> {
        Self::prefill_pruned_in(EngineRef::Borrowed(self), prompt, ctx, plan, n_predict, mode, on_event)
    }

    /// [`Engine::prefill_pruned`] holding the engine by `Arc`: the session is a
    /// `Session<'static>` (see [`Engine::session_shared`]).
    ///
    /// # Errors
    /// As [`Engine::prefill_pruned`].
    pub fn prefill_pruned_shared(
        self: &Arc<Self>,
        prompt: &Prompt,
        ctx: &ContextConfig,
        plan: &Plan,
        n_predict: i32,
        mode: PrefillMode,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<Prefilled<'static>> {
        Self::prefill_pruned_in(EngineRef::Shared(Arc::clone(self)), prompt, ctx, plan, n_predict, mode, on_event)
    }

    fn prefill_pruned_in<'e>(
        engine: EngineRef<'e>,
        prompt: &Prompt,
        ctx: &ContextConfig,
        plan: &Plan,
        n_predict: i32,
        mode: PrefillMode,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<Prefilled<'e>> {
        let this: &Engine = &engine;
        let bounded = ctx.kv_max_cells.map(|cap| Bounded::new(prompt, ctx, cap, n_predict)).transpose()?;
        if let Some(b) = &bounded {
            this.check_bounded(prompt, plan, b, n_predict)?;
        }
        let evicts = bounded.as_ref().is_some_and(Bounded::evicts);
        let observe = if evicts { plan.stream_request } else { plan.request };
        // Without -c, a cache that will be pruned and shrunk needs only the prompt's cells while
        // it is read (not the model's trained context), and then the kept cells plus -n (1024
        // for -n -1; --kv-reserve overrides).
        let sized;
        let auto_ctx = ctx.n_ctx == 0 && bounded.is_none();
        let ctx = if auto_ctx && plan.shrink && plan.prunes {
            let n = prompt.n_tokens() + prompt.deferred.iter().map(crate::span::Span::n_tokens).sum::<usize>() + 1;
            let n_ctx_train = this.model.n_ctx_train();
            sized = ContextConfig { n_ctx: u32::try_from(n.next_multiple_of(256)).unwrap_or(u32::MAX).min(n_ctx_train.max(1)), ..ctx.clone() };
            &sized
        } else {
            ctx
        };
        let mut session = Session::new(engine.clone(), prompt, ctx, observe.into_iter().collect(), bounded)?;
        session.shrink_room = match (ctx.kv_reserve, n_predict) {
            (Some(r), _) if ctx.kv_max_cells.is_none() => Some(r),
            (_, n) if n >= 0 => Some(n as u32),
            _ if auto_ctx => Some(1024),
            _ => None,
        };
        if ctx.kv_shift && !session.context().can_shift() {
            return Err(Error::Unsupported { what: "--kv-shift", reason: "llama.cpp cannot shift this model's cached positions".into() });
        }
        let prefill = if evicts { session.prefill_bounded(prompt, plan, on_event)? } else { session.prefill(prompt, mode, on_event)? };
        let kv_before = session.kv_info();
        let stats = session.take_stats(prompt)?;
        let pruning = plan.apply(&mut session, prompt, stats.first(), n_predict)?;
        session.eval_deferred(prompt)?;
        Ok(Prefilled { session, prefill, kv_before, pruning })
    }

    /// What a bounded prefill needs of the model and the policy.
    fn check_bounded(&self, prompt: &Prompt, plan: &Plan, b: &Bounded, n_predict: i32) -> Result<()> {
        if b.evicts() {
            if !plan.policy.prunes() {
                return Err(Error::Config {
                    field: "kv_max_cells",
                    reason: format!(
                        "the prompt ({} tokens) does not fit in {} cells and --kv-policy {} evicts nothing; choose a policy (csp, h2o, snapkv, streaming …) or raise the cap",
                        prompt.n_tokens(),
                        b.cap,
                        plan.policy.name()
                    ),
                });
            }
        }
        if b.shift && (self.caps.mrope || prompt.positions().is_none()) {
            return Err(Error::Unsupported {
                what: "--kv-shift",
                reason: "this model gives images 2-D positions (M-RoPE); shifting positions needs 1-D RoPE — drop --kv-shift".into(),
            });
        }
        let n_ctx_train = self.model.n_ctx_train() as usize;
        let last_pos = prompt.n_tokens() + b.n_deferred + n_predict.max(0) as usize;
        if !b.shift && b.evicts() && last_pos > n_ctx_train {
            tracing::warn!(
                positions = last_pos,
                n_ctx_train,
                "positions will pass the model's trained context ({n_ctx_train}) although the cache holds at most {} cells; --kv-shift keeps them inside it",
                b.cap
            );
        }
        Ok(())
    }

    /// The whole job: prepare, prefill chunk by chunk (observing attention if the policy needs
    /// it), prune, generate; `on_event` sees progress and every piece of text as it comes.
    ///
    /// # Errors
    /// Any error of the steps above.
    pub fn run(
        &self,
        req: &Request,
        ctx: &ContextConfig,
        sampling: &SamplingConfig,
        policy_cfg: &PolicyConfig,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<RunReport> {
        sampling.validate()?;
        policy_cfg.validate()?;
        let t = std::time::Instant::now();
        let prompt = self.prepare_for(req, ctx)?;
        let prepare_ms = ms(t);
        let mut report = self.run_prompt(&prompt, ctx, sampling, policy_cfg, PrefillMode::Chunked, on_event)?;
        report.ttft_ms += prepare_ms;
        Ok(report)
    }

    /// [`Engine::run`] on a prepared prompt, with a choice of prefill path.
    ///
    /// # Errors
    /// Any error of the steps.
    pub fn run_prompt(&self, prompt: &Prompt, ctx: &ContextConfig, sampling: &SamplingConfig, policy_cfg: &PolicyConfig, mode: PrefillMode, on_event: &mut dyn FnMut(Event<'_>)) -> Result<RunReport> {
        self.run_prompt_at_depth(prompt, ctx, sampling, policy_cfg, mode, 0, on_event)
    }

    /// [`Engine::run_prompt`] with `depth` filler tokens read after the pruned prompt and before
    /// generation (`bench -d`, as llama-bench's depth): decoding is measured with the cache
    /// holding the kept cells plus `depth`. The cache is sized for `n_predict + depth` after
    /// the prompt.
    ///
    /// # Errors
    /// As [`Engine::run_prompt`]; a depth that does not fit the context.
    #[allow(clippy::too_many_arguments)]
    pub fn run_prompt_at_depth(
        &self,
        prompt: &Prompt,
        ctx: &ContextConfig,
        sampling: &SamplingConfig,
        policy_cfg: &PolicyConfig,
        mode: PrefillMode,
        depth: u32,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<RunReport> {
        self.check_cancel()?;
        let t = std::time::Instant::now();
        let plan = Plan { shrink: ctx.kv_shrink, ..self.plan(prompt, policy_cfg)? };
        let room = if sampling.n_predict < 0 { sampling.n_predict } else { sampling.n_predict.saturating_add(i32::try_from(depth).unwrap_or(i32::MAX)) };
        let Prefilled { mut session, prefill, kv_before, pruning } = self.prefill_pruned(prompt, ctx, &plan, room, mode, on_event)?;
        let ttft_ms = ms(t);
        let kv_after = session.kv_info();
        session.eval_depth(depth as usize)?;
        let generated = session.generate(sampling, on_event)?;
        let mut report = RunReport::new(prompt, &session, &prefill, kv_before, kv_after, plan.policy.name(), pruning, generated);
        report.ttft_ms = ttft_ms;
        Ok(report)
    }
}

/// A prefilled and pruned session: see [`Engine::prefill_pruned`].
#[derive(Debug)]
pub struct Prefilled<'e> {
    /// The session, ready to generate.
    pub session: Session<'e>,
    /// Prefill timings.
    pub prefill: PrefillStats,
    /// The cache before the prompt-end pass.
    pub kv_before: KvInfo,
    /// What the prompt-end pass did.
    pub pruning: Pruning,
}
