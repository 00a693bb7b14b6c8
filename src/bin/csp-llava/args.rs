//! Command-line flags in llama.cpp's conventions (`-m`, `--mmproj`, `--image`, `-p`, `-n`, `-c`,
//! `-ngl`, `-t`, `--temp`, `--seed`, `-fa`, `-ctk/-ctv`), in groups every command shares —
//! model, context, pruning knobs — converted once into the library's configs.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use csp_llava::config::{self, CacheType, ContextConfig, FlashAttn, KvCap, SamplingConfig};
use csp_llava::policy::{csp_preset, AirCache, Budget, Csp, Expected, Granularity, KNorm, KeyDiff, LookM, Params, PolicyConfig, PolicyKind, PolicySpec, PrefixKvParams, Profile, Protect, Random, VNorm, CSP_PRESETS};
use csp_llava::policy::lookm::Merge;

/// Run 4-bit GGUF vision-language models through llama.cpp and prune their KV cache.
///
/// Streams the answer to stdout; logs and a final timing line go to stderr.
/// Example: csp-llava -m llava-v1.5-7b.Q4_K_M.gguf --mmproj mmproj-f16.gguf
///          --image a.png --image b.jpg -p "Compare the two images."
#[derive(Debug, Parser)]
#[command(name = "csp-llava", version, allow_negative_numbers = true, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
    /// More logs on stderr (-v: info, incl. llama.cpp's; -vv: debug). RUST_LOG overrides.
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write the deterministic tiny test model (tiny-text.gguf, tiny-mmproj.gguf) and four
    /// sample images (img-0.png … img-3.png) into DIR.
    GenTinyModel {
        /// Output directory (created if needed; files are overwritten).
        dir: PathBuf,
        /// Seed of the weights and images: same seed, same bytes.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The model family: llava15 (one fixed-size image), llava16 (any-resolution tiles),
        /// gemma3 (sliding-window text, bidirectional image attention), qwen2.5-vl (M-RoPE) or
        /// smolvlm (Idefics3: image tiles, pixel shuffle).
        #[arg(long, default_value = "llava15", value_parser = parse_family)]
        family: csp_llava::gguf::families::Family,
    },
    /// Write a random-weight model in a real model's shape (text model in --quant, F16 mmproj)
    /// into DIR, for speed and memory figures at the users' scale: never for quality.
    GenModel {
        /// Output directory (created if needed; files are overwritten).
        dir: PathBuf,
        /// The shape: llava-1.5-7b or llava-1.5-13b.
        #[arg(long, value_parser = parse_shape)]
        shape: csp_llava::gguf::shapes::Shape,
        /// The text model's weight type: q4_0, q8_0 or f16.
        #[arg(long, default_value = "q4_0", value_parser = parse_quant)]
        quant: csp_llava::gguf::shapes::Quant,
        /// Transformer blocks of the text model instead of the shape's (a smaller file of the
        /// same width).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=512))]
        layers: Option<u32>,
        /// Seed of the weights: same seed, same bytes.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Speed and memory of each policy × budget next to llama.cpp's own full cache
    /// (llama-bench style; medians with min–max over -r repetitions after a warm-up).
    #[command(allow_negative_numbers = true)]
    Bench(BenchArgs),
    /// Fidelity (KL, top-1 agreement, ROUGE-L against the full cache) and accuracy of each
    /// policy × budget on a JSONL set of cases.
    #[command(allow_negative_numbers = true)]
    Eval(EvalArgs),
    /// PrefixKV's offline profile: per-layer retention for each budget from the attention of a
    /// few calibration cases (same JSONL as eval); use it with
    /// `--kv-policy prefixkv --prefixkv-profile FILE`.
    #[command(allow_negative_numbers = true)]
    Calibrate(CalibrateArgs),
    /// Plot `eval -o json` results: each metric against the KV bytes kept, one line per policy
    /// through its budgets, 95% intervals as error bars; one row of panels per file (an SVG).
    Plot(PlotArgs),
    /// Print how prompts are laid out for the model (text token ids and image slots), one JSON
    /// line per input line `{"prompt": …, "n_images": K, "raw": false}` on stdin — what the projector
    /// training needs to build exactly the sequences csp-llava evaluates.
    #[command(hide = true)]
    PromptLayout {
        /// Text model GGUF.
        #[arg(short = 'm', long = "model")]
        model: PathBuf,
        /// Multimodal projector GGUF.
        #[arg(long)]
        mmproj: PathBuf,
    },
    /// Chat about images read once: the images are read and pruned by the policy before any
    /// question, then each line of standard input is a question answered from the pruned cache
    /// (or a command: `/image FILE`, `/clear`, `/stats`, `/quit`). `-p` asks a first question.
    /// Ctrl-C stops the answer; a second Ctrl-C exits.
    #[command(allow_negative_numbers = true)]
    Chat(RunArgs),
    /// Run the main job on the built-in default: the real small VLM (SmolLM2-135M + DINOv2-small,
    /// built by models/build.sh) with CSP on four easy-vqa test images and a question about one
    /// of them by its number; without it, the tiny random model and its sample images. Takes
    /// every flag of the main command.
    #[command(allow_negative_numbers = true)]
    Demo {
        /// Use the tiny random model, written here.
        #[arg(long)]
        dir: Option<PathBuf>,
        #[command(flatten)]
        run: RunArgs,
    },
}

