//! `csp-llava bench`: speed and memory of every policy × budget next to llama.cpp's own full
//! cache, in one process, llama-bench style.
//!
//! Rows per image count: a **reference** (full cache, flash attention as llama.cpp chooses), a
//! `full` row with flash attention off (what observing on the host costs by turning it off, on
//! its own), then each policy × budget. Every row reads the prompt through the same llama.cpp
//! calls (`mtmd_helper_eval_chunk_single` for text; `mtmd_encode_chunk` then
//! `mtmd_helper_decode_image_chunk` for images — what llama.cpp's own `eval_chunks` does, split
//! in two so encoding is timed apart), so encoding, prefill and time to first token (TTFT:
//! encode + prefill + scoring + eviction) compare like with like.
//! Configurations are interleaved across repetitions after one warm-up pass; each figure is the
//! median with its min and max. Peak RSS per run resets the kernel's high-water mark through
//! `/proc/self/clear_refs` (Linux), so one process measures every row.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::{ContextConfig, FlashAttn, Request, SamplingConfig};
use crate::engine::{Engine, PrefillMode, RunReport};
use crate::error::{Error, Result};
use crate::gguf::tiny;
use crate::policy::{Budget, PolicyConfig, PolicyKind, PolicySpec};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Image counts (one group of rows each).
    pub images: Vec<usize>,
    /// Image files to cycle through; empty = deterministic synthetic images.
    pub image_files: Vec<PathBuf>,
    /// Policies (besides the reference and `full` rows).
    pub policies: Vec<PolicySpec>,
    /// Budgets per policy.
    pub budgets: Vec<Budget>,
    /// Measured repetitions (after one warm-up pass).
    pub reps: usize,
    /// Tokens generated per run (end of generation ignored).
    pub n_predict: i32,
    /// The prompt text.
    pub prompt: String,
    /// Context settings (flash attention applies to the policy rows; `kv_shrink` to the rows
    /// that prune).
    pub ctx: ContextConfig,
    /// Policy settings other than kind and budget.
    pub policy: PolicyConfig,
    /// Logical batch sizes to sweep (`-b 512,2048`); empty = `ctx.n_batch`.
    pub batch_sizes: Vec<u32>,
    /// Physical batch sizes to sweep (`-ub 128,512`); empty = `ctx.n_ubatch`.
    pub ubatch_sizes: Vec<u32>,
    /// Depths (`-d 0,512`): filler tokens read after the pruned prompt, before decoding is
    /// measured (llama-bench's `-d`); empty = 0.
    pub depths: Vec<u32>,
}

/// One configuration.
#[derive(Debug, Clone)]
struct Config {
    n_images: usize,
    n_batch: u32,
    n_ubatch: u32,
    depth: u32,
    kind: PolicySpec,
    budget: Option<Budget>,
    reference: bool,
    flash_attn: FlashAttn,
}

/// A measured figure: median, min, max, and — as llama-bench reports — mean ± sample standard
/// deviation with the raw samples (in run order).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stat {
    /// Median.
    pub median: f64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation (0 for one sample).
    pub sd: f64,
    /// Every measured value, in run order.
    pub samples: Vec<f64>,
}

impl Stat {
    fn of(samples: Vec<f64>) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut v = samples.clone();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        let mean = v.iter().sum::<f64>() / n as f64;
        let sd = if n > 1 { (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt() } else { 0.0 };
        Self { median, min: v[0], max: v[n - 1], mean, sd, samples }
    }
}

