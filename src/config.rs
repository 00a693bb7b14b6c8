//! Settings of a run, with llama.cpp's defaults (as `llama-mtmd-cli` uses them) and validation.
//! The library has no CLI dependency: the binary maps its flags onto these structs.

use std::path::PathBuf;

use serde::Serialize;

use crate::error::{Error, Result};

/// Which files to load and where to run them.
#[derive(Debug, Clone, Serialize)]
pub struct ModelConfig {
    /// Text model GGUF (`-m`).
    pub model: PathBuf,
    /// Multimodal projector GGUF (`--mmproj`).
    pub mmproj: PathBuf,
    /// Layers offloaded to the GPU (`-ngl`); ignored on a CPU-only build.
    pub n_gpu_layers: u32,
    /// Threads for generation and prompt evaluation (`-t`).
    pub threads: u32,
    /// Map the text model's file into memory (llama.cpp's default) rather than reading it into
    /// buffers (`--no-mmap`). Mapped pages llama.cpp touches while repacking weights for the CPU
    /// count in RSS although the kernel can drop them; `--no-mmap` keeps RSS to what must fit.
    pub use_mmap: bool,
}

impl ModelConfig {
    /// Defaults for `model` + `mmproj`: all layers on the GPU (when there is one), one thread per
    /// available core.
    #[must_use]
    pub fn new(model: impl Into<PathBuf>, mmproj: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            mmproj: mmproj.into(),
            n_gpu_layers: ALL_LAYERS,
            threads: default_threads(),
            use_mmap: true,
        }
    }
}

/// `-ngl all`: more layers than any model has.
pub const ALL_LAYERS: u32 = 999;

/// One thread per available core (llama.cpp uses the physical cores).
#[must_use]
pub fn default_threads() -> u32 {
    std::thread::available_parallelism().map_or(4, |n| n.get() as u32)
}

/// Flash attention setting (`-fa`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FlashAttn {
    /// Let llama.cpp decide (on where the backend supports it).
    #[default]
    Auto,
    /// Always.
    On,
    /// Never.
    Off,
}

/// Where attention statistics are computed while a policy observes the prompt
/// (`--kv-observer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ObserverMode {
    /// Inside llama.cpp's graph where the requests allow it (flash attention stays on), else
    /// on the host.
    #[default]
    Auto,
    /// Inside the graph (patch 0005): only the sums leave llama.cpp; flash attention stays on.
    Graph,
    /// On the host from the `kq` logits (`cb_eval`); flash attention is paused for the prompt.
    /// AirCache's elite window needs it.
    Host,
}

/// KV cache element type (`-ctk`, `-ctv`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheType {
    /// 32-bit float
    F32,
    /// 16-bit float (llama.cpp's default)
    #[default]
    F16,
    /// bfloat16
    Bf16,
    /// 8-bit blocks of 32
    Q8_0,
    /// 4-bit blocks of 32
    Q4_0,
    /// 4-bit blocks of 32 with minimum
    Q4_1,
    /// 4-bit non-linear
    Iq4Nl,
    /// 5-bit blocks of 32
    Q5_0,
    /// 5-bit blocks of 32 with minimum
    Q5_1,
}

impl CacheType {
    /// All names llama.cpp accepts, in its order.
    pub const ALL: [CacheType; 9] = [
        CacheType::F32,
        CacheType::F16,
        CacheType::Bf16,
        CacheType::Q8_0,
        CacheType::Q4_0,
        CacheType::Q4_1,
        CacheType::Iq4Nl,
        CacheType::Q5_0,
        CacheType::Q5_1,
    ];

    /// llama.cpp's name for the type.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            CacheType::F32 => "f32",
            CacheType::F16 => "f16",
            CacheType::Bf16 => "bf16",
            CacheType::Q8_0 => "q8_0",
            CacheType::Q4_0 => "q4_0",
            CacheType::Q4_1 => "q4_1",
            CacheType::Iq4Nl => "iq4_nl",
            CacheType::Q5_0 => "q5_0",
            CacheType::Q5_1 => "q5_1",
        }
    }

    /// Whether the type is block-quantized (a quantized V cache needs flash attention).
    #[must_use]
    pub fn is_quantized(self) -> bool {
        !matches!(self, CacheType::F32 | CacheType::F16 | CacheType::Bf16)
    }
}