// ---------------------------------------------------------------------------------------------
// Flag groups

/// Which model to load and where to run it.
#[derive(Debug, Clone, Default, Args)]
pub struct ModelFlags {
    /// Text model GGUF (e.g. llava-v1.5-7b Q4_K_M).
    #[arg(short = 'm', long = "model", value_name = "FNAME")]
    pub model: Option<PathBuf>,
    /// Multimodal projector GGUF (mmproj) for the model.
    #[arg(long, value_name = "FNAME")]
    pub mmproj: Option<PathBuf>,
    #[command(flatten)]
    pub hf: HfArgs,
    /// Threads [default: available cores]; bench sweeps a comma-separated list.
    #[arg(short = 't', long, value_name = "N[,N…]", value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub threads: Vec<u32>,
    /// Layers to offload to the GPU: a number, `auto` or `all` (written `-ngl`) [default: all
    /// when a GPU backend and device exist]; bench sweeps a comma-separated list.
    #[arg(long = "n-gpu-layers", value_name = "N[,N…]", value_delimiter = ',', value_parser = parse_ngl)]
    pub n_gpu_layers: Vec<u32>,
    /// Read the model into memory instead of mapping the file (as llama.cpp's --no-mmap): RSS
    /// then counts only what must stay resident.
    #[arg(long = "no-mmap")]
    pub no_mmap: bool,
}

impl ModelFlags {
    /// `-t` (the last given).
    pub fn threads(&self) -> Option<u32> {
        self.threads.last().copied()
    }

    /// `-ngl` (the last given).
    pub fn ngl(&self) -> Option<u32> {
        self.n_gpu_layers.last().copied()
    }
}

/// The first flag given a comma-separated list where only bench sweeps: commands other than
/// bench refuse it.
pub fn sweep_flag(m: &ModelFlags, c: &ContextFlags) -> Option<&'static str> {
    [(m.threads.len(), "-t"), (m.n_gpu_layers.len(), "-ngl"), (c.batch_size.len(), "-b"), (c.ubatch_size.len(), "-ub")].into_iter().find(|(n, _)| *n > 1).map(|(_, f)| f)
}

/// Hugging Face Hub download flags, as llama.cpp's `-hf`, `-hff`, `-hft`.
#[derive(Debug, Clone, Default, Args)]
pub struct HfArgs {
    /// Download the model and its projector from a Hugging Face repository: `user/repo[:quant]`
    /// (the quant asked, else Q4_K_M, else the first GGUF; `mmproj*.gguf` as the projector),
    /// into the Hugging Face cache (written `-hf` or `-hfr`; HF_TOKEN, HF_ENDPOINT, HF_HOME and
    /// HF_HUB_CACHE apply; what is cached works offline, and HF_HUB_OFFLINE=1 never touches the
    /// network).
    #[arg(long = "hf-repo", value_name = "USER/REPO[:QUANT]", conflicts_with = "model")]
    pub hf_repo: Option<String>,
    /// The model file in that repository, instead of picking by quant (written `-hff`).
    #[arg(long = "hf-file", value_name = "FILE", requires = "hf_repo")]
    pub hf_file: Option<String>,
    /// Hugging Face access token (written `-hft`) [default: HF_TOKEN, or the token file of the
    /// Hugging Face cache].
    #[arg(long = "hf-token", value_name = "TOKEN", requires = "hf_repo")]
    pub hf_token: Option<String>,
}

