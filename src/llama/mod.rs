//! The only module with `unsafe`: raw llama.cpp / libmtmd calls that llama-cpp-2 does not wrap.
//!
//! * chunk-by-chunk prompt evaluation (`mtmd_helper_eval_chunk_single` for text,
//!   `mtmd_encode_chunk` + `mtmd_helper_decode_image_chunk` for media, so image encoding is
//!   timed on its own), through the raw pointers our llama-cpp-2 patch exposes;
//! * a prompt's token count from its images' sizes alone (mtmd's placeholder bitmaps), so a
//!   prompt that cannot fit is refused before any image is decoded;
//! * the last token's logits after such an evaluation (llama-cpp-2's own accessor only knows
//!   about batches it decoded itself);
//! * KV cache size and occupancy, and whether flash attention is on (our llama.cpp patch
//!   `0001-llama-info-accessors`);
//! * per-(layer, head) masks, run-time attention sinks and pausing flash attention (patch
//!   `0003-layer-head-masks-sinks-fa-toggle`).
//!
//! Every block states why it is sound. Pointers come from live llama-cpp-2 wrappers borrowed
//! for the duration of the call, so they are non-null and not freed underneath us.
#![allow(unsafe_code)]
#![warn(unsafe_op_in_unsafe_fn)]

pub mod observer;
pub mod sink;

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::mtmd::{MtmdContext, MtmdInputChunk};
use llama_cpp_sys_2 as sys;

use crate::error::{Error, Result};

/// The process-wide llama.cpp backend (llama.cpp allows one initialisation per process).
/// llama.cpp's own logs are routed into `tracing` (targets under `llama_cpp_2`).
///
/// # Errors
/// When llama.cpp's backend cannot be initialised.
pub fn backend() -> Result<&'static LlamaBackend> {
    static BACKEND: OnceLock<std::result::Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| Error::Backend(e.clone()))
}

/// The names of llama.cpp's built-in chat templates (`chatml`, `llama2`, `vicuna`, …), sorted —
/// the names `llama_chat_apply_template` accepts besides a template text it recognises.
#[must_use]
pub fn chat_builtin_templates() -> Vec<String> {
    // SAFETY: with a null buffer and length 0 llama.cpp writes nothing and returns the count.
    let n = unsafe { sys::llama_chat_builtin_templates(std::ptr::null_mut(), 0) };
    let Ok(n) = usize::try_from(n) else { return Vec::new() };
    let mut names: Vec<*const std::os::raw::c_char> = vec![std::ptr::null(); n];
    // SAFETY: `names` has room for `n` pointers and llama.cpp writes at most `len` of them; each
    // points into the key of a static `std::map`, a NUL-terminated string alive for the process.
    let got = unsafe { sys::llama_chat_builtin_templates(names.as_mut_ptr(), names.len()) };
    let got = usize::try_from(got).unwrap_or(0).min(n);
    names[..got]
        .iter()
        .filter(|p| !p.is_null())
        // SAFETY: non-null pointers llama.cpp just wrote (see above), valid C strings.
        .map(|&p| unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned())
        .collect()
}

/// Where the model runs: ggml's backend and device, read at run time.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Device {
    /// ggml backend ("CPU", "CUDA", "Metal", "Vulkan", …).
    pub backend: String,
    /// The device's description ("NVIDIA GeForce RTX 4090", the CPU's name, …).
    pub name: String,
    /// Whether layers are offloaded to it.
    pub gpu: bool,
}

impl Device {
    /// The first GPU (or integrated GPU) ggml found, when `n_gpu_layers > 0`; else the CPU.
    #[must_use]
    pub fn pick(n_gpu_layers: u32) -> Self {
        use llama_cpp_2::LlamaBackendDeviceType as T;
        let devices = llama_cpp_2::list_llama_ggml_backend_devices();
        let gpu = devices.iter().find(|d| matches!(d.device_type, T::Gpu | T::IntegratedGpu));
        match gpu {
            Some(d) if n_gpu_layers > 0 => Self { backend: d.backend.clone(), name: d.description.clone(), gpu: true },
            _ => {
                let cpu = devices.iter().find(|d| matches!(d.device_type, T::Cpu));
                Self {
                    backend: cpu.map_or_else(|| "CPU".to_owned(), |d| d.backend.clone()),
                    name: cpu.map_or_else(String::new, |d| d.description.clone()),
                    gpu: false,
                }
            }
        }
    }
}