impl std::str::FromStr for CacheType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        CacheType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let names: Vec<_> = CacheType::ALL.iter().map(|t| t.name()).collect();
                format!("unknown cache type '{s}' (one of {})", names.join(", "))
            })
    }
}

/// Context (KV cache and batching) settings.
#[derive(Debug, Clone, Serialize)]
pub struct ContextConfig {
    /// Context size in tokens; 0 = the model's trained context (`-c`, llama.cpp's default 0).
    pub n_ctx: u32,
    /// Logical batch size (`-b`, default 2048).
    pub n_batch: u32,
    /// Physical batch size (`-ub`, default 512).
    pub n_ubatch: u32,
    /// Flash attention (`-fa`, default auto).
    pub flash_attn: FlashAttn,
    /// K cache type (`-ctk`, default f16).
    pub type_k: CacheType,
    /// V cache type (`-ctv`, default f16).
    pub type_v: CacheType,
    /// `--kv-max-cells`: bounded prefill — the cache never holds more cells than this while the
    /// prompt is read (the policy evicts before every chunk that would not fit); the context is
    /// allocated for this many cells unless `-c` asks for more.
    pub kv_max_cells: Option<KvCap>,
    /// `--kv-reserve`: cells left free after each bounded-prefill eviction, for the text that
    /// follows and for generation (default: see [`KvCap::default_reserve`]); without a cap, the
    /// cells a shrunk cache keeps free for generation (default `-n`, 1024 for `-n -1`).
    pub kv_reserve: Option<u32>,
    /// `--kv-shift`: renumber positions after each eviction so they stay inside the trained
    /// context (1-D RoPE models only).
    pub kv_shift: bool,
    /// `--kv-shrink`: after pruning, move the cache into a context sized to the kept cells plus
    /// generation room (`kv_reserve`), freeing the large buffer; without `-c`, the prompt is
    /// then read into a buffer sized to it rather than the model's trained context.
    pub kv_shrink: bool,
    /// `--kv-observer`: where attention statistics are computed.
    pub observer: ObserverMode,
    /// Compact (and shrink) the pruned cache on the device (patch 0006; default), instead of a
    /// state round trip through host memory (`--kv-compact state`).
    pub kv_compact_on_device: bool,
    /// `--swa-full`: a sliding-window model's (Gemma 3's) window layers cache the whole context
    /// instead of the window (+ a ubatch). Off by default, as in llama.cpp's tools (its C API's
    /// default is on): for Gemma 3 4B the full-size window cache is 5/6 of all KV bytes.
    pub swa_full: bool,
}

/// `--kv-max-cells`: a number of cells, or a fraction of the prompt's tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(untagged)]
pub enum KvCap {
    /// This many cells (a bare integer).
    Cells(u32),
    /// `0 < f ≤ 1` of the prompt's tokens, rounded up (written with a decimal point).
    Fraction(f64),
}

impl KvCap {
    /// The cap for a prompt of `n_tokens` tokens.
    #[must_use]
    pub fn cells(self, n_tokens: usize) -> u32 {
        match self {
            KvCap::Cells(n) => n,
            KvCap::Fraction(f) => ((f * n_tokens as f64).ceil() as u32).max(1),
        }
    }

    /// The default `--kv-reserve` for a cap of `cap` cells: the generation length (at least 32)
    /// when `-n` is given, at most a quarter of the cap; a quarter of the cap for `-n -1`.
    #[must_use]
    pub fn default_reserve(cap: u32, n_predict: i32) -> u32 {
        let quarter = cap / 4;
        if n_predict < 0 {
            quarter
        } else {
            (n_predict as u32).max(32).min(quarter)
        }
    }
}

impl std::str::FromStr for KvCap {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.contains('.') {
            let f: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
            if !(f > 0.0 && f <= 1.0) {
                return Err(format!("fraction {s} of the prompt is outside (0, 1]; write a cell count without a decimal point"));
            }
            Ok(KvCap::Fraction(f))
        } else {
            let n: u32 = s.parse().map_err(|_| format!("'{s}' is neither a cell count (4096) nor a fraction of the prompt (0.25)"))?;
            if n < 2 {
                return Err(format!("{n} cell(s) cannot hold a chunk and the text before it"));
            }
            Ok(KvCap::Cells(n))
        }
    }
}

impl std::fmt::Display for KvCap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvCap::Cells(n) => write!(f, "{n}"),
            KvCap::Fraction(x) if x.fract() == 0.0 => write!(f, "{x:.1}"),
            KvCap::Fraction(x) => write!(f, "{x}"),
        }
    }
}

