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
//! * **SmolVLM** (Idefics3): text arch `llama`; mmproj `idefics3`: SigLIP tiles of 32 px (patch
//!   8: 16 patches), pixel shuffle by 2 (`clip.vision.projector.scale_factor`) into 4 tokens,
//!   `mm.model.fc.weight` `[4·n_embd_vision, n_embd_text]`; the preprocessor resizes an image's
//!   longest edge to `clip.vision.preproc_image_size` (64) and cuts 32 px tiles plus an overview:
//!   a 64 px image is 2×2 tiles + overview = 20 tokens, framed by `<fake_token_around_image>`,
//!   `<row_r_col_c>`, `<global-img>` and newline pieces, which mtmd looks up by text.
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
    /// projector, image tokens attending bidirectionally.
    Gemma3,
    /// Qwen2.5-VL: `qwen2vl` text with M-RoPE, the `qwen2.5vl_merger` encoder.
    Qwen25Vl,
    /// SmolVLM (Idefics3): `llama` text, SigLIP + pixel-shuffle `idefics3` projector, each image
    /// split into tiles plus an overview.
    SmolVlm,
}

impl Family {
    /// Every family, in `--help` order.
    pub const ALL: [Family; 5] = [Family::Llava15, Family::Llava16, Family::Gemma3, Family::Qwen25Vl, Family::SmolVlm];

    /// The name on the command line.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Family::Llava15 => "llava15",
            Family::Llava16 => "llava16",
            Family::Gemma3 => "gemma3",
            Family::Qwen25Vl => "qwen2.5-vl",
            Family::SmolVlm => "smolvlm",
        }
    }
}

impl std::str::FromStr for Family {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(f) = Family::ALL.into_iter().find(|f| f.name() == s) {
            return Ok(f);
        }
        if s == "idefics3" {
            return Ok(Family::SmolVlm);
        }
        let known: Vec<&str> = Family::ALL.iter().map(|f| f.name()).collect();
        Err(format!("unknown family '{s}' (known: {})", known.join(", ")))
    }
}

/// The tiny text model of `family` (the same for both LLaVA versions).
#[must_use]
pub fn text_model_of(family: Family, seed: u64) -> GgufWriter {
    match family {
        Family::Llava15 | Family::Llava16 => tiny::text_model(seed),
        Family::Gemma3 => gemma3_text(seed),
        Family::Qwen25Vl => qwen25vl_text(seed),
        Family::SmolVlm => smolvlm_text(seed),
    }
}

/// The tiny mmproj of `family`.
#[must_use]
pub fn mmproj_of(family: Family, seed: u64) -> GgufWriter {
    match family {
        Family::Gemma3 => gemma3_mmproj(seed),
        Family::Qwen25Vl => qwen25vl_mmproj(seed),
        Family::SmolVlm => smolvlm_mmproj(seed),
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

/// The sizes of a family's models: the tiny test sizes ([`Sizes::TINY`]), or a user's shape
/// (`gen-model`, [`super::shapes`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sizes {
    /// Text: hidden size.
    pub n_embd: u32,
    /// Text: blocks.
    pub n_layer: u32,
    /// Text: query heads.
    pub n_head: u32,
    /// Text: KV heads.
    pub n_head_kv: u32,
    /// Text: head size.
    pub head_dim: u32,
    /// Text: FFN width.
    pub n_ff: u32,
    /// Text: vocabulary (the tiny vocabulary padded with filler pieces; `0`: unpadded).
    pub n_vocab: u32,
    /// Text: trained context.
    pub n_ctx_train: u32,
    /// Text: sliding window and pattern (Gemma 3: every `pattern`-th layer global).
    pub swa: (u32, u32),
    /// Text: M-RoPE sections (Qwen2.5-VL; four, summing to `head_dim / 2`).
    pub mrope: [i32; 4],
    /// Vision: input side in pixels (Qwen: the largest side the preprocessor keeps).
    pub image: u32,
    /// Vision: patch side.
    pub patch: u32,
    /// Vision: width.
    pub v_embd: u32,
    /// Vision: heads.
    pub v_head: u32,
    /// Vision: FFN width.
    pub v_ff: u32,
    /// Vision: blocks.
    pub v_layer: u32,
    /// Vision (Qwen2.5-VL): full attention every `n`-th block, window attention in the others.
    pub wa_pattern: u32,
}

impl Sizes {
    /// The tiny test models: text 64 wide, 2 layers, 4 query / 2 KV heads of 16, FFN 128; vision
    /// 32 wide, 2 layers, 4 heads, FFN 64.
    pub const TINY: Sizes = Sizes {
        n_embd: 64,
        n_layer: 2,
        n_head: 4,
        n_head_kv: 2,
        head_dim: 16,
        n_ff: 128,
        n_vocab: 0,
        n_ctx_train: 4096,
        swa: (64, 2),
        mrope: [2, 3, 3, 0],
        image: 0,
        patch: 0,
        v_embd: 32,
        v_head: 4,
        v_ff: 64,
        v_layer: 2,
        wa_pattern: 2,
    };
}

/// How weights are drawn: the tiny models' F32 values (as they always were, so their bytes do
/// not change), or random blocks of a type written at disk speed (`gen-model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// F32, materialised.
    Tiny,
    /// Text matrices and embeddings of this type, vision matrices F16, vectors F32.
    Random(TensorType),
}