/// The llama.cpp context: size, batches, flash attention, cache types, and the cap.
#[derive(Debug, Clone, Args)]
pub struct ContextFlags {
    /// Context size [default: 0 = the model's trained context; with a pruning policy, the
    /// prompt, then the kept cells + -n].
    #[arg(short = 'c', long = "ctx-size", value_name = "N")]
    pub ctx_size: Option<u32>,
    /// Logical batch size.
    #[arg(short = 'b', long = "batch-size", value_name = "N[,N…]", value_delimiter = ',', default_value = "2048", value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: Vec<u32>,
    /// Physical batch size (written `-ub`, as in llama.cpp).
    #[arg(long = "ubatch-size", value_name = "N[,N…]", value_delimiter = ',', default_value = "512", value_parser = clap::value_parser!(u32).range(1..))]
    pub ubatch_size: Vec<u32>,
    /// Flash attention (written `-fa`); policies that observe on the host (--kv-observer host,
    /// AirCache) pause it for the prompt.
    #[arg(long = "flash-attn", value_enum, value_name = "on|off|auto", default_value = "auto")]
    pub flash_attn: FaArg,
    /// KV cache type for K (written `-ctk`): f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1.
    #[arg(long = "cache-type-k", value_name = "TYPE", default_value = "f16")]
    pub cache_type_k: CacheType,
    /// KV cache type for V (written `-ctv`); quantized types need flash attention.
    #[arg(long = "cache-type-v", value_name = "TYPE", default_value = "f16")]
    pub cache_type_v: CacheType,
    /// Cap the KV cache while the prompt is read: at most N cells (or a fraction of the prompt,
    /// with a decimal point); the policy evicts before each image that would not fit, so any
    /// number of images fits a fixed buffer. -c defaults to N.
    /// `auto`: the largest cap whose memory plan fits --mem (or the GPU's free memory), at
    /// most what the prompt needs.
    #[arg(long = "kv-max-cells", value_name = "N", help_heading = "KV cache pruning")]
    pub kv_max_cells: Option<CapArg>,
    /// Memory budget for --kv-max-cells auto and --dry-run: 8GiB, 512MiB, 8G (binary), 8GB
    /// (decimal) or bytes [default: the GPU's free memory when layers are offloaded].
    #[arg(long = "mem", value_name = "SIZE", value_parser = parse_mem, help_heading = "KV cache pruning")]
    pub mem: Option<u64>,
    /// Cells left free after each such eviction, for the text that follows and for generation
    /// [default: -n (at least 32), at most N/4; N/4 with -n -1; the last eviction leaves room
    /// for all of -n, up to half the cap, so generation stays under it]. Without a cap: the cells a
    /// shrunk cache keeps free for generation [default: -n; 1024 with -n -1].
    #[arg(long = "kv-reserve", value_name = "N", help_heading = "KV cache pruning")]
    pub kv_reserve: Option<u32>,
    /// Renumber positions after each eviction so they stay inside the model's trained context
    /// (1-D RoPE models only).
    #[arg(long = "kv-shift", requires = "kv_max_cells", help_heading = "KV cache pruning")]
    pub kv_shift: bool,
    /// Where the policy's attention statistics are computed: graph = inside llama.cpp's graph,
    /// flash attention stays on and only the sums leave it; host = from the attention logits
    /// on the host, flash attention paused for the prompt (AirCache needs it); auto = graph
    /// where the policy allows.
    #[arg(long = "kv-observer", value_enum, value_name = "auto|graph|host", default_value = "auto", help_heading = "KV cache pruning")]
    pub kv_observer: ObserverArg,
    /// How the pruned cache is packed and shrunk: device = K/V move on the device (llama.cpp
    /// graph; falls back to state where unsupported); state = a save/restore round trip
    /// through host memory.
    #[arg(long = "kv-compact", value_enum, value_name = "device|state", default_value = "device", help_heading = "KV cache pruning")]
    pub kv_compact: CompactArg,
    /// Sliding-window models (Gemma 3): cache the whole context in the window layers too
    /// (llama.cpp's --swa-full; off: they hold the window plus one ubatch).
    #[arg(long = "swa-full")]
    pub swa_full: bool,
}

/// `--kv-max-cells`: a cap, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CapArg {
    Cap(KvCap),
    Auto,
}

impl std::str::FromStr for CapArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().eq_ignore_ascii_case("auto") {
            Ok(CapArg::Auto)
        } else {
            s.parse().map(CapArg::Cap)
        }
    }
}

/// Parses a memory size: bytes, or a number with K/M/G/T (or KiB/MiB/GiB/TiB: powers of 1024)
/// or KB/MB/GB/TB (powers of 1000).
pub fn parse_mem(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().map_err(|_| format!("'{s}' is not a size (8GiB, 512MiB, 8000000000)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        u => return Err(format!("unknown unit '{u}' in '{s}' (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")),
    };
    let b = v * mult;
    if !(b >= 1.0 && b < 2f64.powi(63)) {
        return Err(format!("'{s}' is not a usable memory size"));
    }
    Ok(b as u64)
}

/// `--kv-compact`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompactArg {
    Device,
    State,
}

/// `--kv-observer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ObserverArg {
    Auto,
    Graph,
    Host,
}

impl ContextFlags {
    /// Refuses `--kv-max-cells auto` where nothing plans it (bench, eval, calibrate).
    pub fn no_auto_cap(&self, command: &str) -> Result<(), String> {
        match self.kv_max_cells {
            Some(CapArg::Auto) => Err(format!("--kv-max-cells auto applies to a run (the main command and chat), not to {command}; give a cell count")),
            _ => Ok(()),
        }
    }

    pub fn context(&self) -> ContextConfig {
        ContextConfig {
            n_ctx: self.ctx_size.unwrap_or(0),
            n_batch: self.batch_size.last().copied().unwrap_or(2048),
            n_ubatch: self.ubatch_size.last().copied().unwrap_or(512),
            flash_attn: match self.flash_attn {
                FaArg::On => FlashAttn::On,
                FaArg::Off => FlashAttn::Off,
                FaArg::Auto => FlashAttn::Auto,
            },
            type_k: self.cache_type_k,
            type_v: self.cache_type_v,
            kv_max_cells: match self.kv_max_cells {
                Some(CapArg::Cap(c)) => Some(c),
                // resolved by the commands that plan (the main command, chat); the others refuse it
                Some(CapArg::Auto) | None => None,
            },
            kv_reserve: self.kv_reserve,
            kv_shift: self.kv_shift,
            kv_shrink: false,
            observer: match self.kv_observer {
                ObserverArg::Auto => config::ObserverMode::Auto,
                ObserverArg::Graph => config::ObserverMode::Graph,
                ObserverArg::Host => config::ObserverMode::Host,
            },
            kv_compact_on_device: self.kv_compact == CompactArg::Device,
            swa_full: self.swa_full,
        }
    }
}