/// Where and with what a benchmark ran (the header of every output, as llama-bench's fields).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Provenance {
    /// csp-llava's version.
    pub version: String,
    /// The git commit it was built from (`unknown` outside a checkout).
    pub commit: String,
    /// Text model file.
    pub model: String,
    /// Its size in bytes.
    pub model_bytes: u64,
    /// Projector file.
    pub mmproj: String,
    /// Backend and device (e.g. `CPU`, `CUDA0 (NVIDIA H200)`).
    pub device: String,
    /// CPU model (`/proc/cpuinfo` on Linux).
    pub cpu: String,
    /// Threads.
    pub threads: u32,
    /// Layers offloaded to the GPU.
    pub n_gpu_layers: u32,
    /// Flash attention as asked (`auto`, `on`, `off`).
    pub flash_attn: String,
    /// K and V cache types.
    pub type_k: String,
    /// V cache type.
    pub type_v: String,
    /// Logical and physical batch sizes.
    pub n_batch: u32,
    /// Physical batch size.
    pub n_ubatch: u32,
    /// Measured repetitions per configuration.
    pub reps: usize,
    /// Tokens generated per run.
    pub n_predict: i32,
}

impl Provenance {
    /// The provenance of `cfg` run on `engine`.
    #[must_use]
    pub fn of(engine: &Engine, cfg: &BenchConfig) -> Self {
        let m = engine.config();
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|s| s.trim().to_owned()))
            .unwrap_or_else(|| std::env::consts::ARCH.to_owned());
        Self {
            version: env!("CARGO_PKG_VERSION").into(),
            commit: option_env!("CSP_LLAVA_COMMIT").unwrap_or("unknown").into(),
            model: m.model.display().to_string(),
            model_bytes: std::fs::metadata(&m.model).map(|x| x.len()).unwrap_or(0),
            mmproj: m.mmproj.display().to_string(),
            device: { let d = engine.device(); if d.name.is_empty() { d.backend.clone() } else { format!("{} ({})", d.backend, d.name) } },
            cpu,
            threads: m.threads,
            n_gpu_layers: m.n_gpu_layers,
            flash_attn: format!("{:?}", cfg.ctx.flash_attn).to_lowercase(),
            type_k: cfg.ctx.type_k.name().into(),
            type_v: cfg.ctx.type_v.name().into(),
            n_batch: cfg.ctx.n_batch,
            n_ubatch: cfg.ctx.n_ubatch,
            reps: cfg.reps,
            n_predict: cfg.n_predict,
        }
    }
}

/// One row of the benchmark (field names follow `--json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchRow {
    /// Images in the prompt.
    pub n_images: usize,
    /// Threads.
    pub threads: u32,
    /// Layers offloaded to the GPU (as asked).
    pub n_gpu_layers: u32,
    /// Logical batch size.
    pub n_batch: u32,
    /// Physical batch size.
    pub n_ubatch: u32,
    /// Filler tokens read after the pruned prompt before decoding (llama-bench's depth).
    pub depth: u32,
    /// Policy.
    pub policy: String,
    /// Budget as given (`null` for the reference and `full`).
    pub kv_budget: Option<String>,
    /// llama.cpp's standard path with the full cache.
    pub reference: bool,
    /// Flash attention as used for decoding.
    pub flash_attn: String,
    /// Whether flash attention ran while the prompt was read.
    pub prefill_flash_attn: bool,
    /// How attention was observed: `graph`, `host`, or `null`.
    pub observer: Option<String>,
    /// Bytes of attention data read out of llama.cpp per prompt.
    pub observe_bytes: u64,
    /// How the cache was compacted (`device`, `state`, `null`).
    pub compaction: Option<String>,
    /// K+V bytes moved by compaction and shrinking per run.
    pub compact_bytes: u64,
    /// Prompt tokens.
    pub n_prompt_tokens: usize,
    /// Generated tokens per run.
    pub n_generated: usize,
    /// Cells before pruning.
    pub kv_cells_before: u32,
    /// Cells when decoding starts.
    pub kv_cells: u32,
    /// Their K+V bytes.
    pub kv_bytes: u64,
    /// K+V bytes allocated.
    pub kv_bytes_allocated: u64,
    /// The most cells the cache held (llama.cpp's high-water mark; ≤ `--kv-max-cells`).
    pub kv_cells_peak: u32,
    /// Vision encoder ms.
    pub encode_ms: Stat,
    /// Language-model prefill ms (encoding and observation excluded).
    pub prefill_ms: Stat,
    /// Prompt tokens per second (language model: `n_prompt_tokens / prefill_ms`).
    pub prefill_tok_s: Stat,
    /// Prompt tokens per second including image encoding.
    pub prompt_tok_s: Stat,
    /// Time to first token: encode + prefill + observation + scoring + eviction (+ shrink), ms.
    pub ttft_ms: Stat,
    /// Observation + selection ms.
    pub score_ms: Stat,
    /// Removal + compaction ms.
    pub evict_ms: Stat,
    /// Generated tokens per second.
    pub decode_tok_s: Stat,
    /// Peak resident memory during the run, bytes (`null` where it cannot be measured).
    pub peak_rss_bytes: Option<u64>,
    /// Peak GPU memory (not measured yet: `null`).
    pub peak_gpu_bytes: Option<u64>,
    /// prefill_tok_s / reference's (language-model prefill alone).
    pub ratio_prefill: f64,
    /// ttft_ms / reference's (> 1: slower to the first token).
    pub ratio_ttft: f64,
    /// decode_tok_s / reference's.
    pub ratio_decode: f64,
    /// kv_bytes / reference's.
    pub ratio_kv_bytes: f64,
    /// Measured repetitions.
    pub reps: usize,
}

