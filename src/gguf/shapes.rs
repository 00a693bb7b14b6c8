//! Random-weight models in the shapes people run, for speed and memory figures at their scale
//! (`csp-llava gen-model`). The weights are random: these models say nothing about quality.
//!
//! * `llava-1.5-7b`: text model of Vicuna-7B's shape — llama architecture, 32 layers, hidden
//!   4096, 32 heads (no GQA, head dim 128), FFN 11008, vocabulary 32000, trained context 4096;
//!   mmproj of CLIP ViT-L/14-336's shape — 336 px, patch 14 → 576 image tokens, width 1024,
//!   16 heads, FFN 4096, 23 layers (LLaVA reads the second-to-last of 24, and its mmproj files
//!   hold 23), class embedding, the `mlp` projector 1024 → 4096 → 4096.
//! * `llava-1.5-13b`: Vicuna-13B's shape — 40 layers, hidden 5120, 40 heads, FFN 13824; the same
//!   encoder with the projector into 5120.
//! * `gemma3-4b`: Gemma 3 4B's shape — `gemma3`, 34 layers, hidden 2560, 8 query / 4 KV heads of
//!   256, FFN 10240, vocabulary 262144, trained context 131072, sliding window 1024 with every
//!   6th layer global (an iSWA cache: only 6 of 34 layers hold the whole context); SigLIP-so400m
//!   mmproj — 896 px, patch 14, width 1152, 16 heads, FFN 4304, 27 layers, pooled 4×4 into 256
//!   tokens per image. (Gemma 3's linear RoPE scaling of the global layers is left out: it changes
//!   no size.)
//! * `qwen2.5-vl-7b`: Qwen2.5-VL-7B's shape — `qwen2vl` with M-RoPE (sections 16/24/24), 28
//!   layers, hidden 3584, 28 query / 4 KV heads of 128, FFN 18944, vocabulary 152064, trained
//!   context 128000, output not tied; vision 32 blocks of width 1280, 16 heads, FFN 3420, full
//!   attention every 8th block, the 2×2 merger into 3584 (an image of w×h px becomes about
//!   (w/28)·(h/28) tokens).
//!
//! Gemma 3 and Qwen2.5-VL are written by the family writers of [`super::families`] at these
//! sizes.
//!
//! The text model is written in the requested type the way llama.cpp's quantizer lays out a
//! file of that type: the matrices and the token embedding in the type, `output.weight` in
//! Q8_0 for Q4_0/Q8_0 files (llama.cpp uses Q6_K, which this writer does not produce: 1 % more
//! bytes), the norms F32. Quantized blocks are drawn directly as random codes (no f32 copy),
//! so a 7B file is written at disk speed. The mmproj is F16 (as LLaVA's are), norms and biases
//! F32. The vocabulary is the tiny model's (bytes, ChatML) padded with filler pieces to the
//! shape's size; the chat template is ChatML.

use std::io;
use std::path::{Path, PathBuf};

use super::families::{self, Sizes, Weights};
use super::{tiny, GgufWriter, TensorType, Value};

/// The text model's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextShape {
    /// Transformer blocks.
    pub n_layer: u32,
    /// Hidden size.
    pub n_embd: u32,
    /// Query heads.
    pub n_head: u32,
    /// KV heads.
    pub n_head_kv: u32,
    /// FFN width.
    pub n_ff: u32,
    /// Vocabulary size.
    pub n_vocab: u32,
    /// Trained context.
    pub n_ctx_train: u32,
}

/// The vision encoder's shape (CLIP ViT + `mlp` projector).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VisionShape {
    /// Input side in pixels.
    pub image: u32,
    /// Patch side in pixels.
    pub patch: u32,
    /// Width.
    pub n_embd: u32,
    /// Heads.
    pub n_head: u32,
    /// FFN width.
    pub n_ff: u32,
    /// Blocks.
    pub n_layer: u32,
}

impl VisionShape {
    /// Tokens per image (one per patch; the class token is dropped by the projector).
    #[must_use]
    pub fn tokens_per_image(&self) -> u32 {
        (self.image / self.patch).pow(2)
    }
}

/// A model shape `gen-model` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// LLaVA-1.5-7B.
    Llava15_7b,
    /// LLaVA-1.5-13B.
    Llava15_13b,
    /// Gemma 3 4B.
    Gemma3_4b,
    /// Qwen2.5-VL-7B.
    Qwen25Vl7b,
}