impl Weights {
    fn mat(self, w: &mut GgufWriter, seed: u64, name: &str, n_in: u32, n_out: u32, vision: bool) {
        let std = 1.0 / (n_in as f32).sqrt();
        match self {
            Weights::Tiny => {
                let data = random(seed, name, (n_in * n_out) as usize, std);
                w.tensor(name, &[n_in.into(), n_out.into()], f32t(), &data);
            }
            Weights::Random(ty) => {
                w.tensor_random(name, &[n_in.into(), n_out.into()], if vision { TensorType::F16 } else { ty }, seed, std);
            }
        }
    }

    fn small(self, w: &mut GgufWriter, seed: u64, name: &str, n: u32, std: f32) {
        match self {
            Weights::Tiny => small(w, seed, name, n, std),
            Weights::Random(_) => {
                w.tensor_random(name, &[n.into()], f32t(), seed, std);
            }
        }
    }

    /// A tensor of any shape (embeddings, convolutions) with this scale; when random, of type
    /// `ty` (else the text type).
    fn any(self, w: &mut GgufWriter, seed: u64, name: &str, ne: &[u64], std: f32, ty: Option<TensorType>) {
        match self {
            Weights::Tiny => {
                let data = random(seed, name, ne.iter().product::<u64>() as usize, std);
                w.tensor(name, ne, f32t(), &data);
            }
            Weights::Random(t) => {
                w.tensor_random(name, ne, ty.unwrap_or(t), seed, std);
            }
        }
    }
}

fn f32t() -> TensorType {
    TensorType::F32
}

/// The tiny vocabulary plus `specials` (control tokens); returns the entries and the id of
/// `eos`.
fn vocab_with(specials: &[&str], eos: &str, n_vocab: u32) -> (Vec<(String, f32, i32)>, u32) {
    let mut v = vocabulary();
    for s in specials {
        if !v.iter().any(|(p, _, _)| p == s) {
            v.push(((*s).to_owned(), 0.0, 3));
        }
    }
    // a user's shape: filler pieces up to the vocabulary size (as `shapes` pads LLaVA's)
    let base = v.len();
    v.extend((base..n_vocab as usize).map(|i| (format!("\u{2581}w{i:05}"), -1000.0 - i as f32 * 1e-3, 1)));
    let eos = v.iter().position(|(p, _, _)| p == eos).expect("eos in the vocabulary") as u32;
    (v, eos)
}

/// The metadata every text model of arch `a` shares (shapes, norm epsilon, RoPE base).
fn text_header(a: &str, name: &str, z: &Sizes, seed: u64) -> GgufWriter {
    let mut w = GgufWriter::new();
    w.string("general.architecture", a)
        .string("general.name", &format!("csp-llava {name} (seed {seed})"))
        .u32(&format!("{a}.context_length"), z.n_ctx_train)
        .u32(&format!("{a}.embedding_length"), z.n_embd)
        .u32(&format!("{a}.block_count"), z.n_layer)
        .u32(&format!("{a}.feed_forward_length"), z.n_ff)
        .u32(&format!("{a}.attention.head_count"), z.n_head)
        .u32(&format!("{a}.attention.head_count_kv"), z.n_head_kv)
        .f32(&format!("{a}.attention.layer_norm_rms_epsilon"), 1e-6)
        .f32(&format!("{a}.rope.freq_base"), 1e6);
    w
}

