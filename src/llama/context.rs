//! A llama.cpp context (one KV cache) and what csp-llava does with it: evaluate tokens, read
//! logits, remove/shift/save/restore the cells of sequence 0, and the per-(layer, head) masks,
//! run-time sinks and flash-attention toggle of our patches (`0001-llama-info-accessors`,
//! `0003-layer-head-masks-sinks-fa-toggle`, `0004-memory-apply-updates`).
//!
//! A [`Context`] owns an `Arc` of its [`Model`], so it has no lifetime and can live next to
//! (or outlive) whoever made it.

use std::ffi::c_void;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::context::session::{LlamaStateSeqFlags, SeqState};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_sys_2 as sys;

use super::model::Model;
use super::observer::{graph_trampoline, Observer};
use super::sink::GraphPlan;
use super::KvInfo;
use crate::config::{CacheType, FlashAttn};
use crate::error::{Error, Result};

/// The settings of a context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextParams {
    /// Cells.
    pub n_ctx: u32,
    /// Logical batch.
    pub n_batch: u32,
    /// Physical batch.
    pub n_ubatch: u32,
    /// Threads (generation and batch).
    pub threads: u32,
    /// Flash attention.
    pub flash_attn: FlashAttn,
    /// K cache type.
    pub type_k: CacheType,
    /// V cache type.
    pub type_v: CacheType,
    /// Sliding-window layers cache the whole context (llama.cpp's `swa_full`).
    pub swa_full: bool,
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

impl ContextParams {
    fn to_llama(self) -> LlamaContextParams {
        let fa = match self.flash_attn {
            FlashAttn::Off => sys::LLAMA_FLASH_ATTN_TYPE_DISABLED,
            FlashAttn::On => sys::LLAMA_FLASH_ATTN_TYPE_ENABLED,
            FlashAttn::Auto => sys::LLAMA_FLASH_ATTN_TYPE_AUTO,
        };
        let threads = i32::try_from(self.threads).unwrap_or(i32::MAX);
        LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(self.n_ctx))
            .with_n_batch(self.n_batch)
            .with_n_ubatch(self.n_ubatch)
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            .with_flash_attention_policy(fa)
            .with_type_k(kv_type(self.type_k))
            .with_type_v(kv_type(self.type_v))
            .with_swa_full(self.swa_full)
    }
}

/// A saved sequence (its KV cells, in llama.cpp's state format).
#[derive(Clone)]
pub struct SeqSnapshot(SeqState);

impl std::fmt::Debug for SeqSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeqSnapshot").field("bytes", &self.byte_len()).finish()
    }
}

impl SeqSnapshot {
    /// Bytes of the saved state.
    #[must_use]
    pub fn byte_len(&self) -> usize {
        self.0.byte_len()
    }
}

/// Which logits an evaluation computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None.
    None,
    /// The last token's.
    Last,
    /// Every token's.
    All,
}

/// A llama.cpp context, the attention observer its `cb_eval` points to and the flag its abort
/// callback reads, owned together so neither can be dropped while llama.cpp may still call it:
/// fields drop in declaration order, the context first, the model last.
pub struct Context {
    ctx: LlamaContext<'static>,
    observer: Option<Box<Observer>>,
    /// The flag llama.cpp's abort callback reads (kept alive as long as the context).
    _cancel: Option<Arc<AtomicBool>>,
    params: ContextParams,
    model: Arc<Model>,
}

/// llama.cpp's abort callback: `data` is the `AtomicBool` of a [`Context`]'s cancel flag.
extern "C" fn abort_requested(data: *mut c_void) -> bool {
    // SAFETY: `data` is `Arc::as_ptr` of the flag the context's owner holds until after the
    // context is freed (field order of Context); a load cannot panic.
    unsafe { (*(data as *const AtomicBool)).load(Ordering::Relaxed) }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("params", &self.params).field("observed", &self.observer.is_some()).finish_non_exhaustive()
    }
}

fn decode_code(e: &llama_cpp_2::DecodeError) -> i32 {
    match e {
        llama_cpp_2::DecodeError::NoKvCacheSlot => 1,
        llama_cpp_2::DecodeError::NTokensZero => -1,
        llama_cpp_2::DecodeError::Unknown(c) => *c,
    }
}

