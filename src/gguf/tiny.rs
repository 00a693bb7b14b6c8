//! The deterministic tiny vision-language model used by tests, the demo and `gen-tiny-model`.
//!
//! * Text: llama architecture, 2 layers, hidden 64, 4 query heads sharing 2 KV heads (grouped
//!   query attention, head dim 16), FFN 128, trained context 4096. A real SentencePiece-style
//!   vocabulary (`tokenizer.ggml.model = "llama"`) with the 256 byte tokens, printable ASCII,
//!   a few word pieces and ChatML control tokens; ChatML chat template; EOS `<|im_end|>`.
//! * Vision: CLIP ViT with LLaVA-1.5's `mlp` projector, image 64 px, patch 8 → 64 tokens per
//!   image, width 32, 2 layers, no class embedding (see upstream llama.cpp issue 25814); the
//!   projector's output width equals the text model's hidden size.
//!
//! Weights are drawn from a SplitMix64 stream seeded by (seed, tensor name), scaled like
//! Xavier initialisation so that attention is far from uniform. Same seed, same bytes.

use std::io;
use std::path::Path;

use super::{GgufWriter, TensorType, Value};
use crate::rng::Rng;

/// Shapes of the tiny text model.
pub mod text {
    /// Hidden size.
    pub const N_EMBD: u32 = 64;
    /// Query heads.
    pub const N_HEAD: u32 = 4;
    /// KV heads (grouped-query attention).
    pub const N_HEAD_KV: u32 = 2;
    /// FFN width.
    pub const N_FF: u32 = 128;
    /// Transformer blocks.
    pub const N_LAYER: u32 = 2;
    /// Trained context.
    pub const N_CTX_TRAIN: u32 = 4096;
}

/// Shapes of the tiny mmproj.
pub mod vision {
    /// Image side in pixels.
    pub const IMAGE: u32 = 64;
    /// Patch side in pixels.
    pub const PATCH: u32 = 8;
    /// ViT width.
    pub const N_EMBD: u32 = 32;
    /// ViT heads.
    pub const N_HEAD: u32 = 4;
    /// ViT FFN width (≠ width: llama.cpp swaps up/down when they are equal-looking).
    pub const N_FF: u32 = 64;
    /// ViT blocks.
    pub const N_LAYER: u32 = 2;
    /// Image tokens per image: (64 / 8)².
    pub const TOKENS_PER_IMAGE: u32 = (IMAGE / PATCH) * (IMAGE / PATCH);
}

/// File names written by [`write_all`].
pub const TEXT_FILE: &str = "tiny-text.gguf";
/// mmproj file name.
pub const MMPROJ_FILE: &str = "tiny-mmproj.gguf";
/// Number of sample images written by [`write_all`].
pub const N_SAMPLE_IMAGES: usize = 4;

/// Name of sample image `i`.
#[must_use]
pub fn image_file(i: usize) -> String {
    format!("img-{i}.png")
}

/// `n` values with standard deviation `std` (uniform distribution).
pub(crate) fn random(seed: u64, name: &str, n: usize, std: f32) -> Vec<f32> {
    let mut rng = Rng::new(seed, name);
    let a = std * 3f32.sqrt();
    (0..n).map(|_| rng.symmetric(a)).collect()
}

/// Adds a weight matrix `[n_in, n_out]` (ggml order) with Xavier-like scale.
fn matrix(w: &mut GgufWriter, seed: u64, name: &str, n_in: u32, n_out: u32, ty: TensorType) {
    let n = n_in as usize * n_out as usize;
    let data = random(seed, name, n, 1.0 / (n_in as f32).sqrt());
    w.tensor(name, &[n_in.into(), n_out.into()], ty, &data);
}

pub(crate) fn filled(w: &mut GgufWriter, name: &str, n: u32, v: f32) {
    w.tensor(name, &[n.into()], TensorType::F32, &vec![v; n as usize]);
}