/// At most this many distinct synthetic images are written; larger counts cycle through them (so
/// `--images 10000` writes 64 small files, not 10,000 — and is then refused by the context check
/// before any image is decoded). Runs of up to 64 images see only distinct images, as before.
pub const MAX_SYNTHETIC_IMAGES: usize = 64;

/// Writes `min(n, MAX_SYNTHETIC_IMAGES)` deterministic synthetic images (224 px) into `dir`.
///
/// # Errors
/// I/O errors.
pub fn synthetic_images(dir: &Path, n: usize) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    (0..n.min(MAX_SYNTHETIC_IMAGES))
        .map(|i| {
            let p = dir.join(format!("bench-{i}.png"));
            tiny::write_png(&p, 224, &tiny::sample_image_rgb(1000, i, 224))?;
            Ok(p)
        })
        .collect()
}

/// Resets the peak-RSS high-water mark (Linux); false where unsupported.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak RSS since the last reset, bytes (Linux `VmHWM`).
#[must_use]
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Runs the benchmark; `progress(0, total)` once the prompts are prepared, then
/// `progress(done, total)` after each run; `on_row` gets each row as soon as its last
/// repetition is measured (in the last pass), with its ratios against the reference row of its
/// group (measured before it). When `stop()` turns true (Ctrl-C) the benchmark ends after the
/// current run and returns the rows measured at least once (those not yet streamed included).
///
/// # Errors
/// Invalid settings and run failures.
pub fn run(engine: &Engine, cfg: &BenchConfig, scratch: &Path, progress: &mut dyn FnMut(usize, usize), on_row: &mut dyn FnMut(&BenchRow), stop: &dyn Fn() -> bool) -> Result<Vec<BenchRow>> {
    if cfg.reps == 0 {
        return Err(Error::Config { field: "repetitions", reason: "at least one repetition".into() });
    }
    if cfg.images.is_empty() {
        return Err(Error::Config { field: "images", reason: "give at least one image count".into() });
    }
    if cfg.n_predict < 1 {
        return Err(Error::Config { field: "n_predict", reason: "bench generates a fixed number of tokens (≥ 1)".into() });
    }
    let or = |v: &[u32], d: u32| if v.is_empty() { vec![d] } else { v.to_vec() };
    let (batches, ubatches, depths) = (or(&cfg.batch_sizes, cfg.ctx.n_batch), or(&cfg.ubatch_sizes, cfg.ctx.n_ubatch), or(&cfg.depths, 0));
    let max_images = cfg.images.iter().copied().max().unwrap_or(0);
    let files = if cfg.image_files.is_empty() {
        synthetic_images(scratch, max_images).map_err(|e| Error::Io { what: "synthetic image", path: scratch.to_owned(), cause: e })?
    } else {
        cfg.image_files.clone()
    };
    let mut configs = Vec::new();
    for &n in &cfg.images {
        for &n_batch in &batches {
            for &n_ubatch in &ubatches {
                for &depth in &depths {
                    let c = |kind: PolicySpec, budget, reference, flash_attn| Config { n_images: n, n_batch, n_ubatch, depth, kind, budget, reference, flash_attn };
                    configs.push(c(PolicyKind::Full.into(), None, true, FlashAttn::Auto));
                    configs.push(c(PolicyKind::Full.into(), None, false, FlashAttn::Off));
                    for &kind in cfg.policies.iter().filter(|k| k.kind.prunes()) {
                        for &b in &cfg.budgets {
                            configs.push(c(kind, Some(b), false, cfg.ctx.flash_attn));
                        }
                    }
                }
            }
        }
    }
    let prompts = cfg
        .images
        .iter()
        .map(|&n| {
            let req = Request { images: (0..n).map(|i| files[i % files.len()].clone()).collect(), prompt: cfg.prompt.clone(), ..Default::default() };
            // the reference rows hold the whole prompt in -c (no cap): refuse what cannot fit
            // before decoding any image
            engine.prepare_for(&req, &ContextConfig { kv_max_cells: None, ..cfg.ctx.clone() }).map(|p| (n, p))
        })
        .collect::<Result<Vec<_>>>()?;
    let sampling = SamplingConfig { n_predict: cfg.n_predict, temp: 0.0, ignore_eos: true, seed: Some(0), ..Default::default() };
    let total = configs.len() * (cfg.reps + 1);
    // every prompt fits: say how many runs are coming
    progress(0, total);
    let mut done = 0;
    let mut results: Vec<Vec<(RunReport, Option<u64>)>> = vec![Vec::new(); configs.len()];
    let mut streamed: Vec<BenchRow> = Vec::new();
    'reps: for rep in 0..=cfg.reps {
        for (ci, c) in configs.iter().enumerate() {
            if stop() {
                break 'reps;
            }
            let prompt = &prompts.iter().find(|(n, _)| *n == c.n_images).expect("prepared").1;
            let base = ContextConfig { flash_attn: c.flash_attn, n_batch: c.n_batch, n_ubatch: c.n_ubatch, ..cfg.ctx.clone() };
            // under --kv-max-cells the full-cache rows stay uncapped (they cannot evict; -c sizes
            // them) and the policy rows get a context of the cap
            let ctx = match (cfg.ctx.kv_max_cells, c.kind.kind) {
                (None, _) => base,
                (Some(_), k) if !k.prunes() => ContextConfig { kv_max_cells: None, kv_reserve: None, kv_shift: false, ..base },
                (Some(_), _) => ContextConfig { n_ctx: 0, ..base },
            };
            let policy = c.kind.config(&cfg.policy, c.budget.unwrap_or_default());
            let rss_ok = reset_peak_rss();
            let report = engine.run_prompt_at_depth(prompt, &ctx, &sampling, &policy, PrefillMode::Chunked, c.depth, &mut |_| {})?;
            let rss = if rss_ok { peak_rss() } else { None };
            if rep > 0 {
                results[ci].push((report, rss));
            }
            if rep == cfg.reps {
                let mut r = row(engine, c, &results[ci]);
                if let Some(reference) = streamed.iter().find(|x| x.reference && same_group(x, &r)) {
                    set_ratios(&mut r, reference);
                }
                on_row(&r);
                streamed.push(r);
            }
            done += 1;
            progress(done, total);
        }
    }
    let mut rows: Vec<BenchRow> = configs.iter().zip(&results).filter(|(_, runs)| !runs.is_empty()).map(|(c, runs)| row(engine, c, runs)).collect();
    // ratios against the reference row of the same group
    let refs: Vec<BenchRow> = rows.iter().filter(|r| r.reference).cloned().collect();
    for r in &mut rows {
        if let Some(reference) = refs.iter().find(|x| same_group(x, r)) {
            set_ratios(r, reference);
        }
    }
    Ok(rows)
}