/// The knobs of the pruning policies (the policy and budget themselves are per command: one in
/// the main command, lists in bench and eval).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "KV cache pruning")]
pub struct TuningFlags {
    /// CSP: share of the selected tokens chosen by cross-modal attention [default: 0.5].
    #[arg(long = "csp-cross-ratio", value_name = "R")]
    pub csp_cross_ratio: Option<f64>,
    /// Recent window = recent_bias × B/2 tokens always kept [default: 1].
    #[arg(long = "csp-recent-bias", value_name = "X")]
    pub csp_recent_bias: Option<f64>,
    /// CSP: n of the n-softmax used to score tokens; 0 = softmax.
    #[arg(long = "csp-n", value_name = "N", default_value_t = 1.0)]
    pub csp_n: f32,
    /// CSP: the released per-dataset cross_ratio/recent_bias (MileBench names, e.g. WebQA,
    /// DocVQA, SlideVQA); explicit --csp-cross-ratio/--csp-recent-bias win.
    #[arg(long = "csp-preset", value_name = "NAME")]
    pub csp_preset: Option<String>,
    /// Query rows observed: the last N prompt tokens, or `all` (every prompt row: a window
    /// that does not depend on where the prompt ends — question-agnostic when the question is
    /// asked after pruning) [default: CSP the recent size B/2, SnapKV 32 (capped by B), H2O all
    /// prompt queries].
    #[arg(long = "obs-window", value_name = "N|all", value_parser = parse_obs_window)]
    pub obs_window: Option<usize>,
    /// How per-layer/per-head choices become the cache: global (one keep-set, B cells), layer or
    /// head (each keeps its own B; the rest of the union is masked per layer/head)
    /// [default: global; layer for prefixkv and aircache]. Lists accept `policy@granularity`.
    #[arg(long = "kv-granularity", value_name = "global|layer|head")]
    pub kv_granularity: Option<Granularity>,
    /// CSP: also apply the n-softmax while decoding (a sink logit ln n per head; paper Eq. 7 —
    /// the released code scores with it only).
    #[arg(long = "csp-decode-sink")]
    pub csp_decode_sink: bool,
    /// CSP, SnapKV, AirCache, PrefixKV, knorm, vnorm, keydiff: keep the prompt's first N tokens whatever the window's
    /// scores (attention sinks, counted in the budget) [default: 0, the methods as released].
    #[arg(long = "kv-protect-first", value_name = "N", default_value_t = 0)]
    pub kv_protect_first: usize,
    /// CSP, SnapKV, AirCache, PrefixKV, knorm, vnorm, keydiff: keep the first N tokens of each image whatever the scores
    /// (counted in the budget) [default: 0].
    #[arg(long = "kv-protect-image", value_name = "N", default_value_t = 0)]
    pub kv_protect_image: usize,
    /// PrefixKV: per-layer retention profile written by `csp-llava calibrate` [default: the
    /// budget in every layer].
    #[arg(long = "prefixkv-profile", value_name = "FILE.json")]
    pub prefixkv_profile: Option<PathBuf>,
    /// AirCache: elite window threshold α (relative to the strongest text key).
    #[arg(long = "aircache-alpha", value_name = "A", default_value_t = 0.9)]
    pub aircache_alpha: f64,
    /// AirCache: let the first prompt token (attention sink) join the elite window.
    #[arg(long = "aircache-keep-sink")]
    pub aircache_keep_sink: bool,
    /// AirCache: lowest per-layer visual retention, as a fraction of the budget.
    #[arg(long = "aircache-r-min", value_name = "F", default_value_t = 0.1)]
    pub aircache_r_min: f64,
    /// knorm, vnorm, keydiff, expected: keep the recent window (B/2, scaled by --csp-recent-bias) instead
    /// of only the last prompt token (kvpress ranks every other token).
    #[arg(long = "kv-score-recent")]
    pub kv_score_recent: bool,
    /// lookm: how evicted entries are merged into the most similar kept ones: pivot (the released
    /// default), avg (the paper's Eq. 10) or none (text-prior selection only)
    #[arg(long = "lookm-merge", value_name = "pivot|avg|none", default_value = "pivot", value_parser = parse_merge)]
    pub lookm_merge: Merge,
    /// expected: future query positions the RoPE rotation of the query statistics is averaged over
    #[arg(long = "expected-future", value_name = "N", default_value_t = 512)]
    pub expected_future: usize,
    /// expected: use the queries' mean only (no covariance term)
    #[arg(long = "expected-no-cov")]
    pub expected_no_cov: bool,
}

fn parse_merge(s: &str) -> Result<Merge, String> {
    match s {
        "pivot" => Ok(Merge::Pivot),
        "avg" | "average" => Ok(Merge::Avg),
        "none" => Ok(Merge::None),
        _ => Err(format!("'{s}' is not pivot, avg or none")),
    }
}