/// The tiny Gemma 3 text model.
#[must_use]
pub fn gemma3_text(seed: u64) -> GgufWriter {
    gemma3_text_sized("tiny gemma3", &Sizes::TINY, Weights::Tiny, seed)
}

/// A Gemma 3 text model of sizes `z`.
#[must_use]
pub fn gemma3_text_sized(name: &str, z: &Sizes, wt: Weights, seed: u64) -> GgufWriter {
    let (v, eos) = vocab_with(&["<start_of_image>", "<end_of_image>", "<start_of_turn>", "<end_of_turn>"], "<end_of_turn>", z.n_vocab);
    let a = "gemma3";
    let (e, hd, ff) = (z.n_embd, z.head_dim, z.n_ff);
    let mut w = text_header(a, name, z, seed);
    w.u32(&format!("{a}.attention.key_length"), hd)
        .u32(&format!("{a}.attention.value_length"), hd)
        .u32(&format!("{a}.attention.sliding_window"), z.swa.0)
        .u32(&format!("{a}.attention.sliding_window_pattern"), z.swa.1)
        .f32(&format!("{a}.rope.freq_base_swa"), 10000.0);
    tokenizer(&mut w, &v, eos, GEMMA_TEMPLATE);
    let n_vocab = v.len() as u32;
    wt.any(&mut w, seed, "token_embd.weight", &[e.into(), n_vocab.into()], 1.0 / (e as f32).sqrt(), None);
    filled(&mut w, "output_norm.weight", e, 1.0);
    for i in 0..z.n_layer {
        let b = |n: &str| format!("blk.{i}.{n}.weight");
        filled(&mut w, &b("attn_norm"), e, 1.0);
        wt.mat(&mut w, seed, &b("attn_q"), e, z.n_head * hd, false);
        wt.mat(&mut w, seed, &b("attn_k"), e, z.n_head_kv * hd, false);
        wt.mat(&mut w, seed, &b("attn_v"), e, z.n_head_kv * hd, false);
        wt.mat(&mut w, seed, &b("attn_output"), z.n_head * hd, e, false);
        filled(&mut w, &b("attn_q_norm"), hd, 1.0);
        filled(&mut w, &b("attn_k_norm"), hd, 1.0);
        filled(&mut w, &b("post_attention_norm"), e, 1.0);
        filled(&mut w, &b("ffn_norm"), e, 1.0);
        wt.mat(&mut w, seed, &b("ffn_gate"), e, ff, false);
        wt.mat(&mut w, seed, &b("ffn_up"), e, ff, false);
        wt.mat(&mut w, seed, &b("ffn_down"), ff, e, false);
        filled(&mut w, &b("post_ffw_norm"), e, 1.0);
    }
    w
}

fn clip_common(w: &mut GgufWriter, projector: &str, z: &Sizes, wt: Weights, seed: u64) {
    let tag = if wt == Weights::Tiny { "tiny" } else { "random" };
    w.string("general.architecture", "clip")
        .string("general.name", &format!("csp-llava {tag} {projector} mmproj (seed {seed})"))
        .bool("clip.has_vision_encoder", true)
        .string("clip.projector_type", projector)
        .u32("clip.vision.image_size", z.image)
        .u32("clip.vision.patch_size", z.patch)
        .u32("clip.vision.embedding_length", z.v_embd)
        .u32("clip.vision.feed_forward_length", z.v_ff)
        .u32("clip.vision.block_count", z.v_layer)
        .u32("clip.vision.attention.head_count", z.v_head)
        .f32("clip.vision.attention.layer_norm_epsilon", 1e-6)
        .u32("clip.vision.projection_dim", z.n_embd);
}