impl Context {
    /// Creates a context; with an observer, llama.cpp's `cb_eval` is routed to it; with
    /// `cancel`, setting the flag makes a running evaluation return "aborted".
    ///
    /// # Errors
    /// [`Error::Context`] when llama.cpp cannot create it (usually memory).
    pub fn new(model: &Arc<Model>, params: ContextParams, observer: Option<Observer>, cancel: Option<Arc<AtomicBool>>) -> Result<Self> {
        let fail = |reason: String| Error::Context { n_ctx: params.n_ctx, reason };
        let observer = observer.map(Box::new);
        let lparams = match &observer {
            Some(obs) => {
                let (cb, ud) = obs.callback();
                // SAFETY: `ud` points into the boxed observer, which this struct owns and drops
                // only after the context (field order); the box never moves its contents.
                unsafe { params.to_llama().with_cb_eval(cb, ud) }
            }
            None => params.to_llama(),
        };
        let backend = super::backend()?;
        let (raw_model, guard) = model.raw_for_context();
        let ctx = raw_model.new_context(backend, lparams).map_err(|e| fail(e.to_string()))?;
        drop(guard);
        // SAFETY: the context borrows the model, which lives in the `Arc` this struct holds and
        // drops after the context (field order); an `Arc`'s contents never move. So the borrow
        // outlives every use of the context, which is all `'static` promises here.
        let ctx = unsafe { std::mem::transmute::<LlamaContext<'_>, LlamaContext<'static>>(ctx) };
        if let Some(flag) = &cancel {
            // SAFETY: a live context; the data pointer is the flag's AtomicBool, which the Arc in
            // this struct keeps alive until after the context is dropped (field order). llama.cpp
            // polls it between graph nodes and makes the evaluation return "aborted".
            unsafe { sys::llama_set_abort_callback(ctx.as_raw(), Some(abort_requested), Arc::as_ptr(flag) as *mut c_void) };
        }
        Ok(Self { ctx, observer, _cancel: cancel, params, model: Arc::clone(model) })
    }

    /// A new context like this one with other settings and no observer (a shrink).
    ///
    /// # Errors
    /// As [`Context::new`].
    pub fn sibling(&self, params: ContextParams) -> Result<Self> {
        Self::new(&self.model, params, None, self._cancel.clone())
    }

    /// The settings it was created with.
    #[must_use]
    pub fn params(&self) -> ContextParams {
        self.params
    }

    /// The model.
    #[must_use]
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// The observer, if any.
    #[must_use]
    pub fn observer(&self) -> Option<&Observer> {
        self.observer.as_deref()
    }

