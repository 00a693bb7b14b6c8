//! Memory plans: what a run would allocate — the text model's weights, the mmproj's, the KV
//! cache and llama.cpp's compute buffers — asked of llama.cpp itself with the model loaded
//! `no_alloc` (patch 0011, the way llama.cpp's `--fit` probes), so no weight and no image is
//! read; and the largest KV cap that fits a memory budget (`--kv-max-cells auto --mem 8GiB`).
//!
//! Not in the plan: the image encoder's compute buffer (clip allocates it when it loads) and
//! the buffers of in-graph observation (patch 0005, reserved when a policy first observes);
//! `csp-llava bench` measures peak RSS with them.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use super::check;
use crate::config::{ContextConfig, ModelConfig};
use crate::error::{Error, Result};
use crate::gguf::GgufHeader;
use crate::llama::{self, ContextParams, MemoryTotals};

/// What one context size costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryPlan {
    /// KV cells.
    pub n_ctx: u32,
    /// llama.cpp's figures for the text model's context.
    pub llama: MemoryTotals,
    /// Tensor bytes of the mmproj (loaded on the GPU when layers are offloaded).
    pub mmproj_weights: u64,
    /// Whether the model runs on a GPU (the budget is then the device's).
    pub on_device: bool,
}

impl MemoryPlan {
    /// Weights: text model (host + device) and mmproj.
    #[must_use]
    pub fn weights(&self) -> u64 {
        self.llama.model_host + self.llama.model_device + self.mmproj_weights
    }

    /// KV cache bytes (host + device).
    #[must_use]
    pub fn kv(&self) -> u64 {
        self.llama.context_host + self.llama.context_device
    }

    /// Compute buffer bytes (host + device).
    #[must_use]
    pub fn compute(&self) -> u64 {
        self.llama.compute_host + self.llama.compute_device
    }

    /// The bytes a budget is compared with: on a GPU, what lives on the device (with the
    /// mmproj); on a CPU, everything.
    #[must_use]
    pub fn budgeted(&self) -> u64 {
        if self.on_device {
            self.llama.model_device + self.llama.context_device + self.llama.compute_device + self.mmproj_weights
        } else {
            self.weights() + self.kv() + self.compute()
        }
    }
}

/// Plans for one model: the text model loaded `no_alloc` once, a context per size asked.
pub struct Planner {
    model: Arc<llama::Model>,
    mmproj_weights: u64,
    tokens_per_image: Option<u32>,
    on_device: bool,
    threads: u32,
}

impl std::fmt::Debug for Planner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Planner").field("mmproj_weights", &self.mmproj_weights).field("tokens_per_image", &self.tokens_per_image).finish_non_exhaustive()
    }
}

/// Tokens one image becomes, from the mmproj's header, for the projectors whose count is the
/// patch grid (LLaVA-1.5's `mlp`, `mlp_norm`) or the grid pooled by a fixed factor (Gemma 3:
/// `clip.vision.projector.scale_factor`, 4 when absent, as clip.cpp reads it); `None` for others
/// (any-resolution, pixel shuffle, merger…), whose count depends on the image.
fn tokens_per_image(h: &GgufHeader) -> Option<u32> {
    let ty = h.get_str("clip.projector_type").unwrap_or("mlp");
    let pool = match ty {
        "mlp" | "mlp_norm" => 1,
        "gemma3" => h.get_u64("clip.vision.projector.scale_factor").unwrap_or(4).max(1),
        _ => return None,
    };
    if h.get_str("clip.vision.mm_patch_merge_type").is_some_and(|m| m != "flat") {
        return None;
    }
    let image = h.get_u64("clip.vision.image_size")?;
    let patch = h.get_u64("clip.vision.patch_size").filter(|&p| p > 0)?;
    u32::try_from((image / patch / pool).pow(2)).ok()
}

