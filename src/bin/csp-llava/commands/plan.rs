//! `--dry-run` (the memory plan of a run) and `--kv-max-cells auto` (the largest cap that fits
//! `--mem`): llama.cpp's own allocation sizes from the model loaded `no_alloc`, with the prompt's
//! size estimated from the image count, the projector's tokens per image and the text.

use std::io::Write;

use anyhow::{bail, Result};
use csp_llava::config::{ContextConfig, KvCap, ModelConfig, Request};
use csp_llava::engine::human_bytes;
use csp_llava::engine::memory::{MemoryPlan, Planner};
use serde::Serialize;

use super::out_err;

/// Contexts are planned in steps of this many cells.
const STEP: u32 = 256;

/// Cells planned for generation with `-n -1`.
const OPEN_ENDED: u32 = 1024;

/// The prompt's size as planned.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Need {
    pub n_images: u32,
    pub tokens_per_image: u32,
    /// Text tokens (tokenized prompt and system message, plus the labels and chat template's
    /// markers, estimated).
    pub n_text: u32,
    pub n_predict: u32,
    /// Prompt + generation.
    pub cells: u32,
}

impl Need {
    fn prompt(&self) -> u32 {
        self.cells - self.n_predict
    }
}

fn need(planner: &Planner, req: &Request, n_predict: i32) -> Result<Need> {
    let n_images = u32::try_from(req.images.len() + req.image_data.len()).unwrap_or(u32::MAX);
    let tokens_per_image = match (planner.tokens_per_image(), n_images) {
        (_, 0) => 0,
        (Some(t), _) => t,
        (None, _) => bail!("this projector's image token count depends on the image (any-resolution, pixel shuffle, merger): the memory plan knows fixed-grid projectors (LLaVA-1.5's mlp, Gemma 3) only"),
    };
    let text = format!("{}\n{}", req.system.as_deref().unwrap_or(""), req.prompt);
    // chat-template markers (~16 tokens) and an "Image k: " label (~5) per image
    let n_text = planner.count_tokens(&text) as u32 + 16 + if n_images > 1 { 5 * n_images } else { 0 };
    let n_predict = u32::try_from(n_predict).unwrap_or(OPEN_ENDED);
    let cells = n_images.saturating_mul(tokens_per_image).saturating_add(n_text).saturating_add(n_predict);
    Ok(Need { n_images, tokens_per_image, n_text, n_predict, cells })
}

/// The budget: `--mem`, else the GPU's free memory when the model runs on one.
fn budget(planner: &Planner, mem: Option<u64>) -> Option<u64> {
    mem.or_else(|| planner.on_device().then(csp_llava::llama::gpu_free_memory).flatten())
}

/// The largest context (a multiple of 256 cells, at most `max`) within the budget.
fn largest(planner: &Planner, max: u32, budget: u64, ctx: &ContextConfig) -> Result<Option<MemoryPlan>> {
    Ok(planner.largest_fitting(budget, ctx, STEP, max)?)
}

/// The most cells `--kv-max-cells auto` chooses: what the prompt needs, and no more than the
/// model's trained context (a larger cap holds positions the model never saw once
/// `--kv-shift` renumbers them below the cap).
fn auto_max(planner: &Planner, need: &Need) -> u32 {
    need.cells.next_multiple_of(STEP).min(planner.n_ctx_train().max(STEP))
}

/// `--kv-max-cells auto`: the cap for this run, written into `ctx` (and said on stderr).
pub fn resolve_auto_cap(mcfg: &ModelConfig, ctx: &mut ContextConfig, req: &Request, n_predict: i32, mem: Option<u64>) -> Result<()> {
    let planner = Planner::new(mcfg)?;
    let need = need(&planner, req, n_predict)?;
    let Some(budget) = budget(&planner, mem) else {
        bail!("--kv-max-cells auto needs a memory budget: give --mem (e.g. --mem 8GiB), or offload to a GPU (its free memory is the budget)");
    };
    let plan = largest(&planner, auto_max(&planner, &need), budget, ctx)?;
    let Some(plan) = plan.filter(|p| p.n_ctx > need.tokens_per_image) else {
        let least = planner.plan(STEP, ctx)?;
        bail!(
            "--kv-max-cells auto: nothing fits in {}: the weights and compute buffers alone take {} (weights {}); an image needs {} cells",
            human_bytes(budget),
            human_bytes(least.budgeted()),
            human_bytes(least.weights()),
            need.tokens_per_image + 1
        );
    };
    eprintln!(
        "csp-llava: --kv-max-cells auto: {} cells within {} (weights {}, KV {}, compute {}); the prompt needs ≈{}, the model was trained on {}",
        plan.n_ctx,
        human_bytes(budget),
        human_bytes(plan.weights()),
        human_bytes(plan.kv()),
        human_bytes(plan.compute()),
        need.prompt(),
        planner.n_ctx_train()
    );
    ctx.kv_max_cells = Some(KvCap::Cells(plan.n_ctx));
    Ok(())
}