pub(crate) fn small(w: &mut GgufWriter, seed: u64, name: &str, n: u32, std: f32) {
    let data = random(seed, name, n as usize, std);
    w.tensor(name, &[n.into()], TensorType::F32, &data);
}

/// The tokenizer metadata of a SentencePiece-style vocabulary `v` (as `llama` tokenizers read it).
pub(crate) fn tokenizer(w: &mut GgufWriter, v: &[(String, f32, i32)], eos: u32, template: &str) {
    w.string("tokenizer.ggml.model", "llama")
        .string("tokenizer.ggml.pre", "default")
        .kv("tokenizer.ggml.tokens", Value::Array(v.iter().map(|(p, _, _)| Value::String(p.clone())).collect()))
        .kv("tokenizer.ggml.scores", Value::Array(v.iter().map(|(_, s, _)| Value::F32(*s)).collect()))
        .kv("tokenizer.ggml.token_type", Value::Array(v.iter().map(|(_, _, t)| Value::I32(*t)).collect()))
        .u32("tokenizer.ggml.bos_token_id", 1)
        .u32("tokenizer.ggml.eos_token_id", eos)
        .u32("tokenizer.ggml.unknown_token_id", 0)
        .bool("tokenizer.ggml.add_bos_token", true)
        .bool("tokenizer.ggml.add_eos_token", false)
        .string("tokenizer.chat_template", template);
}

/// ChatML, which llama.cpp's template detector recognises.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const WORDS: &[&str] = &[
    "the", "a", "an", "image", "images", "picture", "cat", "dog", "is", "of", "in", "on", "and",
    "what", "describe", "compare", "two", "three", "shape", "colour", "color", "red", "green",
    "blue", "circle", "square", "triangle", "left", "right", "this", "that", "with", "there",
    "it", "are", "first", "second", "third", "fourth", "yes", "no",
];

/// The vocabulary: (piece, score, token type). Token types: 1 normal, 2 unknown, 3 control, 6 byte.
pub(crate) fn vocabulary() -> Vec<(String, f32, i32)> {
    let mut v = vec![("<unk>".to_owned(), 0.0, 2), ("<s>".to_owned(), 0.0, 3), ("</s>".to_owned(), 0.0, 3)];
    for b in 0..=255u8 {
        v.push((format!("<0x{b:02X}>"), 0.0, 6));
    }
    v.push(("<|im_start|>".to_owned(), 0.0, 3));
    v.push(("<|im_end|>".to_owned(), 0.0, 3));
    v.push(("\u{2581}".to_owned(), -1.0, 1));
    for (i, word) in WORDS.iter().enumerate() {
        v.push((format!("\u{2581}{word}"), -2.0 - i as f32 * 0.01, 1));
    }
    for c in (0x21u8..0x7f).map(char::from) {
        v.push((c.to_string(), -100.0, 1));
    }
    v
}

/// Index of `<|im_end|>` (EOS) in [`vocabulary`].
pub(crate) const EOS_ID: u32 = 3 + 256 + 1;

