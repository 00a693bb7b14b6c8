//! Tiny random-weight models of each family (`gen-tiny-model --family`): LLaVA-1.5 is
//! [`tiny`]'s model; LLaVA-1.6 adds any-resolution tiles to its mmproj; the families beyond LLaVA
//! are written here with the
//! metadata and tensor names the bundled llama.cpp reads (`src/llama-model.cpp`,
//! `src/models/gemma3.cpp`, `tools/mtmd/clip.cpp`): same sizes as the LLaVA tiny model where the
//! family allows (text 64 wide, 2 layers, 4 query / 2 KV heads of 16, FFN 128; vision 32 wide, 2
//! layers, 4 heads, FFN 64).
//!
//! * **Gemma 3**: text arch `gemma3` — per-head q/k norms, post-attention and post-FFN norms,
//!   tied embeddings, NEOX RoPE; sliding-window attention on with window 64 and pattern 2 (layer
//!   0 local, layer 1 global), so the memory is llama.cpp's iSWA cache. mmproj `gemma3`: SigLIP
//!   (128 px, patch 8) pooled 4×4 → 16 tokens per image, `mm.soft_emb_norm` and
//!   `mm.input_projection` (`[n_embd_text, n_embd_vision]`); image tokens attend bidirectionally.
//!   `<start_of_image>` / `<end_of_image>` are control tokens (mtmd tokenizes them as text).
//! * **Qwen2.5-VL**: text arch `qwen2vl` — q/k/v biases, M-RoPE with `rope.dimension_sections`
//!   `[2, 3, 3, 0]` (sums to head_dim / 2). mmproj `qwen2.5vl_merger`: patch 14 split in two
//!   temporal halves (`v.patch_embd.weight` and `.weight.1`), window attention every 2nd block,
//!   gated FFN, 2×2 merger into the text width; an image becomes (w/28)·(h/28) tokens.
//!   `<|vision_start|>` / `<|vision_end|>` are control tokens.
//!
//! Key types matter: llama.cpp's clip loader asserts on a wrong integer type (so every integer
//! here is a u32, the dimension sections an i32 array).

use super::tiny::{self, filled, random, small, tokenizer, vocabulary, CHATML_TEMPLATE};
use super::{GgufWriter, TensorType, Value};

/// A model family the tiny writer makes (`gen-tiny-model --family`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// LLaVA-1.5: CLIP + `mlp` projector, one fixed-size image.
    Llava15,
    /// LLaVA-1.6: the same text model and encoder, any-resolution tiles (`image_grid_pinpoints`,
    /// `spatial_unpad`) with an image-newline embedding.
    Llava16,
    /// Gemma 3: `gemma3` text with sliding-window layers (an iSWA cache), SigLIP + `gemma3`
    /// projector, image tokens attending bidirectionally .
    Gemma3,
    /// Qwen2.5-VL: `qwen2vl` text with M-RoPE, the `qwen2.5vl_merger` encoder
    /// .
    Qwen25Vl,
}

impl Family {
    /// Every family, in `--help` order.
    pub const ALL: [Family; 4] = [Family::Llava15, Family::Llava16, Family::Gemma3, Family::Qwen25Vl];

    /// The name on the command line.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Family::Llava15 => "llava15",
            Family::Llava16 => "llava16",
            Family::Gemma3 => "gemma3",
            Family::Qwen25Vl => "qwen2.5-vl",
        }
    }
}

impl std::str::FromStr for Family {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(f) = Family::ALL.into_iter().find(|f| f.name() == s) {
            return Ok(f);
        }
        let known: Vec<&str> = Family::ALL.iter().map(|f| f.name()).collect();
        Err(match s {
            "smolvlm" | "idefics3" => format!("family {s} is not written yet (known: {})", known.join(", ")),
            _ => format!("unknown family '{s}' (known: {})", known.join(", ")),
        })
    }
}

/// The tiny text model of `family` (the same for both LLaVA versions).
#[must_use]
pub fn text_model_of(family: Family, seed: u64) -> GgufWriter {
    match family {
        Family::Llava15 | Family::Llava16 => tiny::text_model(seed),
        Family::Gemma3 => gemma3_text(seed),
        Family::Qwen25Vl => qwen25vl_text(seed),
    }
}