/// Gemma 3 4B's sizes.
const GEMMA3_4B: Sizes = Sizes {
    n_embd: 2560,
    n_layer: 34,
    n_head: 8,
    n_head_kv: 4,
    head_dim: 256,
    n_ff: 10240,
    n_vocab: 262_144,
    n_ctx_train: 131_072,
    swa: (1024, 6),
    mrope: [0; 4],
    image: 896,
    patch: 14,
    v_embd: 1152,
    v_head: 16,
    v_ff: 4304,
    v_layer: 27,
    wa_pattern: 0,
};

/// Qwen2.5-VL-7B's sizes.
const QWEN25VL_7B: Sizes = Sizes {
    n_embd: 3584,
    n_layer: 28,
    n_head: 28,
    n_head_kv: 4,
    head_dim: 128,
    n_ff: 18944,
    n_vocab: 152_064,
    n_ctx_train: 128_000,
    swa: (0, 0),
    mrope: [16, 24, 24, 0],
    image: 560,
    patch: 14,
    v_embd: 1280,
    v_head: 16,
    v_ff: 3420,
    v_layer: 32,
    wa_pattern: 8,
};

const CLIP_L_336: VisionShape = VisionShape { image: 336, patch: 14, n_embd: 1024, n_head: 16, n_ff: 4096, n_layer: 23 };

impl Shape {
    /// Every shape, in the order `--help` lists them.
    pub const ALL: [Shape; 4] = [Shape::Llava15_7b, Shape::Llava15_13b, Shape::Gemma3_4b, Shape::Qwen25Vl7b];

    /// The name on the command line and in file names.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Shape::Llava15_7b => "llava-1.5-7b",
            Shape::Llava15_13b => "llava-1.5-13b",
            Shape::Gemma3_4b => "gemma3-4b",
            Shape::Qwen25Vl7b => "qwen2.5-vl-7b",
        }
    }

    /// The family writer's sizes (Gemma 3, Qwen2.5-VL); `None` for the LLaVA shapes.
    #[must_use]
    pub fn sizes(self) -> Option<Sizes> {
        match self {
            Shape::Gemma3_4b => Some(GEMMA3_4B),
            Shape::Qwen25Vl7b => Some(QWEN25VL_7B),
            Shape::Llava15_7b | Shape::Llava15_13b => None,
        }
    }

    /// The text model's shape (for the family shapes, what [`Shape::sizes`] says of it).
    #[must_use]
    pub fn text(self) -> TextShape {
        match self {
            Shape::Llava15_7b => TextShape { n_layer: 32, n_embd: 4096, n_head: 32, n_head_kv: 32, n_ff: 11008, n_vocab: 32000, n_ctx_train: 4096 },
            Shape::Llava15_13b => TextShape { n_layer: 40, n_embd: 5120, n_head: 40, n_head_kv: 40, n_ff: 13824, n_vocab: 32000, n_ctx_train: 4096 },
            Shape::Gemma3_4b | Shape::Qwen25Vl7b => {
                let z = self.sizes().unwrap_or(Sizes::TINY);
                TextShape { n_layer: z.n_layer, n_embd: z.n_embd, n_head: z.n_head, n_head_kv: z.n_head_kv, n_ff: z.n_ff, n_vocab: z.n_vocab, n_ctx_train: z.n_ctx_train }
            }
        }
    }

    /// The vision encoder's shape (LLaVA's CLIP; for the family shapes, what [`Shape::sizes`]
    /// says of it, tokens per image as their projectors pool: Gemma 3 4×4, Qwen 2×2 at `image` px).
    #[must_use]
    pub fn vision(self) -> VisionShape {
        match self.sizes() {
            None => CLIP_L_336,
            Some(z) => {
                let pool = if self == Shape::Gemma3_4b { 4 } else { 2 };
                VisionShape { image: z.image, patch: z.patch * pool, n_embd: z.v_embd, n_head: z.v_head, n_ff: z.v_ff, n_layer: z.v_layer }
            }
        }
    }
}

impl std::str::FromStr for Shape {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(sh) = Shape::ALL.into_iter().find(|sh| sh.name() == s) {
            return Ok(sh);
        }
        let known: Vec<&str> = Shape::ALL.iter().map(|s| s.name()).collect();
        Err(format!("unknown shape '{s}' (known: {})", known.join(", ")))
    }
}

/// The text model's weight type (`--quant`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    /// 4.5 bits per weight.
    Q4_0,
    /// 8.5 bits per weight.
    Q8_0,
    /// 16 bits per weight.
    F16,
}

