//! The facade over llama.cpp: the only module that names `llama_cpp_2` or `llama_cpp_sys_2`,
//! and (with `capi/`) the only one with `unsafe`.
//!
//! * [`Model`] — the text model and what the engine reads of it (shapes, vocabulary, chat
//!   templates); [`Mtmd`] — the projector: tokenization into [`Chunks`], a prompt's token count
//!   from its images' sizes alone (placeholder bitmaps, so a prompt that cannot fit is refused
//!   before any image is decoded), chunk-by-chunk evaluation with image encoding timed apart;
//! * [`Context`] — one KV cache: evaluate tokens, logits, remove/shift/save/restore cells, KV
//!   size and occupancy and whether flash attention is on (patch `0001-llama-info-accessors`),
//!   per-(layer, head) masks, run-time sinks and the flash-attention toggle (patch
//!   `0003-layer-head-masks-sinks-fa-toggle`), pending K-shifts (patch 0004); it owns an `Arc`
//!   of its model, so it has no lifetime;
//! * [`Sampler`] — llama.cpp's sampler chain; [`observer`] and [`sink`] — attention observed
//!   through `cb_eval`, handed to an [`sink::AttentionSink`];
//! * process-wide things: the backend, the [`Device`] layers run on, peak RSS, `_exit`.
//!
//! Every block states why it is sound. Pointers come from live llama-cpp-2 wrappers borrowed
//! for the duration of the call, so they are non-null and not freed underneath us.
#![allow(unsafe_code)]
#![warn(unsafe_op_in_unsafe_fn)]

mod context;
mod model;
mod mtmd;
pub mod observer;
mod sampler;
pub mod sink;

use std::sync::OnceLock;

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_sys_2 as sys;

pub use context::{Context, ContextParams, KvScanLayer, KvScanStats, Logits, MergeMode, MergeRole, SeqSnapshot};
pub use model::{ChatFormatError, ChatMessage, Model};
pub use mtmd::{marker, Bitmap, Chunk, ChunkKind, Chunks, Mtmd, PromptCount};
pub use sampler::{Sampler, Step};

use crate::error::{Error, Result};

/// The process-wide llama.cpp backend (llama.cpp allows one initialisation per process).
/// llama.cpp's own logs are routed into `tracing` (targets under `llama_cpp_2`).
///
/// # Errors
/// When llama.cpp's backend cannot be initialised.
fn backend() -> Result<&'static LlamaBackend> {
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
    let Ok(n) = usize::try_from(n) else {
        return Vec::new();
    };
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

/// Bytes a context holds or, made from a [`Model::load_no_alloc`] model, would allocate, by kind
/// and by place (patch 0011: llama.cpp's own memory breakdown, as its `--fit` reads it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MemoryTotals {
    /// Model weights in host memory (CPU, CPU repack, pinned host buffers).
    pub model_host: u64,
    /// Model weights on devices (GPU).
    pub model_device: u64,
    /// The KV cache (the memory module) in host memory.
    pub context_host: u64,
    /// The KV cache on devices.
    pub context_device: u64,
    /// Compute buffers in host memory.
    pub compute_host: u64,
    /// Compute buffers on devices.
    pub compute_device: u64,
}

/// Free memory of the GPUs llama.cpp sees (the sum over devices of type GPU), `None` without one.
#[must_use]
pub fn gpu_free_memory() -> Option<u64> {
    let _ = backend().ok()?;
    let gpus: Vec<u64> =
        llama_cpp_2::list_llama_ggml_backend_devices().into_iter().filter(|d| matches!(d.device_type, llama_cpp_2::LlamaBackendDeviceType::Gpu)).map(|d| d.memory_free as u64).collect();
    (!gpus.is_empty()).then(|| gpus.iter().sum())
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