impl TuningFlags {
    /// The library's policy settings for `kind` at `budget` (the random policy seeded by `seed`).
    pub fn policy(&self, kind: PolicyKind, budget: Budget, seed: u64) -> Result<PolicyConfig, String> {
        let d = PolicyConfig::default();
        let (mut cross_ratio, mut recent_bias) = (d.params.csp.cross_ratio, d.recent_bias);
        if let Some(name) = &self.csp_preset {
            (cross_ratio, recent_bias) = csp_preset(name).ok_or_else(|| {
                let names: Vec<_> = CSP_PRESETS.iter().map(|p| p.0).collect();
                format!("unknown --csp-preset '{name}' (one of {})", names.join(", "))
            })?;
        }
        let profile = match &self.prefixkv_profile {
            Some(p) => Some(Profile::load(p).map_err(|e| e.to_string())?),
            None => None,
        };
        Ok(PolicyConfig {
            kind,
            budget,
            recent_bias: self.csp_recent_bias.unwrap_or(recent_bias),
            obs_window: self.obs_window,
            granularity: self.kv_granularity,
            decode_sink: self.csp_decode_sink,
            protect: Protect { first: self.kv_protect_first, per_image: self.kv_protect_image },
            params: Params {
                csp: Csp { cross_ratio: self.csp_cross_ratio.unwrap_or(cross_ratio), n: self.csp_n },
                aircache: AirCache { alpha: self.aircache_alpha, keep_sink: self.aircache_keep_sink, r_min: self.aircache_r_min },
                prefixkv: PrefixKvParams { profile },
                random: Random { seed },
                knorm: KNorm { recent: self.kv_score_recent },
                vnorm: VNorm { recent: self.kv_score_recent, ..VNorm::default() },
                keydiff: KeyDiff { recent: self.kv_score_recent },
                lookm: LookM { merge: self.lookm_merge },
                expected: Expected { recent: self.kv_score_recent, n_future: self.expected_future, cov: !self.expected_no_cov, ..Expected::default() },
                ..d.params
            },
        })
    }
}

/// The command-line flag of a library settings field (errors name what the user typed).
pub fn flag_of(field: &str) -> Option<&'static str> {
    Some(match field {
        "budget" => "--kv-budget",
        "policy" => "--kv-policy",
        "recent_bias" => "--csp-recent-bias",
        "obs_window" => "--obs-window",
        "decode_sink" => "--csp-decode-sink",
        "granularity" => "--kv-granularity",
        "csp.cross_ratio" => "--csp-cross-ratio",
        "csp.n" => "--csp-n",
        "aircache.alpha" => "--aircache-alpha",
        "aircache.r_min" => "--aircache-r-min",
        "knorm.recent" | "vnorm.recent" | "keydiff.recent" => "--kv-score-recent",
        "prefixkv.profile" => "--prefixkv-profile",
        "lookm.merge" => "--lookm-merge",
        "expected.n_future" => "--expected-future",
        "mmproj" => "--mmproj",
        "n_ctx" => "-c/--ctx-size",
        "n_batch" => "-b/--batch-size",
        "n_ubatch" => "-ub/--ubatch-size",
        "type_k" => "-ctk/--cache-type-k",
        "type_v" => "-ctv/--cache-type-v",
        "flash_attn" => "-fa/--flash-attn",
        "kv_max_cells" => "--kv-max-cells",
        "kv_shift" => "--kv-shift",
        "observer" => "--kv-observer",
        "chat_template" => "--chat-template",
        "n_predict" => "-n/--n-predict",
        "temp" => "--temp",
        "top_p" => "--top-p",
        "min_p" => "--min-p",
        "top_k" => "--top-k",
        "repeat_penalty" => "--repeat-penalty",
        "repeat_last_n" => "--repeat-last-n",
        "repetitions" => "-r/--repetitions",
        "images" => "--images",
        "data" => "--data",
        _ => return None,
    })
}

/// What to ask: images, prompt, system message, chat template.
#[derive(Debug, Clone, Args)]
pub struct PromptFlags {
    /// Image file (PNG, JPEG, WebP, GIF, BMP, TIFF, PNM, TGA); repeat for several. `<image>` or
    /// `<__media__>` markers in the prompt place them; without markers they come first, in order.
    #[arg(long = "image", value_name = "FILE")]
    pub images: Vec<PathBuf>,
    /// Prompt text.
    #[arg(short = 'p', long, conflicts_with = "file", allow_hyphen_values = true)]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(short = 'f', long, value_name = "FNAME")]
    pub file: Option<PathBuf>,
    /// Largest image accepted, in megapixels (checked from the file's header before decoding)
    /// [default: 67, i.e. 8192×8192].
    #[arg(long = "image-max-mp", value_name = "MP", value_parser = parse_megapixels)]
    pub image_max_mp: Option<u64>,
    /// Label before each image of a multi-image prompt without `<image>` markers; `{k}` is the
    /// image's number [default: "Image {k}: "].
    #[arg(long = "image-label", value_name = "TEXT", allow_hyphen_values = true)]
    pub image_label: Option<String>,
    /// No labels before the images (they follow each other, one per line).
    #[arg(long = "no-image-labels", conflicts_with = "image_label")]
    pub no_image_labels: bool,
    /// System message (written `-sys`, as in llama.cpp).
    #[arg(long, allow_hyphen_values = true)]
    pub system: Option<String>,
    /// Chat template: a llama.cpp built-in name (chatml, vicuna for LLaVA-1.5, llama2, …) or a
    /// Jinja template string [default: the model's own].
    #[arg(long = "chat-template", value_name = "NAME", conflicts_with = "chat_template_file")]
    pub chat_template: Option<String>,
    /// Read a Jinja chat template from a file (rendered as with --jinja).
    #[arg(long = "chat-template-file", value_name = "FNAME")]
    pub chat_template_file: Option<PathBuf>,
    /// Render the chat template (the model's own `tokenizer.chat_template`, or --chat-template)
    /// with a Jinja engine, as llama.cpp's --jinja, instead of llama.cpp's built-in formats.
    #[arg(long)]
    pub jinja: bool,
    /// Send the prompt as it is, without a chat template.
    #[arg(long = "no-chat-template", conflicts_with_all = ["chat_template", "chat_template_file", "jinja"])]
    pub no_chat_template: bool,
}