/// A SigLIP encoder's tensors (patch embedding with bias, learned positions, pre-norm blocks with
/// GELU FFN, post-norm), as Gemma 3's and Idefics3's mmproj files hold them.
fn siglip_tower(w: &mut GgufWriter, z: &Sizes, wt: Weights, seed: u64) {
    let (patch, dv, fv) = (z.patch, z.v_embd, z.v_ff);
    let n_pos = (z.image / patch).pow(2);
    let k = 3 * patch * patch;
    wt.any(w, seed, "v.patch_embd.weight", &[patch.into(), patch.into(), 3, dv.into()], 1.0 / (k as f32).sqrt(), Some(TensorType::F16));
    wt.small(w, seed, "v.patch_embd.bias", dv, 0.02);
    // F32: the graph adds it to the patch embeddings directly (an F16 operand aborts the CPU
    // backend's add), as converted Gemma 3 and Idefics3 mmproj files store it
    wt.any(w, seed, "v.position_embd.weight", &[dv.into(), n_pos.into()], 0.02, Some(TensorType::F32));
    for i in 0..z.v_layer {
        let p = |n: &str| format!("v.blk.{i}.{n}");
        for n in ["attn_q", "attn_k", "attn_v", "attn_out"] {
            wt.mat(w, seed, &p(&format!("{n}.weight")), dv, dv, true);
            wt.small(w, seed, &p(&format!("{n}.bias")), dv, 0.02);
        }
        for n in ["ln1", "ln2"] {
            filled(w, &p(&format!("{n}.weight")), dv, 1.0);
            filled(w, &p(&format!("{n}.bias")), dv, 0.0);
        }
        wt.mat(w, seed, &p("ffn_up.weight"), dv, fv, true);
        wt.small(w, seed, &p("ffn_up.bias"), fv, 0.02);
        wt.mat(w, seed, &p("ffn_down.weight"), fv, dv, true);
        wt.small(w, seed, &p("ffn_down.bias"), dv, 0.02);
    }
    filled(w, "v.post_ln.weight", dv, 1.0);
    filled(w, "v.post_ln.bias", dv, 0.0);
}

/// The tiny Gemma 3 mmproj (SigLIP, 128 px, patch 8, pooled to 16 tokens).
#[must_use]
pub fn gemma3_mmproj(seed: u64) -> GgufWriter {
    gemma3_mmproj_sized(&Sizes { image: 128, patch: 8, ..Sizes::TINY }, Weights::Tiny, seed)
}

/// A Gemma 3 mmproj of sizes `z` (SigLIP; the projector pools 4×4 patches into one token).
#[must_use]
pub fn gemma3_mmproj_sized(z: &Sizes, wt: Weights, seed: u64) -> GgufWriter {
    let dv = z.v_embd;
    let mut w = GgufWriter::new();
    clip_common(&mut w, "gemma3", z, wt, seed);
    if wt != Weights::Tiny {
        w.u32("general.file_type", 1);
    }
    w.bool("clip.use_gelu", true).kv("clip.vision.image_mean", Value::Array([0.5f32; 3].map(Value::F32).to_vec())).kv("clip.vision.image_std", Value::Array([0.5f32; 3].map(Value::F32).to_vec()));
    siglip_tower(&mut w, z, wt, seed);
    filled(&mut w, "mm.soft_emb_norm.weight", dv, 1.0);
    // text width first: [n_embd_text, n_embd_vision] in ggml order
    wt.any(&mut w, seed, "mm.input_projection.weight", &[z.n_embd.into(), dv.into()], 1.0 / (dv as f32).sqrt(), Some(TensorType::F16));
    w
}

/// The tiny Qwen2.5-VL text model.
#[must_use]
pub fn qwen25vl_text(seed: u64) -> GgufWriter {
    qwen25vl_text_sized("tiny qwen2.5-vl", &Sizes::TINY, Weights::Tiny, seed)
}