    /// The llama-cpp-2 context, for the other wrappers of this module.
    pub(super) fn raw_mut(&mut self) -> &mut LlamaContext<'static> {
        &mut self.ctx
    }

    /// Installs (`Some`) or removes (`None`) the in-graph attention statistics of patch 0005,
    /// fed to this context's graph observer ([`Observer::graph`]). Takes effect at the next
    /// evaluation, which reserves compute buffers again: install once per prefill pass.
    ///
    /// # Errors
    /// No graph observer; a plan llama.cpp refuses (more than 64 columns, a column of no
    /// variant).
    pub fn set_graph_plan(&mut self, plan: Option<&GraphPlan>) -> Result<()> {
        let refuse = |reason: String| Error::Unsupported { what: "in-graph attention statistics", reason };
        let Some(plan) = plan else {
            // SAFETY: a live context; a null params pointer removes the observer.
            unsafe { sys::llama_set_attn_observer(self.ctx.as_raw(), std::ptr::null()) };
            return Ok(());
        };
        let obs = self.observer.as_deref().filter(|o| o.is_graph()).ok_or_else(|| refuse("the context has no graph observer".into()))?;
        let n_var = i32::try_from(plan.n.len()).map_err(|_| refuse("too many variants".into()))?;
        let n_cols = i32::try_from(plan.col_var.len()).map_err(|_| refuse("too many columns".into()))?;
        let n_pos = i32::try_from(plan.cols_of_pos.len()).map_err(|_| refuse("too many positions".into()))?;
        let elite = !plan.elite_alpha.is_empty();
        if elite && (plan.elite_alpha.len() != plan.n.len() || plan.key_of_pos.len() != plan.cols_of_pos.len()) {
            return Err(refuse("an elite plan needs one alpha per variant and one key class per position".into()));
        }
        if !plan.moments.is_empty() && plan.moments.len() != plan.n.len() {
            return Err(refuse("a moments plan needs one flag per variant".into()));
        }
        let params = sys::llama_attn_obs_params {
            seq: 0,
            n_var,
            n: plan.n.as_ptr(),
            n_cols,
            col_var: plan.col_var.as_ptr(),
            n_pos,
            cols_of_pos: plan.cols_of_pos.as_ptr(),
            n_rows_chunk: plan.rows_chunk,
            // LLAMA_ATTN_OBS_FORCE_TRANSPOSE (a #define bindgen does not see)
            flags: if plan.force_transpose { 2 } else { 0 },
            cb: Some(graph_trampoline),
            user_data: std::ptr::from_ref(obs).cast_mut().cast(),
            var_elite_alpha: if elite { plan.elite_alpha.as_ptr() } else { std::ptr::null() },
            key_of_pos: if elite { plan.key_of_pos.as_ptr() } else { std::ptr::null() },
            elite_last: plan.elite_last,
            var_moments: if plan.moments.is_empty() { std::ptr::null() } else { plan.moments.as_ptr() },
        };
        // SAFETY: a live context; the tables are valid for the lengths given and llama.cpp
        // copies them; `user_data` is the boxed observer this struct owns and drops after the
        // context (field order), so it outlives every callback.
        let ok = unsafe { sys::llama_set_attn_observer(self.ctx.as_raw(), &raw const params) };
        ok.then_some(()).ok_or_else(|| refuse(format!("llama.cpp refused the plan ({} variants, {} columns)", plan.n.len(), plan.col_var.len())))
    }

    /// Evaluates `tokens` at positions `pos0..`, sequence 0, in one batch (at most the
    /// context's `n_batch` tokens).
    ///
    /// # Errors
    /// [`Error::Llama`] with llama.cpp's return code (1: no KV slot; 2: aborted).
    pub fn decode(&mut self, tokens: &[i32], pos0: i32, logits: Logits) -> Result<()> {
        let mut batch = LlamaBatch::new(tokens.len().max(1), 1);
        for (i, &t) in tokens.iter().enumerate() {
            let want = match logits {
                Logits::None => false,
                Logits::Last => i + 1 == tokens.len(),
                Logits::All => true,
            };
            batch.add(LlamaToken(t), pos0 + i as i32, &[0], want).map_err(|_| Error::Llama { op: "batch add", code: -1 })?;
        }
        self.ctx.decode(&mut batch).map_err(|e| Error::Llama { op: "decode", code: decode_code(&e) })
    }

    /// Logits of output `i` of the last evaluation (`Logits::All` numbers outputs by token).
    #[must_use]
    pub fn logits_ith(&self, i: i32) -> Vec<f32> {
        self.ctx.get_logits_ith(i).to_vec()
    }

    /// Logits of the last output of the most recent evaluation (`n_vocab` values), or `None`
    /// if that evaluation produced no logits.
    #[must_use]
    pub fn last_logits(&self) -> Option<&[f32]> {
        let n_vocab = usize::try_from(self.model.n_vocab()).unwrap_or(0);
        // SAFETY: llama_get_logits_ith(-1) returns null or a pointer to n_vocab floats owned by
        // the context, valid until the next evaluation — which needs &mut self, so not while the
        // returned borrow lives.
        unsafe {
            let p = sys::llama_get_logits_ith(self.ctx.as_raw(), -1);
            (!p.is_null()).then(|| std::slice::from_raw_parts(p, n_vocab))
        }
    }

    /// Removes sequence 0's cells at positions `p0..p1`.
    ///
    /// # Errors
    /// [`Error::Llama`] when llama.cpp refuses (a partial removal it cannot do).
    pub fn remove(&mut self, p0: i32, p1: i32) -> Result<()> {
        let (p0, p1) = (u32::try_from(p0).ok(), u32::try_from(p1).ok());
        self.ctx.kv_cache_seq_rm(0, p0, p1).map_err(|_| Error::Llama { op: "remove KV cells", code: -1 })?;
        Ok(())
    }

    /// Whether llama.cpp names this cache's cells by rank rather than position (patch 0014: 2-D
    /// positions, M-RoPE): then every position csp-llava's patches take or return is the cell's
    /// rank in the sequence, `0..n`.
    #[must_use]
    pub fn keys_ranked(&self) -> bool {
        // SAFETY: a live llama_context; the call only reads the model's parameters.
        unsafe { sys::llama_memory_keys_ranked(sys::llama_get_memory(self.ctx.as_raw())) == 1 }
    }

    /// Removes sequence 0's cells whose keys are in `keys` (patch 0014: ranks under 2-D positions,
    /// all taken before the removal). Returns the cells removed.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for memory other than a plain KV cache.
    pub fn remove_keys(&mut self, keys: &[i32]) -> Result<usize> {
        // SAFETY: a live llama_context borrowed mutably; `keys` is a valid slice for the duration
        // of the call (the callee copies it).
        let n = unsafe { sys::llama_memory_seq_rm_keys(sys::llama_get_memory(self.ctx.as_raw()), 0, keys.as_ptr(), keys.len()) };
        usize::try_from(n).map_err(|_| Error::Unsupported { what: "cell removal", reason: "llama.cpp removes single cells from a plain KV cache only".into() })
    }

    /// Adds `delta` to the positions `p0..p1` of sequence 0 (the keys are re-rotated at the
    /// next evaluation, or by [`Context::apply_kv_updates`]).
    ///
    /// # Errors
    /// [`Error::Llama`] when llama.cpp refuses.
    pub fn shift(&mut self, p0: i32, p1: i32, delta: i32) -> Result<()> {
        let (p0, p1) = (u32::try_from(p0).ok(), u32::try_from(p1).ok());
        self.ctx.kv_cache_seq_add(0, p0, p1, delta).map_err(|_| Error::Llama { op: "shift KV positions", code: -1 })
    }

    /// Packs sequence 0's cells to cells `0..n` without leaving the device (patch 0006): K and V
    /// of every layer move through a graph on the context's backend, with each cell's metadata
    /// (position, pending shift, patch 0003's head masks). Returns the K+V bytes moved.
    ///
    /// # Errors
    /// [`Error::Unsupported`] when the cache cannot be compacted this way (nothing changed: the
    /// caller may fall back to a state round trip); [`Error::Llama`] when the graph failed
    /// after it started (the cache contents are then undefined).
    pub fn compact_on_device(&mut self) -> Result<u64> {
        let mut bytes = 0u64;
        // SAFETY: a live context borrowed mutably; `bytes` is a valid out-pointer.
        let n = unsafe { sys::llama_memory_seq_compact(self.ctx.as_raw(), 0, &mut bytes) };
        match n {
            n if n >= 0 => Ok(bytes),
            -1 => Err(Error::Unsupported { what: "compaction on the device", reason: "llama.cpp cannot gather this cache's cells".into() }),
            code => Err(Error::Llama { op: "compact the KV cache", code }),
        }
    }

    /// Per-cell statistics of sequence 0's cached keys and values (patch 0009), one
    /// [`KvScanLayer`] per layer: `‖k‖`, `‖v‖` and the cosine of each key with the mean unit
    /// key of its KV head (KeyDiff's anchor), computed by graphs on the context's backend.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for caches the scan does not cover (iSWA/hybrid, a quantized
    /// head row that is not whole blocks); [`Error::Llama`] when a graph failed.
    pub fn kv_scan(&mut self, what: KvScanStats) -> Result<Vec<KvScanLayer>> {
        let mut out: Vec<KvScanLayer> = Vec::new();
        let mask = u32::from(what.knorm) | u32::from(what.vnorm) << 1 | u32::from(what.kdiff) << 2;
        if mask == 0 {
            return Ok(out);
        }
        // SAFETY: a live context borrowed mutably; the callback runs synchronously inside this
        // call and receives `out` (alive for the call) as its user data.
        let n = unsafe { sys::llama_memory_seq_kv_stats(self.ctx.as_raw(), 0, mask, Some(kv_scan_trampoline), (&raw mut out).cast()) };
        match n {
            n if n >= 0 => Ok(out),
            -1 if out.is_empty() => Err(Error::Unsupported { what: "KV statistics (knorm, vnorm, keydiff)", reason: "llama.cpp cannot scan this cache (iSWA/hybrid memory, or quantized head rows that are not whole blocks)".into() }),
            code => Err(Error::Llama { op: "scan the KV cache", code }),
        }
    }

    /// Expected Attention's score of every cached key of sequence 0 (patch 0013), one
    /// [`KvScanLayer`] per layer with `z` (`[query head][cell]`): `μ′·k/√d + kᵀΣ′k/(2d)` for the
    /// query distribution `mu` (`[layer][head][d]`) and `cov` (`[layer][head][d][d]`, or `None`
    /// for the mean only), computed by graphs on the context's backend.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for caches or models the scan does not cover (iSWA/hybrid, layers
    /// of different head counts, `mu`/`cov` of the wrong size); [`Error::Llama`] when a graph failed.
    pub fn kv_expected(&mut self, mu: &[f32], cov: Option<&[f32]>) -> Result<Vec<KvScanLayer>> {
        let m = self.model();
        let (n_layer, n_head) = (m.n_layer() as usize, usize::try_from(m.n_head()).unwrap_or(0));
        let d = mu.len().checked_div(n_layer * n_head).unwrap_or(0);
        if d == 0 || mu.len() != n_layer * n_head * d || cov.is_some_and(|c| c.len() != mu.len() * d) {
            return Err(Error::Unsupported { what: "Expected Attention", reason: format!("{} means and {} covariances for {n_layer} layers x {n_head} heads", mu.len(), cov.map_or(0, <[f32]>::len)) });
        }
        let mut out: Vec<KvScanLayer> = Vec::new();
        // SAFETY: a live context borrowed mutably; mu and cov hold n_layer·n_head·d (·d) floats
        // as checked above and outlive the call; the callback runs synchronously inside it and
        // receives `out` (alive for the call) as its user data.
        let n = unsafe {
            sys::llama_memory_seq_kv_expected(self.ctx.as_raw(), 0, mu.as_ptr(), cov.map_or(std::ptr::null(), <[f32]>::as_ptr), Some(kv_scan_trampoline), (&raw mut out).cast())
        };
        match n {
            n if n >= 0 => Ok(out),
            -1 if out.is_empty() => Err(Error::Unsupported { what: "Expected Attention", reason: "llama.cpp cannot scan this cache (iSWA/hybrid memory, layers of different head counts, or quantized head rows that are not whole blocks)".into() }),
            code => Err(Error::Llama { op: "score the KV cache (Expected Attention)", code }),
        }
    }

    /// LOOK-M's merge (patch 0010): for each (layer, KV head), every position whose role is
    /// [`MergeRole::Source`] is merged into the [`MergeRole::Target`] with the most similar key
    /// (cosine), K and V rows alike, on the device. `roles` is `[n_layer][n_head_kv][n_pos]`.
    /// Returns the pairs merged and, per role entry, the target position of each source (else -1).
    ///
    /// # Errors
    /// [`Error::Unsupported`] when llama.cpp cannot merge this cache (nothing changed: transposed
    /// V without flash attention, iSWA/hybrid memory, a cache type `set_rows` cannot write, or
    /// roles of the wrong size); [`Error::Llama`] when it failed midway.
    pub fn kv_merge(&mut self, mode: MergeMode, n_pos: usize, roles: &[MergeRole]) -> Result<(usize, Vec<i32>)> {
        let n_layer = self.model().n_layer() as usize;
        let n_head_kv = usize::try_from(self.model().n_head_kv()).unwrap_or(0);
        let want = n_layer * n_head_kv * n_pos;
        if roles.len() != want || n_pos == 0 || i32::try_from(n_pos).is_err() {
            return Err(Error::Unsupported { what: "merging KV rows", reason: format!("{} roles for {n_layer} layers x {n_head_kv} KV heads x {n_pos} positions", roles.len()) });
        }
        let role: Vec<u8> = roles.iter().map(|r| *r as u8).collect();
        let mut assign = vec![-1i32; want];
        let params = sys::llama_kv_merge_params {
            seq: 0,
            mode: match mode {
                MergeMode::Pivot => 0,
                MergeMode::Average => 1,
            },
            n_pos: n_pos as i32,
            role: role.as_ptr(),
            assign: assign.as_mut_ptr(),
        };
        // SAFETY: a live context borrowed mutably; `role` and `assign` hold n_layer·n_head_kv·n_pos
        // entries (checked above) and outlive the synchronous call.
        let n = unsafe { sys::llama_memory_seq_merge(self.ctx.as_raw(), &params) };
        match n {
            n if n >= 0 => Ok((n as usize, assign)),
            -1 => Err(Error::Unsupported { what: "merging KV rows (lookm)", reason: "llama.cpp cannot merge this cache: it needs flash attention on (-fa on) when the context is made, a plain KV cache and a cache type set_rows writes; or use --lookm-merge none".into() }),
            code => Err(Error::Llama { op: "merge KV rows", code }),
        }
    }

    /// Copies sequence 0's cells, packed, into `dst` (a context of the same model with an empty
    /// cache of at least as many cells) without a host round trip (patch 0006); masks and sinks
    /// go along. Returns the K+V bytes copied.
    ///
    /// # Errors
    /// [`Error::Unsupported`] when it cannot be done this way (`dst` unchanged); [`Error::Llama`]
    /// when the copy failed after it started.
    pub fn copy_to(&self, dst: &mut Context) -> Result<u64> {
        let mut bytes = 0u64;
        // SAFETY: two distinct live contexts (`dst` is borrowed mutably, so it is not `self`);
        // llama.cpp reads src's cache tensors and writes dst's; `bytes` is a valid out-pointer.
        let n = unsafe { sys::llama_memory_seq_copy_to(self.ctx.as_raw(), dst.ctx.as_raw(), 0, &mut bytes) };
        match n {
            n if n >= 0 => Ok(bytes),
            -1 => Err(Error::Unsupported { what: "copying the KV cache on the device", reason: "llama.cpp cannot copy this cache's cells".into() }),
            code => Err(Error::Llama { op: "copy the KV cache", code }),
        }
    }

    /// Sequence 0's state as llama.cpp writes it (`llama_state_seq_get_data`: magic, seq id,
    /// then the cache's cells and K/V rows), for saving to a file or checking the cache's rows.
    ///
    /// # Errors
    /// [`Error::Llama`] when llama.cpp writes nothing.
    pub fn state_bytes(&self) -> Result<Vec<u8>> {
        // SAFETY: a live context; the size query only reads the cache.
        let size = unsafe { sys::llama_state_seq_get_size(self.ctx.as_raw(), 0) };
        let mut buf = vec![0u8; size];
        // SAFETY: `buf` holds `size` writable bytes, as llama.cpp was told; the call is synchronous.
        let n = unsafe { sys::llama_state_seq_get_data(self.ctx.as_raw(), buf.as_mut_ptr(), size, 0) };
        if n == 0 || n > size {
            return Err(Error::Llama { op: "read the sequence state", code: -1 });
        }
        buf.truncate(n);
        Ok(buf)
    }

    /// Replaces sequence 0 by a state [`Context::state_bytes`] wrote (masks and sinks of the
    /// replaced contents are dropped).
    ///
    /// # Errors
    /// [`Error::Prompt`] when llama.cpp refuses the bytes (another model, a corrupt state, too
    /// few cells).
    pub fn load_state_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.clear_overrides();
        self.ctx.clear_kv_cache_seq(Some(0), None, None).map_err(|_| Error::Llama { op: "clear KV sequence", code: -1 })?;
        // SAFETY: a live context borrowed mutably; `bytes` is valid for its length during the
        // synchronous call, which only reads it.
        let n = unsafe { sys::llama_state_seq_set_data(self.ctx.as_raw(), bytes.as_ptr(), bytes.len(), 0) };
        if n == 0 {
            return Err(Error::Prompt("llama.cpp refused the saved cache (another model or context settings, or a damaged file)".into()));
        }
        Ok(())
    }

    /// Saves sequence 0.
    ///
    /// # Errors
    /// [`Error::Prompt`] with llama.cpp's reason.
    pub fn save(&self) -> Result<SeqSnapshot> {
        self.ctx.state_seq_get(0, LlamaStateSeqFlags::empty()).map(SeqSnapshot).map_err(|e| Error::Prompt(format!("cannot save the sequence state: {e}")))
    }

    /// Replaces sequence 0 by a saved one (its cells land packed from cell 0); masks and sinks
    /// of the replaced contents are dropped.
    ///
    /// # Errors
    /// [`Error::Llama`] / [`Error::Prompt`] when llama.cpp refuses.
    pub fn restore(&mut self, state: &SeqSnapshot) -> Result<()> {
        self.clear_overrides();
        self.ctx.clear_kv_cache_seq(Some(0), None, None).map_err(|_| Error::Llama { op: "clear KV sequence", code: -1 })?;
        self.load(state)
    }

    /// Loads a saved sequence into an empty context.
    ///
    /// # Errors
    /// [`Error::Prompt`] when llama.cpp refuses (e.g. too few cells).
    pub fn load(&mut self, state: &SeqSnapshot) -> Result<()> {
        self.ctx.state_seq_set(&state.0, 0).map(|_| ()).map_err(|e| Error::Prompt(format!("cannot restore the sequence state: {e}")))
    }

    /// KV cache info; `None` for memories that are not a KV cache (recurrent models).
    #[must_use]
    pub fn kv_info(&self) -> Option<KvInfo> {
        let mut out = sys::llama_kv_info { n_cells: 0, n_used: 0, n_used_peak: 0, used_max_p1: 0, k_bytes: 0, v_bytes: 0 };
        // SAFETY: a live llama_context; llama_get_memory returns its memory (or null, which
        // llama_memory_kv_info handles); `out` is a valid, writable struct.
        let ok = unsafe { sys::llama_memory_kv_info(sys::llama_get_memory(self.ctx.as_raw()), &mut out) };
        ok.then_some(KvInfo {
            n_cells: out.n_cells,
            n_used: out.n_used,
            n_used_peak: out.n_used_peak,
            used_max_p1: out.used_max_p1,
            k_bytes: out.k_bytes,
            v_bytes: out.v_bytes,
        })
    }

    /// What llama.cpp holds for this context (or would allocate, for a model loaded with
    /// [`Model::load_no_alloc`]): weights, KV cache and compute buffers, host and device.
    #[must_use]
    pub fn memory_totals(&self) -> super::MemoryTotals {
        // SAFETY: a live llama_context; the call only reads llama.cpp's buffer sizes.
        let t = unsafe { sys::llama_get_memory_totals(self.ctx.as_raw()) };
        super::MemoryTotals {
            model_host: t.model_host as u64,
            model_device: t.model_device as u64,
            context_host: t.context_host as u64,
            context_device: t.context_device as u64,
            compute_host: t.compute_host as u64,
            compute_device: t.compute_device as u64,
        }
    }

    /// Applies pending KV updates (the K-shift after [`Context::shift`]) now rather than at the
    /// next evaluation (patch 0004).
    pub fn apply_kv_updates(&mut self) -> bool {
        // SAFETY: the live context this struct owns; the call only runs llama.cpp's own memory
        // update on it.
        unsafe { sys::llama_memory_apply_updates(self.ctx.as_raw()) }
    }

    /// Whether the cache can shift positions (`llama_memory_seq_add` with RoPE re-applied).
    #[must_use]
    pub fn can_shift(&self) -> bool {
        // SAFETY: the memory handle of a live context; the call only reads a flag.
        unsafe { sys::llama_memory_can_shift(sys::llama_get_memory(self.ctx.as_raw())) }
    }

    /// Whether the context runs flash attention (`-fa auto` resolved).
    #[must_use]
    pub fn flash_attn(&self) -> bool {
        // SAFETY: a live llama_context; the function only reads its parameters.
        unsafe { sys::llama_flash_attn_enabled(self.ctx.as_raw()) }
    }

    /// Pauses (`false`) or resumes (`true`) flash attention (patch 0003): observation on the
    /// host needs the attention probabilities, which flash attention never materialises, while
    /// decoding is faster with it. Resuming only works where it resolved to on at creation.
    /// Returns the state now in force.
    pub fn set_flash_attn(&mut self, on: bool) -> bool {
        // SAFETY: a live llama_context, borrowed mutably; the call only flips a parameter and
        // asks the scheduler to reserve again before the next evaluation.
        unsafe { sys::llama_set_flash_attn(self.ctx.as_raw(), on) }
    }

    /// Hides the cells at `positions` (sequence 0) from query heads `head_mask` (bit h = head
    /// h) of layer `layer` (patch 0003). Masking only; the cells stay allocated.
    ///
    /// # Errors
    /// Unsupported memory/architecture, a layer out of range, more than 64 heads.
    pub fn mask_layer(&mut self, layer: usize, positions: &[i32], head_mask: u64) -> Result<()> {
        let il = i32::try_from(layer).map_err(|_| Error::Llama { op: "mask layer", code: -1 })?;
        // SAFETY: a live llama_context borrowed mutably; `positions` is a valid slice for the
        // duration of the call (the callee copies what it needs).
        let ok = unsafe { sys::llama_memory_seq_mask_layer(sys::llama_get_memory(self.ctx.as_raw()), 0, il, positions.as_ptr(), positions.len(), head_mask) };
        ok.then_some(()).ok_or(Error::Unsupported {
            what: "per-layer/per-head retention",
            reason: format!("llama.cpp refused a mask for layer {layer} (needs the llama architecture, a plain KV cache and at most 64 heads); use --kv-granularity global"),
        })
    }

    /// Occupied cells hidden from query head `head` of `layer`; `None` when unsupported.
    #[must_use]
    pub fn layer_mask_count(&self, layer: usize, head: usize) -> Option<usize> {
        let (Ok(il), Ok(h)) = (i32::try_from(layer), i32::try_from(head)) else {
            return None;
        };
        // SAFETY: a live llama_context; the call only reads the cache's metadata.
        let n = unsafe { sys::llama_memory_layer_mask_count(sys::llama_get_memory(self.ctx.as_raw()), il, h) };
        usize::try_from(n).ok()
    }

    /// Removes every per-layer mask and sink (they are also dropped with the cache's contents).
    pub fn clear_overrides(&mut self) {
        let n_layer = self.model.n_layer();
        // SAFETY: a live llama_context borrowed mutably; a null pointer with length 0 removes
        // the sinks of a layer without reading anything.
        unsafe {
            let mem = sys::llama_get_memory(self.ctx.as_raw());
            sys::llama_memory_layer_mask_clear(mem);
            for il in 0..n_layer {
                sys::llama_memory_set_attn_sinks(mem, il as i32, std::ptr::null(), 0);
            }
        }
    }

    /// Sets the attention sink logits of `layer`, one per query head (`ln n` gives n-softmax).
    ///
    /// # Errors
    /// Unsupported memory or a length other than the layer's head count.
    pub fn set_attn_sinks(&mut self, layer: usize, sinks: &[f32]) -> Result<()> {
        let il = i32::try_from(layer).map_err(|_| Error::Llama { op: "set sinks", code: -1 })?;
        // SAFETY: a live llama_context borrowed mutably; `sinks` is valid for `sinks.len()`
        // floats during the call, which copies them.
        let ok = unsafe { sys::llama_memory_set_attn_sinks(sys::llama_get_memory(self.ctx.as_raw()), il, sinks.as_ptr(), sinks.len()) };
        ok.then_some(()).ok_or(Error::Unsupported {
            what: "decode-time attention sinks",
            reason: format!("llama.cpp refused sinks for layer {layer} (needs the llama architecture and a plain KV cache)"),
        })
    }
}