impl Quant {
    /// The name on the command line and in file names.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Quant::Q4_0 => "q4_0",
            Quant::Q8_0 => "q8_0",
            Quant::F16 => "f16",
        }
    }

    fn tensor_type(self) -> TensorType {
        match self {
            Quant::Q4_0 => TensorType::Q4_0,
            Quant::Q8_0 => TensorType::Q8_0,
            Quant::F16 => TensorType::F16,
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_MOSTLY_*`).
    fn file_type(self) -> u32 {
        match self {
            Quant::Q4_0 => 2,
            Quant::Q8_0 => 7,
            Quant::F16 => 1,
        }
    }
}

impl std::str::FromStr for Quant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "q4_0" => Ok(Quant::Q4_0),
            "q8_0" => Ok(Quant::Q8_0),
            "f16" => Ok(Quant::F16),
            _ => Err(format!("unknown weight type '{s}' (known: q4_0, q8_0, f16)")),
        }
    }
}

/// The tiny model's vocabulary padded with filler pieces (`▁w00042`) to `n` entries.
fn vocabulary(n: u32) -> Vec<(String, f32, i32)> {
    let mut v = tiny::vocabulary();
    let base = v.len();
    v.extend((base..n as usize).map(|i| (format!("\u{2581}w{i:05}"), -1000.0 - i as f32 * 1e-3, 1)));
    v.truncate(n as usize);
    v
}

/// The text model of `shape` in `quant`, random weights from `seed`.
#[must_use]
pub fn text_model(name: &str, shape: &TextShape, quant: Quant, seed: u64) -> GgufWriter {
    let TextShape { n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab, n_ctx_train } = *shape;
    let head_dim = n_embd / n_head;
    let vocab = vocabulary(n_vocab);
    let ty = quant.tensor_type();
    let out_ty = if quant == Quant::F16 { TensorType::F16 } else { TensorType::Q8_0 };
    let mut w = GgufWriter::new();
    w.string("general.architecture", "llama")
        .string("general.name", &format!("csp-llava random {name} (seed {seed})"))
        .u32("general.file_type", quant.file_type())
        .u32("llama.context_length", n_ctx_train)
        .u32("llama.embedding_length", n_embd)
        .u32("llama.block_count", n_layer)
        .u32("llama.feed_forward_length", n_ff)
        .u32("llama.attention.head_count", n_head)
        .u32("llama.attention.head_count_kv", n_head_kv)
        .f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .u32("llama.rope.dimension_count", head_dim)
        .f32("llama.rope.freq_base", 10000.0)
        .u32("llama.vocab_size", n_vocab);
    tiny::tokenizer(&mut w, &vocab, tiny::EOS_ID, tiny::CHATML_TEMPLATE);
    let (e, v, f) = (u64::from(n_embd), u64::from(n_vocab), u64::from(n_ff));
    let (q, kv) = (u64::from(n_head * head_dim), u64::from(n_head_kv * head_dim));
    let std = |n_in: u64| 1.0 / (n_in as f32).sqrt();
    w.tensor_random("token_embd.weight", &[e, v], ty, seed, 1.0);
    w.tensor("output_norm.weight", &[e], TensorType::F32, &vec![1.0; n_embd as usize]);
    w.tensor_random("output.weight", &[e, v], out_ty, seed, std(e));
    for i in 0..n_layer {
        let b = |n: &str| format!("blk.{i}.{n}.weight");
        w.tensor(&b("attn_norm"), &[e], TensorType::F32, &vec![1.0; n_embd as usize]);
        w.tensor_random(&b("attn_q"), &[e, q], ty, seed, std(e));
        w.tensor_random(&b("attn_k"), &[e, kv], ty, seed, std(e));
        w.tensor_random(&b("attn_v"), &[e, kv], ty, seed, std(e));
        w.tensor_random(&b("attn_output"), &[q, e], ty, seed, std(q));
        w.tensor(&b("ffn_norm"), &[e], TensorType::F32, &vec![1.0; n_embd as usize]);
        w.tensor_random(&b("ffn_gate"), &[e, f], ty, seed, std(e));
        w.tensor_random(&b("ffn_up"), &[e, f], ty, seed, std(e));
        w.tensor_random(&b("ffn_down"), &[f, e], ty, seed, std(f));
    }
    w
}

/// The mmproj of `vision` with the `mlp` projector into `d` (the text model's hidden size), F16.
#[must_use]
pub fn mmproj(name: &str, vision: &VisionShape, d: u32, seed: u64) -> GgufWriter {
    let VisionShape { image, patch, n_embd, n_head, n_ff, n_layer } = *vision;
    let n_pos = vision.tokens_per_image() + 1;
    let mut w = GgufWriter::new();
    w.string("general.architecture", "clip")
        .string("general.name", &format!("csp-llava random {name} mmproj (seed {seed})"))
        .u32("general.file_type", 1)
        .bool("clip.has_vision_encoder", true)
        .bool("clip.has_text_encoder", false)
        .bool("clip.has_llava_projector", true)
        .string("clip.projector_type", "mlp")
        .u32("clip.vision.image_size", image)
        .u32("clip.vision.patch_size", patch)
        .u32("clip.vision.embedding_length", n_embd)
        .u32("clip.vision.feed_forward_length", n_ff)
        .u32("clip.vision.block_count", n_layer)
        .u32("clip.vision.attention.head_count", n_head)
        .f32("clip.vision.attention.layer_norm_epsilon", 1e-5)
        .u32("clip.vision.projection_dim", d)
        .kv("clip.vision.image_mean", Value::Array([0.481_454_66, 0.457_827_5, 0.408_210_73].map(Value::F32).to_vec()))
        .kv("clip.vision.image_std", Value::Array([0.268_629_54, 0.261_302_58, 0.275_777_1].map(Value::F32).to_vec()))
        .bool("clip.use_gelu", false);
    let (e, f, p, dd) = (u64::from(n_embd), u64::from(n_ff), u64::from(patch), u64::from(d));
    let std = |n_in: u64| 1.0 / (n_in as f32).sqrt();
    let f16 = TensorType::F16;
    let ones = |w: &mut GgufWriter, name: &str, n: u64| {
        w.tensor(name, &[n], TensorType::F32, &vec![1.0; n as usize]);
    };
    let bias = |w: &mut GgufWriter, name: &str, n: u64| {
        w.tensor_random(name, &[n], TensorType::F32, seed, 0.02);
    };
    w.tensor_random("v.patch_embd.weight", &[p, p, 3, e], f16, seed, std(3 * p * p));
    w.tensor_random("v.class_embd", &[e], TensorType::F32, seed, 1.0);
    w.tensor_random("v.position_embd.weight", &[e, u64::from(n_pos)], f16, seed, 0.5);
    ones(&mut w, "v.pre_ln.weight", e);
    bias(&mut w, "v.pre_ln.bias", e);
    for i in 0..n_layer {
        let b = |n: &str| format!("v.blk.{i}.{n}");
        for n in ["attn_q", "attn_k", "attn_v", "attn_out"] {
            w.tensor_random(&b(&format!("{n}.weight")), &[e, e], f16, seed, std(e));
            bias(&mut w, &b(&format!("{n}.bias")), e);
        }
        for n in ["ln1", "ln2"] {
            ones(&mut w, &b(&format!("{n}.weight")), e);
            bias(&mut w, &b(&format!("{n}.bias")), e);
        }
        w.tensor_random(&b("ffn_up.weight"), &[e, f], f16, seed, std(e));
        bias(&mut w, &b("ffn_up.bias"), f);
        w.tensor_random(&b("ffn_down.weight"), &[f, e], f16, seed, std(f));
        bias(&mut w, &b("ffn_down.bias"), e);
    }
    w.tensor_random("mm.0.weight", &[e, dd], f16, seed, std(e));
    bias(&mut w, "mm.0.bias", dd);
    w.tensor_random("mm.2.weight", &[dd, dd], f16, seed, std(dd));
    bias(&mut w, "mm.2.bias", dd);
    w
}

/// What [`write`] wrote.
#[derive(Debug, Clone)]
pub struct Written {
    /// The text model (`<shape>-<quant>-text.gguf`).
    pub text: PathBuf,
    /// The mmproj (`<shape>-mmproj-f16.gguf`).
    pub mmproj: PathBuf,
    /// Tensor bytes of the text model.
    pub text_tensor_bytes: u64,
    /// Tensor bytes of the mmproj.
    pub mmproj_tensor_bytes: u64,
}

/// Writes the text model and mmproj of `shape` into `dir` (created if needed); `n_layer`
/// overrides the text model's depth (tests write 2 layers of the 7B width). An mmproj already
/// there with the same size is kept (it does not depend on the weight type).
///
/// # Errors
/// I/O errors (a full disk among them: the partial file is removed).
pub fn write(dir: &Path, shape: Shape, quant: Quant, seed: u64, n_layer: Option<u32>) -> io::Result<Written> {
    std::fs::create_dir_all(dir)?;
    let mut text = shape.text();
    if let Some(n) = n_layer {
        text.n_layer = n;
    }
    let name = match n_layer {
        Some(n) => format!("{}-{n}l", shape.name()),
        None => shape.name().to_owned(),
    };
    let (t, m) = match shape.sizes() {
        None => (text_model(&name, &text, quant, seed), mmproj(shape.name(), &shape.vision(), text.n_embd, seed)),
        Some(mut z) => {
            z.n_layer = text.n_layer;
            let (wt, label) = (Weights::Random(quant.tensor_type()), format!("random {name}"));
            let mut t = if shape == Shape::Gemma3_4b { families::gemma3_text_sized(&label, &z, wt, seed) } else { families::qwen25vl_text_sized(&label, &z, wt, seed) };
            t.u32("general.file_type", quant.file_type());
            let m = if shape == Shape::Gemma3_4b { families::gemma3_mmproj_sized(&z, wt, seed) } else { families::qwen25vl_mmproj_sized(&z, wt, seed) };
            (t, m)
        }
    };
    let written = Written {
        text: dir.join(format!("{name}-{}-text.gguf", quant.name())),
        mmproj: dir.join(format!("{}-mmproj-f16.gguf", shape.name())),
        text_tensor_bytes: t.tensor_bytes(),
        mmproj_tensor_bytes: m.tensor_bytes(),
    };
    write_or_remove(&t, &written.text)?;
    let kept = std::fs::metadata(&written.mmproj).is_ok_and(|md| md.len() > written.mmproj_tensor_bytes && md.len() < written.mmproj_tensor_bytes + (1 << 20));
    if !kept {
        write_or_remove(&m, &written.mmproj)?;
    }
    Ok(written)
}

fn write_or_remove(w: &GgufWriter, path: &Path) -> io::Result<()> {
    w.write_file(path).inspect_err(|_| {
        let _ = std::fs::remove_file(path);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_unknown_ones_say_what_is_known() {
        assert_eq!("llava-1.5-7b".parse::<Shape>(), Ok(Shape::Llava15_7b));
        assert_eq!("gemma3-4b".parse::<Shape>(), Ok(Shape::Gemma3_4b));
        assert_eq!("qwen2.5-vl-7b".parse::<Shape>(), Ok(Shape::Qwen25Vl7b));
        assert!("llava-9b".parse::<Shape>().unwrap_err().contains("llava-1.5-13b"));
        assert_eq!("Q4_0".parse::<Quant>(), Ok(Quant::Q4_0));
        assert!("q3_k".parse::<Quant>().is_err());
    }

    #[test]
    fn the_7b_shape_has_llava_1_5_7b_sizes() {
        let t = text_model("x", &Shape::Llava15_7b.text(), Quant::Q4_0, 0);
        // 6.74e9 weights: 32 × (4·4096² + 3·4096·11008) in Q4_0, token_embd Q4_0, output Q8_0
        let layers = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) as u64 / 32 * 18 + 32 * 2 * 4096 * 4;
        let want = layers + 32000 * 4096 / 32 * 18 + 32000 * 4096 / 32 * 34 + 4096 * 4;
        assert_eq!(t.tensor_bytes(), want);
        assert!((3.7e9..3.95e9).contains(&(want as f64)), "{want}");
        assert_eq!(Shape::Llava15_7b.vision().tokens_per_image(), 576);
    }

    #[test]
    fn the_family_shapes_have_their_models_sizes() {
        // Gemma 3 4B: 3.88e9 weights (text 3.88e9 incl. the 262144 × 2560 embedding; vision 0.42e9)
        let z = Shape::Gemma3_4b.sizes().unwrap();
        let layer: u64 = 2560 * 2048 * 2 + 2560 * 1024 * 2 + 3 * 2560 * 10240;
        let text = 34 * layer + 262_144 * 2560;
        assert!((3.8e9..3.95e9).contains(&(text as f64)), "{text}");
        let t = families::gemma3_text_sized("x", &z, Weights::Random(TensorType::Q4_0), 0);
        assert_eq!(t.tensor_bytes(), text / 32 * 18 + 34 * (4 * 2560 + 2 * 256) * 4 + 2560 * 4);
        assert_eq!(Shape::Gemma3_4b.vision().tokens_per_image(), 256);
        // Qwen2.5-VL-7B: 7.6e9 text weights (embedding and output 152064 × 3584 each)
        let q = Shape::Qwen25Vl7b.sizes().unwrap();
        assert_eq!(q.mrope.iter().sum::<i32>() as u32, q.head_dim / 2);
        let layer: u64 = 3584 * 3584 * 2 + 3584 * 512 * 2 + 3 * 3584 * 18944;
        let text = 28 * layer + 2 * 152_064 * 3584;
        assert!((7.5e9..7.7e9).contains(&(text as f64)), "{text}");
        assert_eq!(Shape::Qwen25Vl7b.vision().tokens_per_image(), 400, "560 px / 28");
    }
}