/// The most resident memory this process has used, in bytes (`getrusage`); `None` where the
/// platform does not say.
#[must_use]
pub fn peak_rss_bytes() -> Option<u64> {
    #[cfg(unix)]
    {
        // SAFETY: getrusage writes into the zeroed struct we own; RUSAGE_SELF is always valid.
        let usage = unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            (libc::getrusage(libc::RUSAGE_SELF, &mut u) == 0).then_some(u)
        }?;
        let max = u64::try_from(usage.ru_maxrss).ok()?;
        // kilobytes on Linux and the BSDs, bytes on macOS
        Some(if cfg!(target_os = "macos") { max } else { max * 1024 })
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Ends the process at once with `code`, without running exit handlers: for a second Ctrl-C
/// while llama.cpp is busy in another thread, whose C++ static destructors `exit` would run
/// underneath it.
pub fn exit_now(code: i32) -> ! {
    #[cfg(unix)]
    // SAFETY: _exit only ends the process; no Rust or C state is touched afterwards.
    unsafe {
        libc::_exit(code)
    }
    #[cfg(not(unix))]
    std::process::exit(code)
}

/// KV cache size and occupancy, as llama.cpp reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct KvInfo {
    /// Cells allocated.
    pub n_cells: u32,
    /// Cells occupied now.
    pub n_used: u32,
    /// Most cells ever occupied at once (since creation or the last clear).
    pub n_used_peak: u32,
    /// Highest occupied cell + 1.
    pub used_max_p1: u32,
    /// Bytes allocated for K, all layers.
    pub k_bytes: u64,
    /// Bytes allocated for V, all layers.
    pub v_bytes: u64,
}

impl KvInfo {
    /// Bytes allocated for K and V.
    #[must_use]
    pub fn bytes_allocated(&self) -> u64 {
        self.k_bytes + self.v_bytes
    }

    /// K+V bytes per cell (all layers).
    #[must_use]
    pub fn bytes_per_cell(&self) -> u64 {
        if self.n_cells == 0 {
            0
        } else {
            self.bytes_allocated() / u64::from(self.n_cells)
        }
    }

    /// K+V bytes of the occupied cells.
    #[must_use]
    pub fn bytes_used(&self) -> u64 {
        self.bytes_per_cell() * u64::from(self.n_used)
    }
}

/// KV cache info of a context; `None` for memories that are not a KV cache (recurrent models).
#[must_use]
pub fn kv_info(ctx: &LlamaContext<'_>) -> Option<KvInfo> {
    let mut out = sys::llama_kv_info {
        n_cells: 0,
        n_used: 0,
        n_used_peak: 0,
        used_max_p1: 0,
        k_bytes: 0,
        v_bytes: 0,
    };
    // SAFETY: ctx.as_raw() is a live llama_context; llama_get_memory returns its memory (or null,
    // which llama_memory_kv_info handles); `out` is a valid, writable struct.
    let ok = unsafe { sys::llama_memory_kv_info(sys::llama_get_memory(ctx.as_raw()), &mut out) };
    ok.then_some(KvInfo {
        n_cells: out.n_cells,
        n_used: out.n_used,
        n_used_peak: out.n_used_peak,
        used_max_p1: out.used_max_p1,
        k_bytes: out.k_bytes,
        v_bytes: out.v_bytes,
    })
}

/// Applies pending KV updates (the K-shift after `llama_memory_seq_add`) now rather than at the
/// next decode (patch 0004).
pub fn apply_kv_updates(ctx: &mut LlamaContext<'_>) -> bool {
    // SAFETY: `ctx.as_raw()` is the live context `ctx` owns; the call only runs llama.cpp's own
    // memory update on it.
    unsafe { sys::llama_memory_apply_updates(ctx.as_raw()) }
}