/// How [`Context::kv_merge`] combines a target with its sources (LOOK-M).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MergeMode {
    /// `x' = (x_j + Σ (x_e + x_j)/2) / (1 + m)`: LOOK-M's released default.
    #[default]
    Pivot,
    /// `x' = (x_j + Σ x_e) / (1 + m)`: the paper's Eq. 10.
    Average,
}

/// A position's part in [`Context::kv_merge`], per (layer, KV head).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(u8)]
pub enum MergeRole {
    /// Untouched (not cached, or not in the merge: decode tokens).
    #[default]
    None = 0,
    /// Kept: a merge target.
    Target = 1,
    /// Evicted: merged into its most similar target.
    Source = 2,
}

/// What [`Context::kv_scan`] computes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvScanStats {
    /// `‖k‖₂` per cell and KV head.
    pub knorm: bool,
    /// `‖v‖₂`.
    pub vnorm: bool,
    /// `cos(k, ā)`, `ā` = the mean unit key of the KV head over the sequence's cells.
    pub kdiff: bool,
}

/// One layer of [`Context::kv_scan`]: arrays `[cell][kv head]`, cell-major, in cell order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KvScanLayer {
    /// The layer.
    pub layer: usize,
    /// KV heads.
    pub n_head_kv: usize,
    /// Each cell's position.
    pub cell_pos: Vec<i32>,
    /// `‖k‖₂` (when asked).
    pub knorm: Option<Vec<f32>>,
    /// `‖v‖₂`.
    pub vnorm: Option<Vec<f32>>,
    /// `cos(k, ā)`.
    pub kdiff: Option<Vec<f32>>,
    /// Query heads of `z`.
    pub n_head: usize,
    /// Expected Attention's `z`, `[query head][cell]` ([`Context::kv_expected`]).
    pub z: Option<Vec<f32>>,
}