/// The tiny mmproj of `family`.
#[must_use]
pub fn mmproj_of(family: Family, seed: u64) -> GgufWriter {
    match family {
        Family::Gemma3 => gemma3_mmproj(seed),
        Family::Qwen25Vl => qwen25vl_mmproj(seed),
        Family::Llava15 => tiny::mmproj(seed),
        Family::Llava16 => {
            // LLaVA-1.6's any-resolution grid at the tiny image size: 1×1, 1×2, 2×1 and 2×2 tiles
            let mut w = tiny::mmproj(seed);
            let side = tiny::vision::IMAGE;
            let pins: Vec<Value> = [side, 2 * side, 2 * side, side, 2 * side, 2 * side, side, side].into_iter().map(|v| Value::I32(v as i32)).collect();
            w.kv("clip.vision.image_grid_pinpoints", Value::Array(pins)).string("clip.vision.mm_patch_merge_type", "spatial_unpad");
            small(&mut w, seed, "v.image_newline", tiny::text::N_EMBD, 0.5);
            w
        }
    }
}

/// Writes the tiny model of `family` ([`tiny::TEXT_FILE`], [`tiny::MMPROJ_FILE`]) and the sample
/// images into `dir`.
///
/// # Errors
/// I/O errors.
pub fn write_family(dir: &std::path::Path, family: Family, seed: u64) -> std::io::Result<()> {
    tiny::write_model(dir, &text_model_of(family, seed), &mmproj_of(family, seed), seed)
}

/// A Gemma-style chat template (llama.cpp detects `<start_of_turn>`).
pub const GEMMA_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' + message['content'] + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}";

const E: u32 = 64;
const N_LAYER: u32 = 2;
const N_HEAD: u32 = 4;
const N_HEAD_KV: u32 = 2;
const HEAD_DIM: u32 = 16;
const N_FF: u32 = 128;
const DV: u32 = 32;
const HV: u32 = 4;
const FV: u32 = 64;
const LV: u32 = 2;

fn f32t() -> TensorType {
    TensorType::F32
}

fn mat(w: &mut GgufWriter, seed: u64, name: &str, n_in: u32, n_out: u32) {
    let data = random(seed, name, (n_in * n_out) as usize, 1.0 / (n_in as f32).sqrt());
    w.tensor(name, &[n_in.into(), n_out.into()], f32t(), &data);
}

/// The tiny vocabulary plus `specials` (control tokens); returns the entries and the id of
/// `eos`.
fn vocab_with(specials: &[&str], eos: &str) -> (Vec<(String, f32, i32)>, u32) {
    let mut v = vocabulary();
    for s in specials {
        if !v.iter().any(|(p, _, _)| p == s) {
            v.push(((*s).to_owned(), 0.0, 3));
        }
    }
    let eos = v.iter().position(|(p, _, _)| p == eos).expect("eos in the vocabulary") as u32;
    (v, eos)
}

/// The metadata every tiny text model of arch `a` shares (shapes, norm epsilon, RoPE base).
fn text_header(a: &str, name: &str, seed: u64) -> GgufWriter {
    let mut w = GgufWriter::new();
    w.string("general.architecture", a)
        .string("general.name", &format!("csp-llava tiny {name} (seed {seed})"))
        .u32(&format!("{a}.context_length"), 4096)
        .u32(&format!("{a}.embedding_length"), E)
        .u32(&format!("{a}.block_count"), N_LAYER)
        .u32(&format!("{a}.feed_forward_length"), N_FF)
        .u32(&format!("{a}.attention.head_count"), N_HEAD)
        .u32(&format!("{a}.attention.head_count_kv"), N_HEAD_KV)
        .f32(&format!("{a}.attention.layer_norm_rms_epsilon"), 1e-6)
        .f32(&format!("{a}.rope.freq_base"), 1e6);
    w
}