/// Rows compared with the same reference: image count, batch sizes and depth.
fn same_group(a: &BenchRow, b: &BenchRow) -> bool {
    (a.n_images, a.n_batch, a.n_ubatch, a.depth) == (b.n_images, b.n_batch, b.n_ubatch, b.depth)
}

fn set_ratios(r: &mut BenchRow, reference: &BenchRow) {
    r.ratio_prefill = ratio(r.prefill_tok_s.median, reference.prefill_tok_s.median);
    r.ratio_ttft = ratio(r.ttft_ms.median, reference.ttft_ms.median);
    r.ratio_decode = ratio(r.decode_tok_s.median, reference.decode_tok_s.median);
    r.ratio_kv_bytes = ratio(r.kv_bytes as f64, reference.kv_bytes as f64);
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

fn row(engine: &Engine, c: &Config, runs: &[(RunReport, Option<u64>)]) -> BenchRow {
    let first = &runs[0].0;
    let stat = |f: fn(&RunReport) -> f64| Stat::of(runs.iter().map(|(r, _)| f(r)).collect());
    BenchRow {
        n_images: c.n_images,
        threads: engine.config().threads,
        n_gpu_layers: engine.config().n_gpu_layers,
        n_batch: c.n_batch,
        n_ubatch: c.n_ubatch,
        depth: c.depth,
        policy: if c.reference { "reference".into() } else { c.kind.to_string() },
        kv_budget: c.budget.map(|b| b.to_string()),
        reference: c.reference,
        flash_attn: first.flash_attn.into(),
        prefill_flash_attn: first.prefill_flash_attn,
        observer: first.observer.map(str::to_owned),
        observe_bytes: first.observe_bytes,
        compaction: first.compaction.map(str::to_owned),
        compact_bytes: first.compact_bytes,
        n_prompt_tokens: first.n_prompt_tokens,
        n_generated: first.n_generated,
        kv_cells_before: first.kv_cells_before,
        kv_cells: first.kv_cells,
        kv_bytes: first.kv_bytes,
        kv_bytes_allocated: first.kv_bytes_allocated,
        kv_cells_peak: runs.iter().map(|(r, _)| r.kv_cells_peak).max().unwrap_or(0),
        encode_ms: stat(|r| r.encode_ms),
        prefill_ms: stat(|r| r.prefill_ms),
        ttft_ms: stat(|r| r.ttft_ms),
        prefill_tok_s: stat(|r| r.prefill_tok_s),
        prompt_tok_s: stat(|r| if r.encode_ms + r.prefill_ms > 0.0 { r.n_prompt_tokens as f64 * 1e3 / (r.encode_ms + r.prefill_ms) } else { 0.0 }),
        score_ms: stat(|r| r.score_ms),
        evict_ms: stat(|r| r.evict_ms),
        decode_tok_s: stat(|r| r.decode_tok_s),
        peak_rss_bytes: runs.iter().filter_map(|(_, m)| *m).max(),
        peak_gpu_bytes: None,
        ratio_prefill: 0.0,
        ratio_ttft: 0.0,
        ratio_decode: 0.0,
        ratio_kv_bytes: 0.0,
        reps: runs.len(),
    }
}

/// llama-bench's `-o sql`: a `CREATE TABLE` and one `INSERT` per row (SQLite), the provenance
/// in every row, figures as their medians plus mean and sd.
#[must_use]
pub fn sql(prov: &Provenance, rows: &[BenchRow]) -> String {
    let mut out = sql_header();
    for r in rows {
        out.push_str(&sql_row(prov, r));
    }
    out
}

const SQL_STATS: [&str; 7] = ["encode_ms", "prefill_ms", "ttft_ms", "prefill_tok_s", "decode_tok_s", "score_ms", "evict_ms"];
const SQL_TEXT: [&str; 7] = ["version", "commit_hash", "model", "device", "cpu", "type_k", "type_v"];

/// The `CREATE TABLE` of [`sql`].
#[must_use]
pub fn sql_header() -> String {
    let mut out = String::from("CREATE TABLE IF NOT EXISTS csp_llava_bench (\n");
    for c in SQL_TEXT {
        out.push_str(&format!("  {c} TEXT,\n"));
    }
    out.push_str("  threads INTEGER,\n  n_gpu_layers INTEGER,\n  n_batch INTEGER,\n  n_ubatch INTEGER,\n  depth INTEGER,\n  n_images INTEGER,\n  policy TEXT,\n  kv_budget TEXT,\n  flash_attn TEXT,\n  n_prompt_tokens INTEGER,\n  n_generated INTEGER,\n  kv_cells INTEGER,\n  kv_bytes INTEGER,\n  peak_rss_bytes INTEGER,\n  reps INTEGER");
    for st in SQL_STATS {
        out.push_str(&format!(",\n  {st} REAL,\n  {st}_mean REAL,\n  {st}_sd REAL"));
    }
    out.push_str("\n);\n");
    out
}

/// One `INSERT` of [`sql`].
#[must_use]
pub fn sql_row(prov: &Provenance, r: &BenchRow) -> String {
    let q = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let mut vals: Vec<String> = [&prov.version, &prov.commit, &prov.model, &prov.device, &prov.cpu, &prov.type_k, &prov.type_v].map(|v| q(v)).to_vec();
    for v in [r.threads, r.n_gpu_layers, r.n_batch, r.n_ubatch, r.depth] {
        vals.push(v.to_string());
    }
    vals.push(r.n_images.to_string());
    vals.push(q(&r.policy));
    vals.push(r.kv_budget.as_deref().map_or("NULL".into(), q));
    vals.push(q(&r.flash_attn));
    for v in [r.n_prompt_tokens as u64, r.n_generated as u64, u64::from(r.kv_cells), r.kv_bytes] {
        vals.push(v.to_string());
    }
    vals.push(r.peak_rss_bytes.map_or("NULL".into(), |v| v.to_string()));
    vals.push(r.reps.to_string());
    for s in [&r.encode_ms, &r.prefill_ms, &r.ttft_ms, &r.prefill_tok_s, &r.decode_tok_s, &r.score_ms, &r.evict_ms] {
        vals.extend([s.median, s.mean, s.sd].map(|x| format!("{x}")));
    }
    format!("INSERT INTO csp_llava_bench VALUES ({});\n", vals.join(", "))
}

fn fmt_stat(s: &Stat, digits: usize) -> String {
    format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max, d = digits)
}