impl Planner {
    /// Checks both files as [`super::Engine::load`] does, reads the text model's metadata
    /// (`no_alloc`) and the mmproj's header.
    ///
    /// # Errors
    /// As [`super::Engine::load`] for bad files.
    pub fn new(cfg: &ModelConfig) -> Result<Self> {
        let model_header = check::gguf(&cfg.model, "model")?;
        let mmproj_header = check::gguf(&cfg.mmproj, "mmproj")?;
        check::text_model(&cfg.model, &model_header)?;
        check::projector(cfg, &model_header, &mmproj_header)?;
        let device = llama::Device::pick(cfg.n_gpu_layers);
        let ngl = if device.gpu { cfg.n_gpu_layers } else { 0 };
        let model = Arc::new(llama::Model::load_no_alloc(&cfg.model, ngl)?);
        if model.is_recurrent_or_hybrid() {
            return Err(Error::Unsupported { what: "model family", reason: "a recurrent/hybrid model; csp-llava prunes a transformer KV cache".into() });
        }
        Ok(Self { model, mmproj_weights: tensor_bytes(&cfg.mmproj, &mmproj_header), tokens_per_image: tokens_per_image(&mmproj_header), on_device: ngl > 0, threads: cfg.threads })
    }

    /// Tokens per image when the projector's count does not depend on the image.
    #[must_use]
    pub fn tokens_per_image(&self) -> Option<u32> {
        self.tokens_per_image
    }

    /// Tokens `text` becomes in the text model's vocabulary (an estimate of a prompt's text:
    /// the chat template and image labels add a few).
    #[must_use]
    pub fn count_tokens(&self, text: &str) -> usize {
        self.model.count_tokens(text)
    }

    /// The model's trained context.
    #[must_use]
    pub fn n_ctx_train(&self) -> u32 {
        self.model.n_ctx_train()
    }

    /// Whether the plans are for a GPU.
    #[must_use]
    pub fn on_device(&self) -> bool {
        self.on_device
    }

    /// The plan for a context of `n_ctx` cells with `ctx`'s batch sizes, flash attention and
    /// cache types.
    ///
    /// # Errors
    /// llama.cpp refuses the context (e.g. a quantized V cache without flash attention).
    pub fn plan(&self, n_ctx: u32, ctx: &ContextConfig) -> Result<MemoryPlan> {
        let n_ctx = n_ctx.max(1);
        let n_batch = ctx.n_batch.min(n_ctx).max(1);
        let params = ContextParams { n_ctx, n_batch, n_ubatch: ctx.n_ubatch.min(n_batch).max(1), threads: self.threads, flash_attn: ctx.flash_attn, type_k: ctx.type_k, type_v: ctx.type_v, swa_full: ctx.swa_full };
        let c = llama::Context::new(&self.model, params, None, None)?;
        Ok(MemoryPlan { n_ctx, llama: c.memory_totals(), mmproj_weights: self.mmproj_weights, on_device: self.on_device })
    }

    /// The largest context (a multiple of `step` cells, at most `max`) whose plan fits `budget`
    /// bytes; `None` when not even `step` cells fit. Compute buffers grow with the context
    /// (attention scores without flash attention), so this searches rather than divides.
    ///
    /// # Errors
    /// As [`Planner::plan`].
    pub fn largest_fitting(&self, budget: u64, ctx: &ContextConfig, step: u32, max: u32) -> Result<Option<MemoryPlan>> {
        let step = step.max(1);
        let fits = |n: u32| -> Result<Option<MemoryPlan>> {
            let p = self.plan(n * step, ctx)?;
            Ok((p.budgeted() <= budget).then_some(p))
        };
        let Some(mut best) = fits(1)? else {
            return Ok(None);
        };
        let (mut lo, mut hi) = (1u32, (max / step).max(1) + 1);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            match fits(mid)? {
                Some(p) => {
                    best = p;
                    lo = mid;
                }
                None => hi = mid,
            }
        }
        Ok(Some(best))
    }
}

/// Tensor bytes of a GGUF file: the file's size after its data offset (the header reader
/// checked that every tensor lies inside).
fn tensor_bytes(path: &Path, h: &GgufHeader) -> u64 {
    let len = std::fs::metadata(path).map_or(0, |m| m.len());
    len.saturating_sub(h.data_start)
}