/// Whether the cache can shift positions (`llama_memory_seq_add` with RoPE re-applied).
#[must_use]
pub fn can_shift(ctx: &LlamaContext<'_>) -> bool {
    // SAFETY: the memory handle of a live context; the call only reads a flag.
    unsafe { sys::llama_memory_can_shift(sys::llama_get_memory(ctx.as_raw())) }
}

/// Whether the context runs flash attention (`-fa auto` resolved).
#[must_use]
pub fn flash_attn_enabled(ctx: &LlamaContext<'_>) -> bool {
    // SAFETY: a live llama_context; the function only reads its parameters.
    unsafe { sys::llama_flash_attn_enabled(ctx.as_raw()) }
}

/// Pauses (`false`) or resumes (`true`) flash attention (our patch `0003`): observation needs
/// the attention probabilities, which flash attention never materialises, while decoding is
/// faster with it. Resuming only works where it resolved to on at creation. Returns the state
/// now in force.
pub fn set_flash_attn(ctx: &mut LlamaContext<'_>, on: bool) -> bool {
    // SAFETY: a live llama_context, borrowed mutably; the call only flips a parameter and asks
    // the scheduler to reserve again before the next evaluation.
    unsafe { sys::llama_set_flash_attn(ctx.as_raw(), on) }
}

/// Hides the cells at `positions` (sequence 0) from query heads `head_mask` (bit h = head h) of
/// layer `layer` (our patch `0003`). Masking only; the cells stay allocated.
///
/// # Errors
/// Unsupported memory/architecture, a layer out of range, more than 64 heads.
pub fn mask_layer(ctx: &mut LlamaContext<'_>, layer: usize, positions: &[i32], head_mask: u64) -> Result<()> {
    let il = i32::try_from(layer).map_err(|_| Error::Llama { op: "mask layer", code: -1 })?;
    // SAFETY: a live llama_context borrowed mutably; `positions` is a valid slice for the
    // duration of the call (the callee copies what it needs).
    let ok = unsafe {
        sys::llama_memory_seq_mask_layer(sys::llama_get_memory(ctx.as_raw()), 0, il, positions.as_ptr(), positions.len(), head_mask)
    };
    ok.then_some(()).ok_or(Error::Unsupported {
        what: "per-layer/per-head retention",
        reason: format!("llama.cpp refused a mask for layer {layer} (needs the llama architecture, a plain KV cache and at most 64 heads); use --kv-granularity global"),
    })
}

/// Occupied cells hidden from query head `head` of `layer`; `None` when unsupported.
#[must_use]
pub fn layer_mask_count(ctx: &LlamaContext<'_>, layer: usize, head: usize) -> Option<usize> {
    // SAFETY: a live llama_context; the call only reads the cache's metadata.
    let n = unsafe { sys::llama_memory_layer_mask_count(sys::llama_get_memory(ctx.as_raw()), layer as i32, head as i32) };
    usize::try_from(n).ok()
}