/// `llama_kv_stats_cb`: copies one layer into the `Vec<KvScanLayer>` behind `ud`.
unsafe extern "C" fn kv_scan_trampoline(ud: *mut c_void, r: *const sys::llama_kv_stats_result) -> bool {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: `ud` is the `Vec` `kv_scan`/`kv_expected` passed, alive and not otherwise
        // borrowed during the call; `r` is valid during this callback and its arrays hold
        // n_cells (·n_head_kv, or ·n_head for z) values, each null-checked before a slice is made.
        unsafe {
            let out = &mut *ud.cast::<Vec<KvScanLayer>>();
            let r = &*r;
            let (n, h) = (usize::try_from(r.n_cells).unwrap_or(0), usize::try_from(r.n_head_kv).unwrap_or(0));
            let copy = |p: *const f32| (!p.is_null()).then(|| std::slice::from_raw_parts(p, n * h).to_vec());
            let cell_pos = if r.cell_pos.is_null() || n == 0 { Vec::new() } else { std::slice::from_raw_parts(r.cell_pos, n).to_vec() };
            let nh = usize::try_from(r.n_head).unwrap_or(0);
            out.push(KvScanLayer {
                layer: usize::try_from(r.il).unwrap_or(0),
                n_head_kv: h,
                cell_pos,
                knorm: copy(r.knorm),
                vnorm: copy(r.vnorm),
                kdiff: copy(r.kdiff),
                n_head: nh,
                z: (!r.z.is_null() && nh > 0).then(|| std::slice::from_raw_parts(r.z, n * nh).to_vec()),
            });
        }
        true
    }))
    .unwrap_or(false)
}