/// A Qwen2.5-VL text model of sizes `z`.
#[must_use]
pub fn qwen25vl_text_sized(name: &str, z: &Sizes, wt: Weights, seed: u64) -> GgufWriter {
    let (v, eos) = vocab_with(&["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"], "<|im_end|>", z.n_vocab);
    let a = "qwen2vl";
    let (e, ff) = (z.n_embd, z.n_ff);
    let (q, kv) = (z.n_head * z.head_dim, z.n_head_kv * z.head_dim);
    let mut w = text_header(a, name, z, seed);
    w.kv(&format!("{a}.rope.dimension_sections"), Value::Array(z.mrope.map(Value::I32).to_vec()));
    tokenizer(&mut w, &v, eos, CHATML_TEMPLATE);
    let n_vocab = v.len() as u32;
    wt.any(&mut w, seed, "token_embd.weight", &[e.into(), n_vocab.into()], 1.0 / (e as f32).sqrt(), None);
    filled(&mut w, "output_norm.weight", e, 1.0);
    if wt != Weights::Tiny {
        // Qwen2.5-VL-7B does not tie its output to the embedding
        wt.any(&mut w, seed, "output.weight", &[e.into(), n_vocab.into()], 1.0 / (e as f32).sqrt(), Some(TensorType::Q8_0).filter(|_| wt != Weights::Random(TensorType::F16)));
    }
    for i in 0..z.n_layer {
        let b = |n: &str| format!("blk.{i}.{n}");
        filled(&mut w, &b("attn_norm.weight"), e, 1.0);
        wt.mat(&mut w, seed, &b("attn_q.weight"), e, q, false);
        wt.small(&mut w, seed, &b("attn_q.bias"), q, 0.02);
        wt.mat(&mut w, seed, &b("attn_k.weight"), e, kv, false);
        wt.small(&mut w, seed, &b("attn_k.bias"), kv, 0.02);
        wt.mat(&mut w, seed, &b("attn_v.weight"), e, kv, false);
        wt.small(&mut w, seed, &b("attn_v.bias"), kv, 0.02);
        wt.mat(&mut w, seed, &b("attn_output.weight"), q, e, false);
        filled(&mut w, &b("ffn_norm.weight"), e, 1.0);
        wt.mat(&mut w, seed, &b("ffn_gate.weight"), e, ff, false);
        wt.mat(&mut w, seed, &b("ffn_up.weight"), e, ff, false);
        wt.mat(&mut w, seed, &b("ffn_down.weight"), ff, e, false);
    }
    w
}

/// The tiny Qwen2.5-VL mmproj (patch 14, window attention every 2nd block, 2×2 merger).
#[must_use]
pub fn qwen25vl_mmproj(seed: u64) -> GgufWriter {
    qwen25vl_mmproj_sized(&Sizes { image: 560, patch: 14, ..Sizes::TINY }, Weights::Tiny, seed)
}

/// A Qwen2.5-VL mmproj of sizes `z` (two temporal patch halves, gated FFN, 2×2 merger).
#[must_use]
pub fn qwen25vl_mmproj_sized(z: &Sizes, wt: Weights, seed: u64) -> GgufWriter {
    let (patch, dv, fv) = (z.patch, z.v_embd, z.v_ff);
    let mut w = GgufWriter::new();
    clip_common(&mut w, "qwen2.5vl_merger", z, wt, seed);
    if wt != Weights::Tiny {
        w.u32("general.file_type", 1);
    }
    w.bool("clip.use_silu", true)
        .u32("clip.vision.n_wa_pattern", z.wa_pattern)
        .kv("clip.vision.image_mean", Value::Array([0.481_454_66, 0.457_827_5, 0.408_210_73].map(Value::F32).to_vec()))
        .kv("clip.vision.image_std", Value::Array([0.268_629_54, 0.261_302_58, 0.275_777_1].map(Value::F32).to_vec()));
    let k = 3 * patch * patch;
    for name in ["v.patch_embd.weight", "v.patch_embd.weight.1"] {
        wt.any(&mut w, seed, name, &[patch.into(), patch.into(), 3, dv.into()], 1.0 / ((2 * k) as f32).sqrt(), Some(TensorType::F16));
    }
    for i in 0..z.v_layer {
        let p = |n: &str| format!("v.blk.{i}.{n}");
        for n in ["attn_q", "attn_k", "attn_v", "attn_out"] {
            wt.mat(&mut w, seed, &p(&format!("{n}.weight")), dv, dv, true);
            wt.small(&mut w, seed, &p(&format!("{n}.bias")), dv, 0.02);
        }
        filled(&mut w, &p("ln1.weight"), dv, 1.0);
        filled(&mut w, &p("ln2.weight"), dv, 1.0);
        for n in ["ffn_gate", "ffn_up"] {
            wt.mat(&mut w, seed, &p(&format!("{n}.weight")), dv, fv, true);
            wt.small(&mut w, seed, &p(&format!("{n}.bias")), fv, 0.02);
        }
        wt.mat(&mut w, seed, &p("ffn_down.weight"), fv, dv, true);
        wt.small(&mut w, seed, &p("ffn_down.bias"), dv, 0.02);
    }
    filled(&mut w, "v.post_ln.weight", dv, 1.0);
    wt.mat(&mut w, seed, "mm.0.weight", 4 * dv, 4 * dv, true);
    wt.small(&mut w, seed, "mm.0.bias", 4 * dv, 0.02);
    wt.mat(&mut w, seed, "mm.2.weight", 4 * dv, z.n_embd, true);
    wt.small(&mut w, seed, "mm.2.bias", z.n_embd, 0.02);
    w
}