/// Removes every per-layer mask and sink (they are also dropped with the cache's contents).
pub fn clear_overrides(ctx: &mut LlamaContext<'_>, n_layer: usize) {
    // SAFETY: a live llama_context borrowed mutably; a null pointer with length 0 removes the
    // sinks of a layer without reading anything.
    unsafe {
        let mem = sys::llama_get_memory(ctx.as_raw());
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
pub fn set_attn_sinks(ctx: &mut LlamaContext<'_>, layer: usize, sinks: &[f32]) -> Result<()> {
    // SAFETY: a live llama_context borrowed mutably; `sinks` is valid for `sinks.len()` floats
    // during the call, which copies them.
    let ok = unsafe { sys::llama_memory_set_attn_sinks(sys::llama_get_memory(ctx.as_raw()), layer as i32, sinks.as_ptr(), sinks.len()) };
    ok.then_some(()).ok_or(Error::Unsupported {
        what: "decode-time attention sinks",
        reason: format!("llama.cpp refused sinks for layer {layer} (needs the llama architecture and a plain KV cache)"),
    })
}

/// Evaluates one text chunk at positions `n_past..`, sequence 0, in batches of `n_batch`.
/// With `logits_last` the last token's logits are computed. Returns the next position.
///
/// # Errors
/// [`Error::Llama`] with llama.cpp's return code.
pub fn eval_text_chunk(
    mtmd: &MtmdContext,
    ctx: &mut LlamaContext<'_>,
    chunk: &MtmdInputChunk<'_>,
    n_past: i32,
    n_batch: u32,
    logits_last: bool,
) -> Result<i32> {
    // The helper *adds* the tokens it decoded to *new_n_past for text chunks.
    let mut new_n_past = n_past;
    // SAFETY: all three pointers come from live wrappers borrowed for this call (ctx mutably);
    // `chunk` belongs to chunks that outlive the call; new_n_past is a valid out-pointer.
    let rc = unsafe {
        sys::mtmd_helper_eval_chunk_single(
            mtmd.as_raw(),
            ctx.as_raw(),
            chunk.as_raw(),
            n_past,
            0,
            n_batch as i32,
            logits_last,
            &mut new_n_past,
        )
    };
    if rc != 0 {
        return Err(Error::Llama { op: "decode text chunk", code: rc });
    }
    Ok(new_n_past)
}

/// Runs the vision (or audio) encoder on one media chunk. The embeddings stay in the mtmd
/// context until [`decode_media_chunk`] feeds them to the language model.
///
/// # Errors
/// [`Error::Llama`] with mtmd's return code.
pub fn encode_media_chunk(mtmd: &MtmdContext, chunk: &MtmdInputChunk<'_>) -> Result<()> {
    // SAFETY: live mtmd context and chunk; mtmd_encode_chunk writes only into the context.
    let rc = unsafe { sys::mtmd_encode_chunk(mtmd.as_raw(), chunk.as_raw()) };
    if rc != 0 {
        return Err(Error::Llama { op: "encode image", code: rc });
    }
    Ok(())
}

/// Runs the encoder on a media chunk and copies its embeddings (`n_tokens × n_embd` floats,
/// token-major) — what the language model receives for that chunk.
///
/// # Errors
/// [`Error::Llama`] with mtmd's return code.
pub fn media_embeddings(mtmd: &MtmdContext, chunk: &MtmdInputChunk<'_>, n_embd: usize) -> Result<Vec<f32>> {
    encode_media_chunk(mtmd, chunk)?;
    let n = chunk.n_tokens() * n_embd;
    // SAFETY: after a successful encode, mtmd_get_output_embd points to n_tokens × n_embd
    // floats owned by the context (checked non-null), valid until the next encode; we copy them.
    unsafe {
        let p = sys::mtmd_get_output_embd(mtmd.as_raw());
        if p.is_null() {
            return Err(Error::Llama { op: "read image embeddings", code: -1 });
        }
        Ok(std::slice::from_raw_parts(p, n).to_vec())
    }
}

/// Decodes the embeddings of the media chunk last passed to [`encode_media_chunk`] at positions
/// `n_past..`. Returns the next position (`n_past + n_pos` of the chunk).
///
/// # Errors
/// [`Error::Llama`] with llama.cpp's return code.
pub fn decode_media_chunk(
    mtmd: &MtmdContext,
    ctx: &mut LlamaContext<'_>,
    chunk: &MtmdInputChunk<'_>,
    n_past: i32,
    n_batch: u32,
) -> Result<i32> {
    let mut new_n_past = n_past;
    // SAFETY: live pointers as above; mtmd_get_output_embd returns the context-owned buffer
    // holding n_tokens × n_embd floats of the chunk just encoded (checked non-null), which the
    // helper only reads; no callback is passed.
    let rc = unsafe {
        let embd = sys::mtmd_get_output_embd(mtmd.as_raw());
        if embd.is_null() {
            return Err(Error::Llama { op: "read image embeddings", code: -1 });
        }
        sys::mtmd_helper_decode_image_chunk(
            mtmd.as_raw(),
            ctx.as_raw(),
            chunk.as_raw(),
            embd,
            n_past,
            0,
            n_batch as i32,
            &mut new_n_past,
            None,
            std::ptr::null_mut(),
        )
    };
    if rc != 0 {
        return Err(Error::Llama { op: "decode image chunk", code: rc });
    }
    Ok(new_n_past)
}

/// What mtmd would make of a prompt, counted without pixels: see [`count_prompt`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptCount {
    /// All tokens (KV cells), text and media.
    pub n_tokens: usize,
    /// Positions.
    pub n_positions: i64,
    /// Tokens of each media chunk, in order.
    pub media_tokens: Vec<usize>,
}

/// Tokenizes `text` (with mtmd markers) as [`MtmdContext::tokenize`] would, for images of the
/// given `(width, height)` sizes — but with mtmd's *placeholder* bitmaps (`mtmd_bitmap_init`
/// without data: "treated as a placeholder for counting tokens", mtmd.h), which go through the
/// preprocessor's size arithmetic without any pixels. So a prompt's length is known before any
/// image is decoded. `None` when mtmd refuses (the real tokenization then says why).
#[must_use]
pub fn count_prompt(mtmd: &MtmdContext, text: &str, add_special: bool, sizes: &[(u32, u32)]) -> Option<PromptCount> {
    /// Frees the placeholder bitmaps and the chunk list on every return path.
    struct Owned {
        bitmaps: Vec<*mut sys::mtmd_bitmap>,
        chunks: *mut sys::mtmd_input_chunks,
    }
    impl Drop for Owned {
        fn drop(&mut self) {
            for &b in &self.bitmaps {
                // SAFETY: each pointer came from mtmd_bitmap_init (non-null) and is freed once.
                unsafe { sys::mtmd_bitmap_free(b) };
            }
            if !self.chunks.is_null() {
                // SAFETY: from mtmd_input_chunks_init, freed once; its chunks go with it.
                unsafe { sys::mtmd_input_chunks_free(self.chunks) };
            }
        }
    }
    let text = std::ffi::CString::new(text).ok()?;
    let mut owned = Owned { bitmaps: Vec::with_capacity(sizes.len()), chunks: std::ptr::null_mut() };
    for &(nx, ny) in sizes {
        // SAFETY: a null data pointer is mtmd's documented placeholder (nothing is read).
        let b = unsafe { sys::mtmd_bitmap_init(nx, ny, std::ptr::null()) };
        if b.is_null() {
            return None;
        }
        owned.bitmaps.push(b);
    }
    // SAFETY: no arguments; returns an owned list (or null, checked).
    owned.chunks = unsafe { sys::mtmd_input_chunks_init() };
    if owned.chunks.is_null() {
        return None;
    }
    let input = sys::mtmd_input_text { text: text.as_ptr(), text_len: text.as_bytes().len(), add_special, parse_special: true };
    let ptrs: Vec<*const sys::mtmd_bitmap> = owned.bitmaps.iter().map(|&b| b.cast_const()).collect();
    // SAFETY: a live mtmd context (mtmd_tokenize only reads it: "thread-safe (shared ctx)"); `input`
    // and the C string it points to outlive the call; `ptrs` holds `ptrs.len()` live bitmaps; the
    // output list is ours. C++ exceptions are caught inside mtmd_tokenize (return code 2).
    let rc = unsafe { sys::mtmd_tokenize(mtmd.as_raw(), owned.chunks, &raw const input, ptrs.as_ptr().cast_mut(), ptrs.len()) };
    if rc != 0 {
        tracing::debug!(rc, "mtmd could not count the prompt with placeholder images");
        return None;
    }
    let mut count = PromptCount { n_tokens: 0, n_positions: 0, media_tokens: Vec::with_capacity(sizes.len()) };
    // SAFETY: the list filled above.
    let n = unsafe { sys::mtmd_input_chunks_size(owned.chunks) };
    for i in 0..n {
        // SAFETY: i < size; the chunk is owned by the list, which outlives these reads.
        let (kind, n_tokens, n_pos) = unsafe {
            let c = sys::mtmd_input_chunks_get(owned.chunks, i);
            if c.is_null() {
                return None;
            }
            (sys::mtmd_input_chunk_get_type(c), sys::mtmd_input_chunk_get_n_tokens(c), sys::mtmd_input_chunk_get_n_pos(c))
        };
        count.n_tokens += n_tokens;
        count.n_positions += i64::from(n_pos);
        if kind != sys::MTMD_INPUT_CHUNK_TYPE_TEXT {
            count.media_tokens.push(n_tokens);
        }
    }
    Some(count)
}

/// Logits of the last output of the most recent evaluation (`n_vocab` values), or `None` if that
/// evaluation produced no logits.
#[must_use]
pub fn last_logits<'c>(ctx: &'c LlamaContext<'_>, n_vocab: usize) -> Option<&'c [f32]> {
    // SAFETY: llama_get_logits_ith(-1) returns null or a pointer to n_vocab floats owned by the
    // context, valid until the next decode — which needs &mut ctx, so not while 'c lives.
    unsafe {
        let p = sys::llama_get_logits_ith(ctx.as_raw(), -1);
        (!p.is_null()).then(|| std::slice::from_raw_parts(p, n_vocab))
    }
}

/// A llama.cpp context and the attention observer its `cb_eval` points to, owned together so
/// the observer cannot be dropped while llama.cpp may still call it: fields drop in
/// declaration order, the context first.
pub struct ObservedContext<'m> {
    ctx: LlamaContext<'m>,
    observer: Option<Box<observer::Observer>>,
    /// The flag llama.cpp's abort callback reads (kept alive as long as the context).
    _cancel: Option<Arc<AtomicBool>>,
}