/// Builds the tiny text model.
#[must_use]
pub fn text_model(seed: u64) -> GgufWriter {
    use text::*;
    let vocab = vocabulary();
    let n_vocab = vocab.len() as u32;
    let head_dim = N_EMBD / N_HEAD;
    let f32t = TensorType::F32;

    let mut w = GgufWriter::new();
    w.string("general.architecture", "llama")
        .string("general.name", &format!("csp-llava tiny text (seed {seed})"))
        .u32("general.file_type", 0)
        .u32("llama.context_length", N_CTX_TRAIN)
        .u32("llama.embedding_length", N_EMBD)
        .u32("llama.block_count", N_LAYER)
        .u32("llama.feed_forward_length", N_FF)
        .u32("llama.attention.head_count", N_HEAD)
        .u32("llama.attention.head_count_kv", N_HEAD_KV)
        .f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .u32("llama.rope.dimension_count", head_dim)
        .f32("llama.rope.freq_base", 10000.0)
        .u32("llama.vocab_size", n_vocab);
    tokenizer(&mut w, &vocab, EOS_ID, CHATML_TEMPLATE);

    let emb = random(seed, "token_embd.weight", (n_vocab * N_EMBD) as usize, 1.0);
    w.tensor("token_embd.weight", &[N_EMBD.into(), n_vocab.into()], f32t, &emb);
    filled(&mut w, "output_norm.weight", N_EMBD, 1.0);
    matrix(&mut w, seed, "output.weight", N_EMBD, n_vocab, f32t);
    for i in 0..N_LAYER {
        let b = |n: &str| format!("blk.{i}.{n}.weight");
        filled(&mut w, &b("attn_norm"), N_EMBD, 1.0);
        // Larger Q/K scale: sharper, more informative attention for the pruning tests.
        let q = random(seed, &b("attn_q"), (N_EMBD * N_HEAD * head_dim) as usize, 0.5);
        w.tensor(&b("attn_q"), &[N_EMBD.into(), (N_HEAD * head_dim).into()], f32t, &q);
        let k = random(seed, &b("attn_k"), (N_EMBD * N_HEAD_KV * head_dim) as usize, 0.5);
        w.tensor(&b("attn_k"), &[N_EMBD.into(), (N_HEAD_KV * head_dim).into()], f32t, &k);
        matrix(&mut w, seed, &b("attn_v"), N_EMBD, N_HEAD_KV * head_dim, f32t);
        matrix(&mut w, seed, &b("attn_output"), N_HEAD * head_dim, N_EMBD, f32t);
        filled(&mut w, &b("ffn_norm"), N_EMBD, 1.0);
        matrix(&mut w, seed, &b("ffn_gate"), N_EMBD, N_FF, f32t);
        matrix(&mut w, seed, &b("ffn_up"), N_EMBD, N_FF, f32t);
        matrix(&mut w, seed, &b("ffn_down"), N_FF, N_EMBD, f32t);
    }
    w
}

/// Builds the tiny mmproj (CLIP + `mlp` projector into the text model's hidden size).
#[must_use]
pub fn mmproj(seed: u64) -> GgufWriter {
    mmproj_with_width(seed, text::N_EMBD)
}

/// The tiny mmproj with projector output width `d` (≠ the text model's to test the mismatch
/// error).
#[must_use]
pub fn mmproj_with_width(seed: u64, d: u32) -> GgufWriter {
    mmproj_with(seed, d, false)
}