/// Sampling and stopping.
#[derive(Debug, Clone, Args)]
pub struct SamplingFlags {
    /// Tokens to generate [default: -1 = until end of generation or a full context].
    #[arg(short = 'n', long = "n-predict", value_name = "N")]
    pub n_predict: Option<i32>,
    /// Temperature; 0 = greedy [default: 0.2, as llama-mtmd-cli].
    #[arg(long, value_name = "T")]
    pub temp: Option<f32>,
    /// Top-k sampling, 0 = off.
    #[arg(long = "top-k", value_name = "N", default_value_t = 40)]
    pub top_k: i32,
    /// Top-p sampling, 1.0 = off.
    #[arg(long = "top-p", value_name = "P", default_value_t = 0.95)]
    pub top_p: f32,
    /// Min-p sampling, 0.0 = off.
    #[arg(long = "min-p", value_name = "P", default_value_t = 0.05)]
    pub min_p: f32,
    /// Repetition penalty, 1.0 = off.
    #[arg(long = "repeat-penalty", value_name = "N", default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Last N tokens the repetition penalty considers (-1 = context size; clamped to it).
    #[arg(long = "repeat-last-n", value_name = "N", default_value_t = 64)]
    pub repeat_last_n: i32,
    /// RNG seed; -1 = random.
    #[arg(short = 's', long, value_name = "SEED", default_value_t = -1)]
    pub seed: i64,
    /// Keep generating past end-of-generation tokens.
    #[arg(long = "ignore-eos")]
    pub ignore_eos: bool,
}