/// The Markdown table (medians with min–max).
#[must_use]
pub fn markdown(rows: &[BenchRow]) -> String {
    let mut out = markdown_header();
    for r in rows {
        out.push_str(&markdown_row(r));
    }
    out
}

/// The header lines of [`markdown`].
#[must_use]
pub fn markdown_header() -> String {
    "| images | t | ngl | b / ub | depth | policy | budget | fa | observer | prompt tok | KV cells | KV peak | KV bytes | KV alloc | encode ms | prefill tok/s | prompt tok/s (incl. encode) | score ms | evict ms | TTFT ms | decode tok/s | peak RSS | ×prefill | ×TTFT | ×decode | ×KV |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n".into()
}

/// One line of [`markdown`].
#[must_use]
pub fn markdown_row(r: &BenchRow) -> String {
    format!(
        "| {} | {} | {} | {} / {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.3} |\n",
        r.n_images,
        r.threads,
        r.n_gpu_layers,
        r.n_batch,
        r.n_ubatch,
        r.depth,
        r.policy,
        r.kv_budget.as_deref().unwrap_or("–"),
        if r.prefill_flash_attn || r.flash_attn == "off" { r.flash_attn.clone() } else { format!("{} (off for the prompt)", r.flash_attn) },
        r.observer.as_deref().unwrap_or("–"),
        r.n_prompt_tokens,
        r.kv_cells,
        r.kv_cells_peak,
        crate::engine::human_bytes(r.kv_bytes),
        crate::engine::human_bytes(r.kv_bytes_allocated),
        fmt_stat(&r.encode_ms, 1),
        fmt_stat(&r.prefill_tok_s, 0),
        fmt_stat(&r.prompt_tok_s, 0),
        fmt_stat(&r.score_ms, 2),
        fmt_stat(&r.evict_ms, 2),
        fmt_stat(&r.ttft_ms, 0),
        fmt_stat(&r.decode_tok_s, 0),
        r.peak_rss_bytes.map_or("–".into(), crate::engine::human_bytes),
        r.ratio_prefill,
        r.ratio_ttft,
        r.ratio_decode,
        r.ratio_kv_bytes,
    )
}