/// The tiny mmproj, optionally with a CLIP class embedding (`v.class_embd`, one more position):
/// real LLaVA-1.5/1.6 projectors have one, which the CLS-order patch must handle.
#[must_use]
pub fn mmproj_with(seed: u64, d: u32, class_embedding: bool) -> GgufWriter {
    use vision::*;
    let e = N_EMBD;
    let n_pos = TOKENS_PER_IMAGE + u32::from(class_embedding);
    let f32t = TensorType::F32;
    let mut w = GgufWriter::new();
    w.string("general.architecture", "clip")
        .string("general.name", &format!("csp-llava tiny mmproj (seed {seed})"))
        .u32("general.file_type", 1)
        .bool("clip.has_vision_encoder", true)
        .bool("clip.has_text_encoder", false)
        .bool("clip.has_llava_projector", true)
        .string("clip.projector_type", "mlp")
        .u32("clip.vision.image_size", IMAGE)
        .u32("clip.vision.patch_size", PATCH)
        .u32("clip.vision.embedding_length", e)
        .u32("clip.vision.feed_forward_length", N_FF)
        .u32("clip.vision.block_count", N_LAYER)
        .u32("clip.vision.attention.head_count", N_HEAD)
        .f32("clip.vision.attention.layer_norm_epsilon", 1e-5)
        .u32("clip.vision.projection_dim", d)
        .kv(
            "clip.vision.image_mean",
            Value::Array([0.481_454_66, 0.457_827_5, 0.408_210_73].map(Value::F32).to_vec()),
        )
        .kv(
            "clip.vision.image_std",
            Value::Array([0.268_629_54, 0.261_302_58, 0.275_777_1].map(Value::F32).to_vec()),
        )
        .bool("clip.use_gelu", false);

    let k = 3 * PATCH * PATCH;
    let conv = random(seed, "v.patch_embd.weight", (k * e) as usize, 1.0 / (k as f32).sqrt());
    w.tensor(
        "v.patch_embd.weight",
        &[PATCH.into(), PATCH.into(), 3, e.into()],
        TensorType::F16,
        &conv,
    );
    if class_embedding {
        small(&mut w, seed, "v.class_embd", e, 1.0);
    }
    let pos = random(seed, "v.position_embd.weight", (n_pos * e) as usize, 0.5);
    w.tensor("v.position_embd.weight", &[e.into(), n_pos.into()], f32t, &pos);
    filled(&mut w, "v.pre_ln.weight", e, 1.0);
    filled(&mut w, "v.pre_ln.bias", e, 0.0);
    for i in 0..N_LAYER {
        let p = |n: &str| format!("v.blk.{i}.{n}");
        for n in ["attn_q", "attn_k", "attn_v", "attn_out"] {
            matrix(&mut w, seed, &p(&format!("{n}.weight")), e, e, f32t);
            small(&mut w, seed, &p(&format!("{n}.bias")), e, 0.02);
        }
        for n in ["ln1", "ln2"] {
            filled(&mut w, &p(&format!("{n}.weight")), e, 1.0);
            filled(&mut w, &p(&format!("{n}.bias")), e, 0.0);
        }
        matrix(&mut w, seed, &p("ffn_up.weight"), e, N_FF, f32t);
        small(&mut w, seed, &p("ffn_up.bias"), N_FF, 0.02);
        matrix(&mut w, seed, &p("ffn_down.weight"), N_FF, e, f32t);
        small(&mut w, seed, &p("ffn_down.bias"), e, 0.02);
    }
    let h = d;
    matrix(&mut w, seed, "mm.0.weight", e, h, f32t);
    small(&mut w, seed, "mm.0.bias", h, 0.02);
    // Output scaled up so image embeddings have roughly the token embeddings' magnitude.
    let mm2 = random(seed, "mm.2.weight", (h * d) as usize, 2.0 / (h as f32).sqrt());
    w.tensor("mm.2.weight", &[h.into(), d.into()], f32t, &mm2);
    small(&mut w, seed, "mm.2.bias", d, 0.02);
    w
}

/// RGB pixels (row-major, 3 bytes per pixel) of sample image `index`: a coloured shape
/// (circle, square, triangle or stripes) on a tinted background with a little noise.
#[must_use]
pub fn sample_image_rgb(seed: u64, index: usize, side: u32) -> Vec<u8> {
    let mut rng = Rng::new(seed, &format!("image-{index}"));
    let palette: [[u8; 3]; 6] = [
        [220, 40, 40],
        [40, 180, 60],
        [40, 80, 220],
        [230, 200, 40],
        [160, 60, 200],
        [30, 190, 200],
    ];
    let fg = palette[(rng.next_u64() % 6) as usize];
    let bg = [
        200 + (rng.next_u64() % 56) as u8,
        200 + (rng.next_u64() % 56) as u8,
        200 + (rng.next_u64() % 56) as u8,
    ];
    let s = side as f32;
    let cx = s * (0.35 + 0.3 * rng.uniform());
    let cy = s * (0.35 + 0.3 * rng.uniform());
    let r = s * (0.18 + 0.12 * rng.uniform());
    let shape = index % 4;
    let mut px = Vec::with_capacity((side * side * 3) as usize);
    for y in 0..side {
        for x in 0..side {
            let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
            let (dx, dy) = (fx - cx, fy - cy);
            let inside = match shape {
                0 => dx * dx + dy * dy <= r * r,
                1 => dx.abs() <= r && dy.abs() <= r,
                2 => dy <= r && dy >= -r && dx.abs() <= (dy + r) * 0.5,
                _ => ((fx / (s / 8.0)) as u32) % 2 == 0,
            };
            let c = if inside { fg } else { bg };
            for ch in c {
                let noise = (rng.next_u64() % 9) as i16 - 4;
                px.push((i16::from(ch) + noise).clamp(0, 255) as u8);
            }
        }
    }
    px
}