impl SamplingFlags {
    pub fn sampling(&self) -> SamplingConfig {
        let d = SamplingConfig::default();
        SamplingConfig {
            n_predict: self.n_predict.unwrap_or(d.n_predict),
            temp: self.temp.unwrap_or(d.temp),
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: u32::try_from(self.seed).ok(),
            ignore_eos: self.ignore_eos,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Commands

/// The main command (and `demo`): one request.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelFlags,
    #[command(flatten)]
    pub prompt: PromptFlags,
    #[command(flatten)]
    pub sampling: SamplingFlags,
    #[command(flatten)]
    pub ctx: ContextFlags,
    /// KV cache policy: full (no pruning), csp, h2o, snapkv, lookm, prefixkv, aircache, streaming, random, knorm, vnorm, keydiff.
    #[arg(long = "kv-policy", value_name = "NAME", default_value = "full", help_heading = "KV cache pruning")]
    pub kv_policy: PolicyKind,
    /// Cells to keep: a fraction of the prompt with a decimal point (0.2 = 20%) or a cell count
    /// (512). Counts everything kept (sinks, recent window, selected) [default: 0.2].
    #[arg(long = "kv-budget", value_name = "B", help_heading = "KV cache pruning")]
    pub kv_budget: Option<Budget>,
    /// After pruning, move the cache into a context sized to the kept cells plus -n (1024 with
    /// -n -1; --kv-reserve overrides), freeing the large buffer [default: on with a pruning
    /// policy unless -c is given; then the rest of -c stays free for -n -1].
    #[arg(long = "kv-shrink", help_heading = "KV cache pruning", overrides_with = "no_kv_shrink")]
    pub kv_shrink: bool,
    /// Keep the pruned cache in the buffer it was read into (the whole -c, or the model's
    /// trained context without -c).
    #[arg(long = "no-kv-shrink", help_heading = "KV cache pruning", overrides_with = "kv_shrink")]
    pub no_kv_shrink: bool,
    #[command(flatten)]
    pub tuning: TuningFlags,
    /// Write one JSON line per prompt position (modality, image, kept, votes, score).
    #[arg(long = "dump-retention", value_name = "FILE", help_heading = "KV cache pruning")]
    pub dump_retention: Option<PathBuf>,
    /// Print one JSON object (text, token counts, timings, KV sizes) on stdout instead of
    /// streaming text.
    #[arg(long)]
    pub json: bool,
    /// Print the memory plan — weights, KV cache and compute buffers as llama.cpp would
    /// allocate them, for the full cache and under the cap — and stop, reading no image and
    /// no weight.
    #[arg(long = "dry-run", help_heading = "KV cache pruning")]
    pub dry_run: bool,
    /// Chat (written `-cnv`): read the images once, prune, then answer questions line by line
    /// from standard input (`/image FILE`, `/clear`, `/stats`, `/quit`); the default without -p
    /// when standard input is a terminal.
    #[arg(long = "conversation", overrides_with = "no_conversation")]
    pub conversation: bool,
    /// Never chat (written `-no-cnv`): without -p the command stops with an error.
    #[arg(long = "no-conversation", overrides_with = "conversation")]
    pub no_conversation: bool,
}

impl RunArgs {
    pub fn policy(&self) -> Result<PolicyConfig, String> {
        let seed = u64::try_from(self.sampling.seed).unwrap_or(0);
        self.tuning.policy(self.kv_policy, self.kv_budget.unwrap_or_default(), seed)
    }

    /// The context; a pruned cache moves into a buffer sized to it unless `-c` is given or
    /// `--no-kv-shrink` says otherwise.
    pub fn context(&self) -> ContextConfig {
        let shrink = self.kv_shrink || (!self.no_kv_shrink && self.ctx.ctx_size.is_none());
        ContextConfig { kv_shrink: shrink, ..self.ctx.context() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EvalOutput {
    Md,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelFlags,
    #[command(flatten)]
    pub ctx: ContextFlags,
    #[command(flatten)]
    pub tuning: TuningFlags,
    /// Cases, one JSON object per line: {"id", "images": [paths relative to the file],
    /// "prompt", "answer" (optional)}.
    #[arg(long, value_name = "FILE.jsonl")]
    pub data: PathBuf,
    /// Policies, comma-separated (`full` gives the full cache's own accuracy).
    #[arg(long = "kv-policy", value_name = "P[,P…]", value_delimiter = ',', default_value = "full,csp,h2o,snapkv,streaming,random")]
    pub kv_policy: Vec<PolicySpec>,
    /// Budgets, comma-separated.
    #[arg(long = "kv-budget", value_name = "B[,B…]", value_delimiter = ',', default_value = "0.1,0.2")]
    pub kv_budget: Vec<Budget>,
    /// Answer length cap (greedy); answers are compared token by token, so it must be at
    /// least 1 (-1, llama.cpp's "unlimited", is refused here).
    #[arg(short = 'n', long = "n-predict", value_name = "N", default_value_t = 32, value_parser = parse_answer_len)]
    pub n_predict: usize,
    /// Output format of the summary.
    #[arg(short = 'o', long = "output", value_enum, default_value = "md")]
    pub output: EvalOutput,
    /// Per-case results, one JSON line per case.
    #[arg(long = "cases-out", value_name = "FILE.jsonl")]
    pub cases_out: Option<PathBuf>,
    /// Read and prune the images first, then ask the question of the pruned cache (how a cached
    /// multi-image context is queried). Without it the whole prompt is read before pruning, so
    /// the first answer token always comes from the full cache.
    #[arg(long = "question-after-pruning")]
    pub question_after_pruning: bool,
    /// Continue from --cases-out: skip the cases already there.
    #[arg(long, requires = "cases_out")]
    pub resume: bool,
}

impl EvalArgs {
    pub fn config(&self) -> Result<csp_llava::eval::EvalConfig, String> {
        self.ctx.no_auto_cap("eval")?;
        Ok(csp_llava::eval::EvalConfig {
            policies: self.kv_policy.clone(),
            budgets: self.kv_budget.clone(),
            n_predict: self.n_predict,
            ctx: self.ctx.context(),
            policy: self.tuning.policy(PolicyKind::Full, Budget::default(), 0)?,
            question_after_pruning: self.question_after_pruning,
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub model: ModelFlags,
    #[command(flatten)]
    pub ctx: ContextFlags,
    /// Calibration cases, one JSON object per line (as for eval; answers are not used).
    #[arg(long, value_name = "FILE.jsonl")]
    pub data: PathBuf,
    /// Retained budgets to calibrate (fractions; 0.2 keeps 20%).
    #[arg(long = "kv-budget", value_name = "B[,B…]", value_delimiter = ',', default_value = "0.1,0.2,0.5")]
    pub kv_budget: Vec<Budget>,
    /// Use only the first N cases (the PrefixKV paper finds 10 enough); -1 = all.
    #[arg(long = "max-cases", value_name = "N", default_value_t = 10, value_parser = parse_count_or_all)]
    pub max_cases: usize,
    /// Where to write the profile.
    #[arg(long, value_name = "FILE.json")]
    pub out: PathBuf,
}

/// `csp-llava plot`.
#[derive(Debug, clap::Args)]
pub struct PlotArgs {
    /// `eval -o json` outputs; a row of panels each, titled `LABEL` when given as `LABEL=FILE`
    /// (else the file name).
    #[arg(required = true, value_name = "[LABEL=]FILE.json")]
    pub inputs: Vec<String>,
    /// Metrics, one column each: accuracy, contains, kl, top1_agreement, rouge_l,
    /// per_image_accuracy, perplexity.
    #[arg(long, value_delimiter = ',', default_value = "accuracy,kl")]
    pub metric: Vec<String>,
    /// Where to write the SVG.
    #[arg(short = 'o', long = "out", value_name = "FILE.svg")]
    pub out: PathBuf,
}

/// Output format of `bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchOutput {
    Md,
    Csv,
    Json,
    Jsonl,
    Sql,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelFlags,
    #[command(flatten)]
    pub ctx: ContextFlags,
    #[command(flatten)]
    pub tuning: TuningFlags,
    /// Image files to cycle through [default: deterministic synthetic images].
    #[arg(long = "image", value_name = "FILE")]
    pub image_files: Vec<PathBuf>,
    /// Image counts, comma-separated.
    #[arg(long = "images", value_name = "N[,N…]", value_delimiter = ',', default_value = "1,4")]
    pub images: Vec<usize>,
    /// Policies, comma-separated (a reference row and a flash-attention-off `full` row are
    /// always measured).
    #[arg(long = "kv-policy", value_name = "P[,P…]", value_delimiter = ',', default_value = "csp,h2o,snapkv,streaming,random")]
    pub kv_policy: Vec<PolicySpec>,
    /// Budgets, comma-separated (fractions with a decimal point, or cell counts).
    #[arg(long = "kv-budget", value_name = "B[,B…]", value_delimiter = ',', default_value = "0.1,0.2,0.5")]
    pub kv_budget: Vec<Budget>,
    /// Measured repetitions per configuration (after one warm-up pass).
    #[arg(short = 'r', long = "repetitions", value_name = "N", default_value_t = 3)]
    pub reps: usize,
    /// Tokens generated per run (end of generation ignored, so at least 1: -1 would never end).
    #[arg(short = 'n', long = "n-predict", value_name = "N", default_value_t = 32, value_parser = parse_bench_len)]
    pub n_predict: i32,
    /// Prompt text.
    #[arg(short = 'p', long, allow_hyphen_values = true, default_value = "Describe the images in detail.")]
    pub prompt: String,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "md")]
    pub output: BenchOutput,
    /// Also write an SVG plot of decode tok/s and KV bytes against the budget.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Move pruned caches into buffers sized to the kept cells + -n.
    #[arg(long = "kv-shrink")]
    pub kv_shrink: bool,
    /// Depths, comma-separated: tokens read after the pruned prompt before decoding is
    /// measured, as llama-bench's -d (decode speed with a cache that also holds them).
    #[arg(short = 'd', long = "n-depth", value_name = "N[,N…]", value_delimiter = ',', default_value = "0")]
    pub depths: Vec<u32>,
}

impl BenchArgs {
    pub fn config(&self) -> Result<csp_llava::bench::BenchConfig, String> {
        self.ctx.no_auto_cap("bench")?;
        Ok(csp_llava::bench::BenchConfig {
            images: self.images.clone(),
            image_files: self.image_files.clone(),
            policies: self.kv_policy.clone(),
            budgets: self.kv_budget.clone(),
            reps: self.reps,
            n_predict: self.n_predict,
            prompt: self.prompt.clone(),
            ctx: ContextConfig { kv_shrink: self.kv_shrink, ..self.ctx.context() },
            policy: self.tuning.policy(PolicyKind::Full, Budget::default(), 0)?,
            batch_sizes: self.ctx.batch_size.clone(),
            ubatch_sizes: self.ctx.ubatch_size.clone(),
            depths: self.depths.clone(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Value parsers

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FaArg {
    On,
    Off,
    Auto,
}

fn parse_family(s: &str) -> Result<csp_llava::gguf::families::Family, String> {
    s.parse()
}

fn parse_shape(s: &str) -> Result<csp_llava::gguf::shapes::Shape, String> {
    s.parse()
}

fn parse_quant(s: &str) -> Result<csp_llava::gguf::shapes::Quant, String> {
    s.parse()
}

/// Parses `-ngl`: a number, `auto` or `all` (both = every layer).
fn parse_ngl(s: &str) -> Result<u32, String> {
    match s {
        "auto" | "all" => Ok(config::ALL_LAYERS),
        _ => s.parse::<u32>().map_err(|_| format!("'{s}' is not a layer count, 'auto' or 'all'")),
    }
}

/// `--image-max-mp`: megapixels (decimals allowed) → pixels.
fn parse_megapixels(s: &str) -> Result<u64, String> {
    match s.parse::<f64>() {
        Ok(mp) if mp > 0.0 && mp.is_finite() => Ok((mp * 1e6).round() as u64),
        _ => Err(format!("'{s}' is not a positive number of megapixels")),
    }
}

/// `--obs-window`: a number of rows, or `all`.
fn parse_obs_window(s: &str) -> Result<usize, String> {
    if s.eq_ignore_ascii_case("all") {
        return Ok(usize::MAX);
    }
    s.parse::<usize>().map_err(|_| format!("'{s}' is not a number of query rows (or 'all')"))
}

/// `eval -n`: a positive answer length.
fn parse_answer_len(s: &str) -> Result<usize, String> {
    match s.parse::<i64>() {
        Ok(n) if n >= 1 => usize::try_from(n).map_err(|_| format!("{n} is too large")),
        Ok(n) => Err(format!("{n}: eval compares answers token by token, so -n must be at least 1")),
        Err(_) => Err(format!("'{s}' is not a whole number")),
    }
}

/// `bench -n`: a positive count (generation ignores end-of-generation there).
fn parse_bench_len(s: &str) -> Result<i32, String> {
    match s.parse::<i64>() {
        Ok(n) if (1..=i64::from(i32::MAX)).contains(&n) => Ok(n as i32),
        Ok(n) if n < 1 => Err(format!("{n}: bench generates past end-of-generation, so -n must be at least 1")),
        Ok(n) => Err(format!("{n} is too large")),
        Err(_) => Err(format!("'{s}' is not a whole number")),
    }
}

/// A count where -1 means all (llama.cpp's convention).
fn parse_count_or_all(s: &str) -> Result<usize, String> {
    match s.parse::<i64>() {
        Ok(-1) => Ok(usize::MAX),
        Ok(n) if n >= 0 => usize::try_from(n).map_err(|_| format!("{n} is too large")),
        Ok(n) => Err(format!("{n}: give a count, or -1 for all")),
        Err(_) => Err(format!("'{s}' is not a whole number")),
    }
}