/// CSV with one column per figure (medians, mins and maxes).
#[must_use]
pub fn csv(rows: &[BenchRow]) -> String {
    let mut out = csv_header();
    for r in rows {
        out.push_str(&csv_row(r));
    }
    out
}

const CSV_STATS: [&str; 8] = ["encode_ms", "prefill_ms", "prefill_tok_s", "prompt_tok_s", "score_ms", "evict_ms", "ttft_ms", "decode_tok_s"];

/// The header line of [`csv`].
#[must_use]
pub fn csv_header() -> String {
    let mut out = String::from(
        "n_images,threads,n_gpu_layers,n_batch,n_ubatch,depth,policy,kv_budget,reference,flash_attn,n_prompt_tokens,n_generated,kv_cells_before,kv_cells,kv_cells_peak,kv_bytes,kv_bytes_allocated",
    );
    for f in CSV_STATS {
        out.push_str(&format!(",{f},{f}_min,{f}_max"));
    }
    out.push_str(",peak_rss_bytes,ratio_prefill,ratio_ttft,ratio_decode,ratio_kv_bytes,reps\n");
    out
}

/// One line of [`csv`].
#[must_use]
pub fn csv_row(r: &BenchRow) -> String {
    let mut out = format!(
        "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
        r.n_images,
        r.threads,
        r.n_gpu_layers,
        r.n_batch,
        r.n_ubatch,
        r.depth,
        r.policy,
        r.kv_budget.as_deref().unwrap_or(""),
        r.reference,
        r.flash_attn,
        r.n_prompt_tokens,
        r.n_generated,
        r.kv_cells_before,
        r.kv_cells,
        r.kv_cells_peak,
        r.kv_bytes,
        r.kv_bytes_allocated
    );
    for s in [&r.encode_ms, &r.prefill_ms, &r.prefill_tok_s, &r.prompt_tok_s, &r.score_ms, &r.evict_ms, &r.ttft_ms, &r.decode_tok_s] {
        out.push_str(&format!(",{},{},{}", s.median, s.min, s.max));
    }
    out.push_str(&format!(",{},{},{},{},{},{}\n", r.peak_rss_bytes.map_or(String::new(), |v| v.to_string()), r.ratio_prefill, r.ratio_ttft, r.ratio_decode, r.ratio_kv_bytes, r.reps));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        let s = Stat::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max, s.mean, s.sd), (2.0, 1.0, 3.0, 2.0, 1.0));
        assert_eq!(s.samples, vec![3.0, 1.0, 2.0], "samples in run order");
        assert_eq!(Stat::of(vec![5.0]).sd, 0.0);
        assert_eq!(Stat::of(vec![4.0, 1.0, 2.0, 3.0]).median, 2.5);
    }
}