/// Encodes RGB pixels as a PNG file.
///
/// # Errors
/// I/O and encoder errors.
pub fn write_png(path: &Path, side: u32, rgb: &[u8]) -> io::Result<()> {
    let file = io::BufWriter::new(std::fs::File::create(path)?);
    let mut enc = png::Encoder::new(file, side, side);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Default);
    enc.set_filter(png::FilterType::NoFilter);
    let mut w = enc.write_header().map_err(io::Error::other)?;
    w.write_image_data(rgb).map_err(io::Error::other)?;
    w.finish().map_err(io::Error::other)
}

/// Writes `tiny-text.gguf`, `tiny-mmproj.gguf` and `img-0.png … img-3.png` into `dir`
/// (created if needed; existing files are overwritten).
///
/// # Errors
/// I/O errors.
pub fn write_all(dir: &Path, seed: u64) -> io::Result<()> {
    write_model(dir, &text_model(seed), &mmproj(seed), seed)
}

/// Writes `text` and `mmproj` as [`TEXT_FILE`] and [`MMPROJ_FILE`] into `dir` with the sample
/// images (any family's tiny model).
///
/// # Errors
/// I/O errors.
pub fn write_model(dir: &Path, text: &GgufWriter, mmproj: &GgufWriter, seed: u64) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    text.write_file(&dir.join(TEXT_FILE))?;
    mmproj.write_file(&dir.join(MMPROJ_FILE))?;
    for i in 0..N_SAMPLE_IMAGES {
        let side = vision::IMAGE;
        write_png(&dir.join(image_file(i)), side, &sample_image_rgb(seed, i, side))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufHeader;

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        write_all(a.path(), 7).unwrap();
        write_all(b.path(), 7).unwrap();
        for f in [TEXT_FILE, MMPROJ_FILE, "img-0.png", "img-3.png"] {
            assert_eq!(
                std::fs::read(a.path().join(f)).unwrap(),
                std::fs::read(b.path().join(f)).unwrap(),
                "{f}"
            );
        }
        write_all(b.path(), 8).unwrap();
        assert_ne!(
            std::fs::read(a.path().join(TEXT_FILE)).unwrap(),
            std::fs::read(b.path().join(TEXT_FILE)).unwrap()
        );
    }

    #[test]
    fn shapes_match_the_recipe() {
        let d = tempfile::tempdir().unwrap();
        write_all(d.path(), 0).unwrap();
        let t = GgufHeader::read(&d.path().join(TEXT_FILE)).unwrap();
        let m = GgufHeader::read(&d.path().join(MMPROJ_FILE)).unwrap();
        assert_eq!(t.architecture(), Some("llama"));
        assert_eq!(t.get_u64("llama.context_length"), Some(4096));
        assert_eq!(m.get_str("clip.projector_type"), Some("mlp"));
        assert!(m.tensor("v.class_embd").is_none());
        // projector output width == text hidden size
        assert_eq!(m.tensor("mm.2.weight").unwrap().ne[1], u64::from(text::N_EMBD));
        let vocab = vocabulary();
        assert_eq!(vocab[EOS_ID as usize].0, "<|im_end|>");
        assert!(vocab.iter().filter(|v| v.2 == 6).count() == 256);
    }
}