impl Default for ContextConfig {
    fn default() -> Self {
        Self {
            n_ctx: 0,
            n_batch: 2048,
            n_ubatch: 512,
            flash_attn: FlashAttn::Auto,
            type_k: CacheType::F16,
            type_v: CacheType::F16,
            kv_max_cells: None,
            kv_reserve: None,
            kv_shift: false,
            kv_shrink: false,
            observer: ObserverMode::Auto,
            kv_compact_on_device: true,
            swa_full: false,
        }
    }
}

impl ContextConfig {
    /// Checks the settings that can be checked without a model.
    ///
    /// # Errors
    /// [`Error::Config`] naming the flag.
    pub fn validate(&self) -> Result<()> {
        // llama.cpp's positions (`llama_pos`) are int32: a context past i32::MAX cells cannot be
        // addressed, and csp-llava compares positions with it as i32.
        if self.n_ctx > i32::MAX as u32 {
            return Err(cfg_err(
                "n_ctx",
                &format!("{} is more than the {} positions llama.cpp can address (0 = the model's trained context)", self.n_ctx, i32::MAX),
            ));
        }
        if self.n_batch == 0 {
            return Err(cfg_err("n_batch", "must be at least 1"));
        }
        if self.n_ubatch == 0 {
            return Err(cfg_err("n_ubatch", "must be at least 1"));
        }
        if self.type_v.is_quantized() && self.flash_attn == FlashAttn::Off {
            return Err(cfg_err(
                "type_v",
                &format!("a quantized V cache ({}) needs flash attention; drop -fa off or use -ctv f16", self.type_v.name()),
            ));
        }
        if self.kv_max_cells.is_none() && self.kv_shift {
            return Err(cfg_err("kv_shift", "applies to a bounded prefill; add --kv-max-cells"));
        }
        Ok(())
    }
}

/// Sampling and stopping settings.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct SamplingConfig {
    /// Tokens to generate; -1 = until end of generation or a full context (`-n`, default -1).
    pub n_predict: i32,
    /// Temperature; ≤ 0 = greedy (`--temp`, default 0.2 as in llama-mtmd-cli).
    pub temp: f32,
    /// Top-k; 0 = off (`--top-k`, default 40).
    pub top_k: i32,
    /// Top-p; 1 = off (`--top-p`, default 0.95).
    pub top_p: f32,
    /// Min-p; 0 = off (`--min-p`, default 0.05).
    pub min_p: f32,
    /// Repetition penalty; 1 = off (`--repeat-penalty`, default 1.0).
    pub repeat_penalty: f32,
    /// Tokens the repetition penalty looks back on (`--repeat-last-n`, default 64).
    pub repeat_last_n: i32,
    /// RNG seed; `None` = random (`--seed -1`, the default).
    pub seed: Option<u32>,
    /// Keep generating past end-of-generation tokens (`--ignore-eos`).
    pub ignore_eos: bool,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            n_predict: -1,
            temp: 0.2,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: None,
            ignore_eos: false,
        }
    }
}

impl SamplingConfig {
    /// Checks ranges.
    ///
    /// # Errors
    /// [`Error::Config`] naming the flag.
    pub fn validate(&self) -> Result<()> {
        if self.n_predict < -1 {
            return Err(cfg_err("n_predict", &format!("{} is below -1 (-1 = until end of generation)", self.n_predict)));
        }
        if !self.temp.is_finite() {
            return Err(cfg_err("temp", "must be a finite number"));
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return Err(cfg_err("top_p", &format!("{} is outside [0, 1]", self.top_p)));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(cfg_err("min_p", &format!("{} is outside [0, 1]", self.min_p)));
        }
        if self.top_k < 0 {
            return Err(cfg_err("top_k", "must be 0 (off) or positive"));
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return Err(cfg_err("repeat_penalty", "must be positive (1.0 = off)"));
        }
        if self.repeat_last_n < -1 {
            return Err(cfg_err("repeat_last_n", "must be -1 (context size), 0 (off) or positive"));
        }
        Ok(())
    }
}