/// llama.cpp's abort callback: `data` is the `AtomicBool` of an [`ObservedContext`]'s cancel flag.
extern "C" fn abort_requested(data: *mut c_void) -> bool {
    // SAFETY: `data` is `Arc::as_ptr` of the flag the context's owner holds until after the
    // context is freed (field order of ObservedContext); a load cannot panic.
    unsafe { (*(data as *const AtomicBool)).load(Ordering::Relaxed) }
}

impl std::fmt::Debug for ObservedContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObservedContext").field("observed", &self.observer.is_some()).finish_non_exhaustive()
    }
}

impl<'m> ObservedContext<'m> {
    /// Creates a context; with an observer, llama.cpp's `cb_eval` is routed to it.
    ///
    /// # Errors
    /// When llama.cpp cannot create the context (usually memory).
    pub fn new(
        model: &'m llama_cpp_2::model::LlamaModel,
        params: llama_cpp_2::context::params::LlamaContextParams,
        observer: Option<observer::Observer>,
        cancel: Option<Arc<AtomicBool>>,
    ) -> std::result::Result<Self, llama_cpp_2::LlamaContextLoadError> {
        let observer = observer.map(Box::new);
        let params = match &observer {
            Some(obs) => {
                let (cb, ud) = obs.callback();
                // SAFETY: `ud` points into the boxed observer, which this struct owns and drops
                // only after the context (field order); the box never moves its contents.
                unsafe { params.with_cb_eval(cb, ud) }
            }
            None => params,
        };
        let ctx = model.new_context(backend().map_err(|_| llama_cpp_2::LlamaContextLoadError::NullReturn)?, params)?;
        if let Some(flag) = &cancel {
            // SAFETY: a live context; the data pointer is the flag's AtomicBool, which the Arc in
            // this struct keeps alive until after the context is dropped (field order). llama.cpp
            // polls it between graph nodes and makes the evaluation return "aborted".
            unsafe { sys::llama_set_abort_callback(ctx.as_raw(), Some(abort_requested), Arc::as_ptr(flag) as *mut c_void) };
        }
        Ok(Self { ctx, observer, _cancel: cancel })
    }

    /// The context.
    #[must_use]
    pub fn ctx(&self) -> &LlamaContext<'m> {
        &self.ctx
    }

    /// The context, mutably.
    pub fn ctx_mut(&mut self) -> &mut LlamaContext<'m> {
        &mut self.ctx
    }

    /// The observer, if any.
    #[must_use]
    pub fn observer(&self) -> Option<&observer::Observer> {
        self.observer.as_deref()
    }
}