/// The Gemma 3 text model.
#[must_use]
pub fn gemma3_text(seed: u64) -> GgufWriter {
    let (v, eos) = vocab_with(&["<start_of_image>", "<end_of_image>", "<start_of_turn>", "<end_of_turn>"], "<end_of_turn>");
    let a = "gemma3";
    let mut w = text_header(a, "gemma3", seed);
    w.u32(&format!("{a}.attention.key_length"), HEAD_DIM)
        .u32(&format!("{a}.attention.value_length"), HEAD_DIM)
        .u32(&format!("{a}.attention.sliding_window"), 64)
        .u32(&format!("{a}.attention.sliding_window_pattern"), 2)
        .f32(&format!("{a}.rope.freq_base_swa"), 10000.0);
    tokenizer(&mut w, &v, eos, GEMMA_TEMPLATE);
    let n_vocab = v.len() as u32;
    let emb = random(seed, "token_embd.weight", (n_vocab * E) as usize, 1.0 / (E as f32).sqrt());
    w.tensor("token_embd.weight", &[E.into(), n_vocab.into()], f32t(), &emb);
    filled(&mut w, "output_norm.weight", E, 1.0);
    for i in 0..N_LAYER {
        let b = |n: &str| format!("blk.{i}.{n}.weight");
        filled(&mut w, &b("attn_norm"), E, 1.0);
        mat(&mut w, seed, &b("attn_q"), E, N_HEAD * HEAD_DIM);
        mat(&mut w, seed, &b("attn_k"), E, N_HEAD_KV * HEAD_DIM);
        mat(&mut w, seed, &b("attn_v"), E, N_HEAD_KV * HEAD_DIM);
        mat(&mut w, seed, &b("attn_output"), N_HEAD * HEAD_DIM, E);
        filled(&mut w, &b("attn_q_norm"), HEAD_DIM, 1.0);
        filled(&mut w, &b("attn_k_norm"), HEAD_DIM, 1.0);
        filled(&mut w, &b("post_attention_norm"), E, 1.0);
        filled(&mut w, &b("ffn_norm"), E, 1.0);
        mat(&mut w, seed, &b("ffn_gate"), E, N_FF);
        mat(&mut w, seed, &b("ffn_up"), E, N_FF);
        mat(&mut w, seed, &b("ffn_down"), N_FF, E);
        filled(&mut w, &b("post_ffw_norm"), E, 1.0);
    }
    w
}

fn clip_common(w: &mut GgufWriter, projector: &str, image: u32, patch: u32, seed: u64) {
    w.string("general.architecture", "clip")
        .string("general.name", &format!("csp-llava tiny {projector} mmproj (seed {seed})"))
        .bool("clip.has_vision_encoder", true)
        .string("clip.projector_type", projector)
        .u32("clip.vision.image_size", image)
        .u32("clip.vision.patch_size", patch)
        .u32("clip.vision.embedding_length", DV)
        .u32("clip.vision.feed_forward_length", FV)
        .u32("clip.vision.block_count", LV)
        .u32("clip.vision.attention.head_count", HV)
        .f32("clip.vision.attention.layer_norm_epsilon", 1e-6)
        .u32("clip.vision.projection_dim", E);
}

/// The Gemma 3 mmproj (SigLIP, 128 px, patch 8, pooled to 16 tokens).
#[must_use]
pub fn gemma3_mmproj(seed: u64) -> GgufWriter {
    let (image, patch) = (128u32, 8u32);
    let mut w = GgufWriter::new();
    clip_common(&mut w, "gemma3", image, patch, seed);
    w.bool("clip.use_gelu", true).kv("clip.vision.image_mean", Value::Array([0.5f32; 3].map(Value::F32).to_vec())).kv("clip.vision.image_std", Value::Array([0.5f32; 3].map(Value::F32).to_vec()));
    let n_pos = (image / patch).pow(2);
    let k = 3 * patch * patch;
    let conv = random(seed, "v.patch_embd.weight", (k * DV) as usize, 1.0 / (k as f32).sqrt());
    w.tensor("v.patch_embd.weight", &[patch.into(), patch.into(), 3, DV.into()], f32t(), &conv);
    small(&mut w, seed, "v.patch_embd.bias", DV, 0.02);
    let pos = random(seed, "v.position_embd.weight", (n_pos * DV) as usize, 0.02);
    w.tensor("v.position_embd.weight", &[DV.into(), n_pos.into()], f32t(), &pos);
    for i in 0..LV {
        let p = |n: &str| format!("v.blk.{i}.{n}");
        for n in ["attn_q", "attn_k", "attn_v", "attn_out"] {
            mat(&mut w, seed, &p(&format!("{n}.weight")), DV, DV);
            small(&mut w, seed, &p(&format!("{n}.bias")), DV, 0.02);
        }
        for n in ["ln1", "ln2"] {
            filled(&mut w, &p(&format!("{n}.weight")), DV, 1.0);
            filled(&mut w, &p(&format!("{n}.bias")), DV, 0.0);
        }
        mat(&mut w, seed, &p("ffn_up.weight"), DV, FV);
        small(&mut w, seed, &p("ffn_up.bias"), FV, 0.02);
        mat(&mut w, seed, &p("ffn_down.weight"), FV, DV);
        small(&mut w, seed, &p("ffn_down.bias"), DV, 0.02);
    }
    filled(&mut w, "v.post_ln.weight", DV, 1.0);
    filled(&mut w, "v.post_ln.bias", DV, 0.0);
    filled(&mut w, "mm.soft_emb_norm.weight", DV, 1.0);
    // text width first: [n_embd_text, n_embd_vision] in ggml order
    let proj = random(seed, "mm.input_projection.weight", (E * DV) as usize, 1.0 / (DV as f32).sqrt());
    w.tensor("mm.input_projection.weight", &[E.into(), DV.into()], f32t(), &proj);
    w
}