#[derive(Debug, Serialize)]
struct DryRun {
    model: String,
    mmproj: String,
    on_device: bool,
    n_ctx_train: u32,
    need: Need,
    type_k: String,
    type_v: String,
    full: MemoryPlan,
    capped: Option<MemoryPlan>,
    mem: Option<u64>,
    /// Within `mem`: the largest context, and the images the full cache holds in it.
    largest_cap: Option<u32>,
    full_cache_images: Option<u32>,
    not_planned: &'static str,
}

const NOT_PLANNED: &str = "the image encoder's compute buffer and in-graph observation buffers";

/// `--dry-run`: the plan on stdout (a table, or JSON with `--json`).
pub fn dry_run(mcfg: &ModelConfig, ctx: &ContextConfig, auto_cap: bool, req: &Request, n_predict: i32, mem: Option<u64>, json: bool) -> Result<()> {
    let planner = Planner::new(mcfg)?;
    let need = need(&planner, req, n_predict)?;
    let full = planner.plan(need.cells.next_multiple_of(STEP), ctx)?;
    let budget = budget(&planner, mem);
    // the search for the largest context is bounded at 2^20 cells
    let most = budget.map(|b| largest(&planner, 1 << 20, b, ctx)).transpose()?.flatten();
    let cap_cells = match ctx.kv_max_cells {
        Some(c) => Some(c.cells(need.prompt() as usize)),
        None if auto_cap => most.map(|p| p.n_ctx.min(auto_max(&planner, &need))),
        None => None,
    };
    let capped = cap_cells.map(|n| planner.plan(n, ctx)).transpose()?;
    let full_cache_images = most.map(|p| (p.n_ctx.saturating_sub(need.n_text + need.n_predict)) / need.tokens_per_image.max(1));
    let d = DryRun {
        model: mcfg.model.display().to_string(),
        mmproj: mcfg.mmproj.display().to_string(),
        on_device: planner.on_device(),
        n_ctx_train: planner.n_ctx_train(),
        need,
        type_k: ctx.type_k.name().to_owned(),
        type_v: ctx.type_v.name().to_owned(),
        full,
        capped,
        mem: budget,
        largest_cap: most.map(|p| p.n_ctx),
        full_cache_images,
        not_planned: NOT_PLANNED,
    };
    let mut out = std::io::stdout().lock();
    let text = if json { serde_json::to_string(&d)? + "\n" } else { table(&d) };
    out.write_all(text.as_bytes()).and_then(|()| out.flush()).map_err(out_err)
}

fn table(d: &DryRun) -> String {
    let n = &d.need;
    let name = |p: &str| std::path::Path::new(p).file_name().map_or_else(|| p.to_owned(), |f| f.to_string_lossy().into_owned());
    let mut s = format!(
        "memory plan: {} + {} on {} — llama.cpp's allocation sizes (model loaded no_alloc; no weight or image read)\n",
        name(&d.model),
        name(&d.mmproj),
        if d.on_device { "the GPU" } else { "the CPU" }
    );
    s += &format!("prompt: {} image(s) × {} tokens + ≈{} text tokens; -n {} → {} cells\n\n", n.n_images, n.tokens_per_image, n.n_text, n.n_predict, n.cells);
    if n.cells > d.n_ctx_train {
        s += &format!("(more than the model's trained context, {} cells: without --kv-max-cells a run refuses this prompt)\n\n", d.n_ctx_train);
    }
    s += "| cache | cells | K / V | weights | KV cache | compute | total |\n|---|---|---|---|---|---|---|\n";
    let row = |label: &str, p: &MemoryPlan| {
        format!("| {label} | {} | {} / {} | {} | {} | {} | {} |\n", p.n_ctx, d.type_k, d.type_v, human_bytes(p.weights()), human_bytes(p.kv()), human_bytes(p.compute()), human_bytes(p.budgeted()))
    };
    s += &row("full", &d.full);
    if let Some(c) = &d.capped {
        s += &row("capped (--kv-max-cells)", c);
    }
    s.push('\n');
    if let Some(mem) = d.mem {
        let fits = |p: &MemoryPlan| {
            if p.budgeted() <= mem {
                "fits"
            } else {
                "does not fit"
            }
        };
        s += &format!("within {}: the full cache {}", human_bytes(mem), fits(&d.full));
        if let Some(c) = &d.capped {
            s += &format!(", the capped one {}", fits(c));
        }
        match (d.largest_cap, d.full_cache_images) {
            (Some(cells), Some(images)) => {
                s += &format!("; at most {cells} cells fit (a full cache of {images} image(s) of {} tokens", n.tokens_per_image);
                if cells > d.n_ctx_train {
                    s += &format!(", past the model's trained context of {} cells", d.n_ctx_train);
                }
                s += ")\n";
            }
            _ => s += "; not even 256 cells fit\n",
        }
    }
    s += &format!("not planned: {}\n", d.not_planned);
    s
}