/// The tiny SmolVLM (Idefics3) text model: the LLaVA tiny model's llama layout with the pieces
/// Idefics3's image framing looks up.
#[must_use]
pub fn smolvlm_text(seed: u64) -> GgufWriter {
    let z = Sizes::TINY;
    let specials = ["<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<global-img>", "<row_1_col_1>", "<row_1_col_2>", "<row_2_col_1>", "<row_2_col_2>", "\n", "\n\n"];
    let (v, eos) = vocab_with(&specials, "<|im_end|>", 0);
    let a = "llama";
    let (e, hd) = (z.n_embd, z.head_dim);
    let mut w = text_header(a, "tiny smolvlm", &z, seed);
    w.u32(&format!("{a}.rope.dimension_count"), hd);
    tokenizer(&mut w, &v, eos, CHATML_TEMPLATE);
    let n_vocab = v.len() as u32;
    let wt = Weights::Tiny;
    wt.any(&mut w, seed, "token_embd.weight", &[e.into(), n_vocab.into()], 1.0, None);
    filled(&mut w, "output_norm.weight", e, 1.0);
    wt.mat(&mut w, seed, "output.weight", e, n_vocab, false);
    for i in 0..z.n_layer {
        let b = |n: &str| format!("blk.{i}.{n}.weight");
        filled(&mut w, &b("attn_norm"), e, 1.0);
        // a larger Q/K scale, as the LLaVA tiny model's: sharper attention for the pruning tests
        wt.any(&mut w, seed, &b("attn_q"), &[e.into(), (z.n_head * hd).into()], 0.5, None);
        wt.any(&mut w, seed, &b("attn_k"), &[e.into(), (z.n_head_kv * hd).into()], 0.5, None);
        wt.mat(&mut w, seed, &b("attn_v"), e, z.n_head_kv * hd, false);
        wt.mat(&mut w, seed, &b("attn_output"), z.n_head * hd, e, false);
        filled(&mut w, &b("ffn_norm"), e, 1.0);
        wt.mat(&mut w, seed, &b("ffn_gate"), e, z.n_ff, false);
        wt.mat(&mut w, seed, &b("ffn_up"), e, z.n_ff, false);
        wt.mat(&mut w, seed, &b("ffn_down"), z.n_ff, e, false);
    }
    w
}

/// The tiny SmolVLM (Idefics3) mmproj: SigLIP on 32 px tiles, pixel shuffle 2, one linear map.
#[must_use]
pub fn smolvlm_mmproj(seed: u64) -> GgufWriter {
    let z = Sizes { image: 32, patch: 8, ..Sizes::TINY };
    let (dv, scale) = (z.v_embd, 2u32);
    let wt = Weights::Tiny;
    let mut w = GgufWriter::new();
    clip_common(&mut w, "idefics3", &z, wt, seed);
    w.bool("clip.use_gelu", true)
        .u32("clip.vision.projector.scale_factor", scale)
        .u32("clip.vision.preproc_image_size", 2 * z.image)
        .kv("clip.vision.image_mean", Value::Array([0.5f32; 3].map(Value::F32).to_vec()))
        .kv("clip.vision.image_std", Value::Array([0.5f32; 3].map(Value::F32).to_vec()));
    siglip_tower(&mut w, &z, wt, seed);
    wt.mat(&mut w, seed, "mm.model.fc.weight", scale * scale * dv, z.n_embd, true);
    w
}