/// The Qwen2.5-VL text model.
#[must_use]
pub fn qwen25vl_text(seed: u64) -> GgufWriter {
    let (v, eos) = vocab_with(&["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"], "<|im_end|>");
    let a = "qwen2vl";
    let kv = N_HEAD_KV * HEAD_DIM;
    let mut w = text_header(a, "qwen2.5-vl", seed);
    w.kv(&format!("{a}.rope.dimension_sections"), Value::Array([2, 3, 3, 0].map(Value::I32).to_vec()));
    tokenizer(&mut w, &v, eos, CHATML_TEMPLATE);
    let n_vocab = v.len() as u32;
    let emb = random(seed, "token_embd.weight", (n_vocab * E) as usize, 1.0 / (E as f32).sqrt());
    w.tensor("token_embd.weight", &[E.into(), n_vocab.into()], f32t(), &emb);
    filled(&mut w, "output_norm.weight", E, 1.0);
    for i in 0..N_LAYER {
        let b = |n: &str| format!("blk.{i}.{n}");
        filled(&mut w, &b("attn_norm.weight"), E, 1.0);
        mat(&mut w, seed, &b("attn_q.weight"), E, E);
        small(&mut w, seed, &b("attn_q.bias"), E, 0.02);
        mat(&mut w, seed, &b("attn_k.weight"), E, kv);
        small(&mut w, seed, &b("attn_k.bias"), kv, 0.02);
        mat(&mut w, seed, &b("attn_v.weight"), E, kv);
        small(&mut w, seed, &b("attn_v.bias"), kv, 0.02);
        mat(&mut w, seed, &b("attn_output.weight"), E, E);
        filled(&mut w, &b("ffn_norm.weight"), E, 1.0);
        mat(&mut w, seed, &b("ffn_gate.weight"), E, N_FF);
        mat(&mut w, seed, &b("ffn_up.weight"), E, N_FF);
        mat(&mut w, seed, &b("ffn_down.weight"), N_FF, E);
    }
    w
}

/// The Qwen2.5-VL mmproj (patch 14, window attention every 2nd block, 2×2 merger).
#[must_use]
pub fn qwen25vl_mmproj(seed: u64) -> GgufWriter {
    let patch = 14u32;
    let mut w = GgufWriter::new();
    clip_common(&mut w, "qwen2.5vl_merger", 560, patch, seed);
    w.bool("clip.use_silu", true)
        .u32("clip.vision.n_wa_pattern", 2)
        .kv("clip.vision.image_mean", Value::Array([0.481_454_66, 0.457_827_5, 0.408_210_73].map(Value::F32).to_vec()))
        .kv("clip.vision.image_std", Value::Array([0.268_629_54, 0.261_302_58, 0.275_777_1].map(Value::F32).to_vec()));
    let k = 3 * patch * patch;
    for name in ["v.patch_embd.weight", "v.patch_embd.weight.1"] {
        let conv = random(seed, name, (k * DV) as usize, 1.0 / ((2 * k) as f32).sqrt());
        w.tensor(name, &[patch.into(), patch.into(), 3, DV.into()], f32t(), &conv);
    }
    for i in 0..LV {
        let p = |n: &str| format!("v.blk.{i}.{n}");
        for n in ["attn_q", "attn_k", "attn_v", "attn_out"] {
            mat(&mut w, seed, &p(&format!("{n}.weight")), DV, DV);
            small(&mut w, seed, &p(&format!("{n}.bias")), DV, 0.02);
        }
        filled(&mut w, &p("ln1.weight"), DV, 1.0);
        filled(&mut w, &p("ln2.weight"), DV, 1.0);
        for n in ["ffn_gate", "ffn_up"] {
            mat(&mut w, seed, &p(&format!("{n}.weight")), DV, FV);
            small(&mut w, seed, &p(&format!("{n}.bias")), FV, 0.02);
        }
        mat(&mut w, seed, &p("ffn_down.weight"), FV, DV);
        small(&mut w, seed, &p("ffn_down.bias"), DV, 0.02);
    }
    filled(&mut w, "v.post_ln.weight", DV, 1.0);
    mat(&mut w, seed, "mm.0.weight", 4 * DV, 4 * DV);
    small(&mut w, seed, "mm.0.bias", 4 * DV, 0.02);
    mat(&mut w, seed, "mm.2.weight", 4 * DV, E);
    small(&mut w, seed, "mm.2.bias", E, 0.02);
    w
}