/// What to ask: images, prompt, optional system message and chat template.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Request {
    /// Image files, in order (`--image`, repeatable).
    pub images: Vec<PathBuf>,
    /// The user prompt (`-p` or `-f`). `<image>` or `<__media__>` markers place images;
    /// without markers the images come first, in order.
    pub prompt: String,
    /// System message (`--system`).
    pub system: Option<String>,
    /// Chat template: a llama.cpp built-in name (`chatml`, `vicuna`, `llama2`, …) or a Jinja
    /// template string; `None` = the model's own (`--chat-template`).
    pub chat_template: Option<String>,
    /// Send the prompt as is, without a chat template (`--no-chat-template`).
    pub raw: bool,
    /// Render the chat template (`chat_template`, or the model's `tokenizer.chat_template`) with
    /// a Jinja engine, as llama.cpp's `--jinja`, instead of llama.cpp's built-in formats.
    pub jinja: bool,
    /// Most pixels (width × height as the file declares it, checked before decoding) an image may
    /// have; `None` = [`crate::engine::image::DEFAULT_MAX_PIXELS`] (8192 × 8192 ≈ 67 MP).
    pub max_image_pixels: Option<u64>,
    /// How each image is introduced when the prompt places none of them itself (no `<image>`
    /// markers) and there are two or more: a label where `{k}` stands for the image's number
    /// (1-based), put before the image. `None` = [`DEFAULT_IMAGE_LABEL`] ("Image 1: ", …);
    /// `Some("")` = no labels (`--no-image-labels`). A single image and prompts with their own
    /// markers are laid out as written.
    pub image_label: Option<String>,
    /// Images given in memory (an app's buffers), after `images` in order; same limits.
    #[serde(skip)]
    pub image_data: Vec<ImageData>,
}

impl Request {
    /// Images in all: files, then those in memory.
    #[must_use]
    pub fn n_images(&self) -> usize {
        self.images.len() + self.image_data.len()
    }
}

/// An image given to the library: a file read when the prompt is built, an encoded file's
/// bytes (PNG, JPEG, … from disk or the network), or decoded RGB pixels. Buffers are shared
/// (`Arc`), so requests and chats copy them cheaply.
#[derive(Debug, Clone)]
pub enum ImageData {
    /// A file (read and checked like `--image`).
    File(PathBuf),
    /// The bytes of an image file; `name` is used in messages.
    Encoded {
        /// A name for messages.
        name: String,
        /// The file's bytes.
        bytes: std::sync::Arc<Vec<u8>>,
    },
    /// RGB8 pixels, row-major, `width × height × 3` bytes.
    Rgb {
        /// A name for messages.
        name: String,
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// The pixels.
        rgb: std::sync::Arc<Vec<u8>>,
    },
}

impl ImageData {
    /// Its name in messages.
    #[must_use]
    pub fn name(&self) -> String {
        match self {
            Self::File(p) => p.display().to_string(),
            Self::Encoded { name, .. } | Self::Rgb { name, .. } => name.clone(),
        }
    }
}

/// The label before each image of a multi-image prompt without markers, as multi-image models
/// and people write it, so a question can name an image by number ("In image 3, …").
pub const DEFAULT_IMAGE_LABEL: &str = "Image {k}: ";

fn cfg_err(field: &'static str, reason: &str) -> Error {
    Error::Config { field, reason: reason.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked() {
        let ok = SamplingConfig::default();
        assert!(ok.validate().is_ok());
        assert!(SamplingConfig { n_predict: -2, ..ok.clone() }.validate().is_err());
        assert!(SamplingConfig { top_p: 1.5, ..ok.clone() }.validate().is_err());
        assert!(SamplingConfig { repeat_penalty: 0.0, ..ok.clone() }.validate().is_err());
        assert!(SamplingConfig { temp: f32::NAN, ..ok }.validate().is_err());
        let c = ContextConfig { type_v: CacheType::Q8_0, flash_attn: FlashAttn::Off, ..Default::default() };
        assert!(c.validate().is_err());
        assert!(ContextConfig { n_ctx: i32::MAX as u32, ..Default::default() }.validate().is_ok());
        let e = ContextConfig { n_ctx: 4_000_000_000, ..Default::default() }.validate().unwrap_err().to_string();
        // the library names its field; the CLI maps it to -c/--ctx-size (tests/bad_gguf.rs)
        assert!(e.starts_with("invalid n_ctx: 4000000000 is more than the 2147483647"), "{e}");
        assert_eq!("Q8_0".parse::<CacheType>().unwrap(), CacheType::Q8_0);
        assert!("q3".parse::<CacheType>().is_err());
    }
}
