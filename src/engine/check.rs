//! Checks on the input files before llama.cpp sees them, so that a wrong file gives a precise
//! one-line error instead of a generic load failure — or an abort deep inside llama.cpp.
//!
//! llama.cpp trusts a GGUF file's metadata. Where the metadata contradicts the tensors it often
//! throws (which llama-cpp-2 turns into a load error), but in many places it fails a
//! `GGML_ASSERT` instead — the process aborts with exit code 134 — or dereferences a tensor it
//! assumed present. So each file is opened only if it is a regular file (a FIFO would block, a
//! device never end), its header is read within the bounds of its size, and then checked:
//!
//! * every text architecture: what `llama_model_base::load_hparams`, the vocabulary loader and
//!   the attention graph assert on ([`text_generic`]);
//! * the `llama` architecture: every tensor shape against the hyperparameters ([`llama_shapes`]);
//! * every `clip` projector: the vision tower's heads and layers ([`clip_generic`]);
//! * the LLaVA projectors (`mlp`, `mlp_norm`, the tiny model's): every shape of the projector
//!   graph in `tools/mtmd/models/llava.cpp` ([`llava_shapes`]).
//!
//! Other families get the generic checks only. The `file:line` references are to the bundled
//! llama.cpp (`vendor/llama-cpp-sys-2/llama.cpp`).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gguf::{GgufHeader, TensorInfo, Value};

/// Opens a model or projector (a regular file only) and reads its GGUF header, mapping failures
/// to `NotFound`, `NotRegularFile`, `Io` or `BadGguf`.
pub(super) fn gguf(path: &Path, what: &'static str) -> Result<GgufHeader> {
    let (file, size) = crate::input::open_regular(path, what)?;
    GgufHeader::read_from(file, size).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof => {
            Error::BadGguf { what, path: path.to_owned(), reason: e.to_string() }
        }
        _ => Error::Io { what, path: path.to_owned(), cause: e },
    })
}

/// Architectures whose cache is not a plain KV cache (state-space / recurrent layers).
const RECURRENT: &[&str] = &["mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7", "jamba", "falcon-h1", "granitehybrid", "lfm2", "nemotron_h", "plamo2", "qwen3next"];

/// The text model must be a language model, not a projector or an encoder, and one llama.cpp
/// can load without aborting.
pub(super) fn text_model(path: &Path, h: &GgufHeader) -> Result<()> {
    let arch = h.architecture().ok_or_else(|| Error::BadGguf {
        what: "model",
        path: path.to_owned(),
        reason: "general.architecture is missing".into(),
    })?;
    if arch == "clip" {
        return Err(Error::Unsupported {
            what: "model",
            reason: format!("{} is a projector (mmproj); pass it with --mmproj and the text model with -m", path.display()),
        });
    }
    if RECURRENT.contains(&arch) {
        return Err(Error::Unsupported {
            what: "model family",
            reason: format!("{arch} is a recurrent/hybrid architecture; csp-llava prunes a transformer KV cache"),
        });
    }
    let refuse = |reason| Error::BadModel { what: "model", path: path.to_owned(), reason };
    text_generic(h, arch).map_err(refuse)?;
    if arch == "llama" {
        llama_shapes(h).map_err(refuse)?;
    }
    Ok(())
}

/// The projector must be a `clip` file that llama.cpp can run without aborting, and whose output
/// width matches the model's hidden size (checked from the tensors for the LLaVA projector types;
/// llama.cpp checks the others).
pub(super) fn projector(cfg: &ModelConfig, model: &GgufHeader, mmproj: &GgufHeader) -> Result<()> {
    let arch = mmproj.architecture().unwrap_or("");
    if arch != "clip" {
        return Err(Error::Unsupported {
            what: "mmproj",
            reason: format!(
                "{} has architecture '{arch}', not a multimodal projector (expected 'clip')",
                cfg.mmproj.display()
            ),
        });
    }
    let refuse = |reason| Error::BadModel { what: "mmproj", path: cfg.mmproj.clone(), reason };
    clip_generic(mmproj).map_err(refuse)?;
    let proj_type = mmproj.get_str("clip.projector_type").or_else(|| mmproj.get_str("clip.vision.projector_type"));
    let proj_width = match proj_type {
        Some(p @ ("mlp" | "mlp_norm")) => Some(llava_shapes(mmproj, p).map_err(refuse)?),
        _ => None,
    };
    let model_arch = model.architecture().unwrap_or("");
    let model_width = model.get_u64(&format!("{model_arch}.embedding_length"));
    if let (Some(proj_width), Some(model_width)) = (proj_width, model_width) {
        if proj_width != model_width {
            return Err(Error::ProjectorMismatch {
                mmproj: cfg.mmproj.clone(),
                model: cfg.model.clone(),
                proj_width,
                model_width,
            });
        }
    }
    Ok(())
}

/// A check's refusal: one line naming the key or tensor and the contradiction.
type Check<T = ()> = std::result::Result<T, String>;

/// `LLAMA_MAX_LAYERS` (src/llama-hparams.h:11).
const MAX_LAYERS: u64 = 512;
/// `LLAMA_MAX_EXPERTS` (src/llama-hparams.h:12).
const MAX_EXPERTS: u64 = 1024;
/// The RoPE scaling types llama.cpp knows (`LLAMA_ROPE_SCALING_TYPES`, src/llama-model.cpp:1036).
const ROPE_SCALING_TYPES: &[&str] = &["none", "linear", "yarn", "longrope"];
/// The largest image side llama.cpp's clip accepts (tools/mtmd/clip.cpp:2049); also bounds
/// `image_grid_pinpoints`, whose images are allocated at that size.
const MAX_IMAGE_SIDE: u64 = 8192;

/// Invariants of every text architecture: what llama.cpp asserts on while loading any model.
fn text_generic(h: &GgufHeader, arch: &str) -> Check {
    let key = |k: &str| format!("{arch}.{k}");
    // llama_model_n_ctx_train returns the u32 as an int32; llama-cpp-2's n_ctx_train() then
    // panics on the negative value ("n_ctx_train fits into an u32", llama-cpp-2/src/model.rs:146).
    if let Some(n) = h.get_u64(&key("context_length")) {
        if n > i32::MAX as u64 {
            return Err(format!("{} is {n}, more than the {} positions llama.cpp can address", key("context_length"), i32::MAX));
        }
    }
    // GGML_ASSERT(n_layer_all > 0 && n_layer_all <= LLAMA_MAX_LAYERS) (src/llama-model.cpp:1330).
    let Some(n_layer) = h.get_u64(&key("block_count")) else {
        return Ok(()); // llama.cpp refuses a missing block count itself
    };
    if n_layer == 0 || n_layer > MAX_LAYERS {
        return Err(format!(
            "{} is {n_layer}; llama.cpp takes between 1 and {MAX_LAYERS} layers{}",
            key("block_count"),
            describe_layers(&layer_indices(h, "blk."), "blk.")
        ));
    }
    // GGML_ASSERT(n_layer_nextn <= n_layer_all) (src/llama-model.cpp:1332).
    if let Some(n) = h.get_u64(&key("nextn_predict_layers")) {
        if n > n_layer {
            return Err(format!("{} is {n}, more than {} {n_layer}", key("nextn_predict_layers"), key("block_count")));
        }
    }
    experts(h, arch, n_layer)?;
    for k in ["attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon"] {
        epsilon(h, &key(k))?;
    }
    // The attention's K·Q product broadcasts KV heads over query heads: ggml_can_mul_mat needs
    // query heads to be a multiple of KV heads (ggml/src/ggml.c:3354), in every architecture.
    let (hk, kvk) = (key("attention.head_count"), key("attention.head_count_kv"));
    if let Some(heads) = per_layer(h, &hk, n_layer) {
        let kv = per_layer(h, &kvk, n_layer).unwrap_or_else(|| heads.clone());
        for (il, (&q, &k)) in heads.iter().zip(&kv).enumerate() {
            if q > 0 && k > 0 && q % k != 0 {
                let layer = if h.kv.get(&kvk).is_some_and(|v| matches!(v, Value::Array(_))) { format!(" (layer {il})") } else { String::new() };
                return Err(format!("{kvk} is {k} but {hk} is {q}{layer}: query heads must be a multiple of KV heads"));
            }
        }
    }
    // GGML_ASSERT(rope_scaling_type_train != LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED)
    // (src/llama-model.cpp:1422).
    let rk = key("rope.scaling.type");
    if let Some(t) = h.get_str(&rk) {
        if !ROPE_SCALING_TYPES.contains(&t) {
            return Err(format!("{rk} is '{t}'; llama.cpp knows {}", ROPE_SCALING_TYPES.join(", ")));
        }
    }
    vocabulary(h)
}

/// A normalisation epsilon must be a number ≥ 0: ggml's norm and RMS norm assert
/// `eps >= 0.0f` while computing (ggml/src/ggml-cpu/ops.cpp:4026, 4132).
fn epsilon(h: &GgufHeader, key: &str) -> Check {
    match h.kv.get(key).and_then(Value::as_f64) {
        Some(e) if e.is_nan() || e < 0.0 => Err(format!("{key} is {e}; a normalisation epsilon must be 0 or more")),
        _ => Ok(()),
    }
}

/// The expert counts llama.cpp asserts on (src/llama-model.cpp:1364-1375).
fn experts(h: &GgufHeader, arch: &str, n_layer: u64) -> Check {
    if arch.starts_with("hunyuan") {
        return Ok(()); // llama.cpp resets their expert counts before asserting
    }
    let key = |k: &str| format!("{arch}.{k}");
    let n_expert = h.get_u64(&key("expert_count")).unwrap_or(0);
    let used = per_layer(h, &key("expert_used_count"), n_layer).map_or(0, |v| v.into_iter().max().unwrap_or(0));
    let groups = h.get_u64(&key("expert_group_count")).unwrap_or(0);
    let group_used = h.get_u64(&key("expert_group_used_count")).unwrap_or(0);
    let (ek, uk, gk, guk) = (key("expert_count"), key("expert_used_count"), key("expert_group_count"), key("expert_group_used_count"));
    if n_expert > MAX_EXPERTS {
        return Err(format!("{ek} is {n_expert}; llama.cpp takes at most {MAX_EXPERTS} experts"));
    }
    if used > n_expert {
        return Err(format!("{uk} is {used}, more than {ek} {n_expert}"));
    }
    if n_expert > 0 {
        if used == 0 {
            return Err(format!("{uk} is 0 although {ek} is {n_expert}"));
        }
        if groups >= n_expert {
            return Err(format!("{gk} {groups} is not below {ek} {n_expert}"));
        }
        if groups > 1 && (n_expert % groups != 0 || group_used == 0 || group_used >= groups) {
            return Err(format!("{gk} {groups} does not fit {ek} {n_expert} and {guk} {group_used}"));
        }
    } else if groups != 0 {
        return Err(format!("{gk} is {groups} but the model has no experts"));
    }
    Ok(())
}

/// The token list must name each token once: llama.cpp maps text to ids and asserts that both
/// directions have the same size (GGML_ASSERT in src/llama-vocab.cpp:2578). Without a token
/// list (`no_vocab`) llama.cpp makes `vocab_size` dummy tokens, which must not exceed the
/// embedding's rows.
fn vocabulary(h: &GgufHeader) -> Check {
    let model = h.get_str("tokenizer.ggml.model").unwrap_or("");
    if model == "no_vocab" || model == "none" {
        let rows = h.tensor("token_embd.weight").and_then(|t| t.ne.get(1).copied()).unwrap_or(1 << 24);
        let key = format!("{}.vocab_size", h.architecture().unwrap_or(""));
        if let Some(n) = h.get_u64(&key).filter(|&n| n > rows) {
            return Err(format!("{key} is {n}, more than the {rows} token embeddings"));
        }
        return Ok(());
    }
    let Some(Value::Array(tokens)) = h.kv.get("tokenizer.ggml.tokens") else {
        return Ok(()); // llama.cpp refuses a missing list itself
    };
    let mut seen: HashMap<std::borrow::Cow<'_, str>, usize> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        let Some(s) = t.as_str() else {
            return Ok(()); // not a string list: llama.cpp refuses its type itself
        };
        // llama.cpp renames empty tokens so (src/llama-vocab.cpp:2548)
        let text = if s.is_empty() { std::borrow::Cow::Owned(format!("[EMPTY_{i}]")) } else { std::borrow::Cow::Borrowed(s) };
        if let Some(first) = seen.insert(text, i) {
            return Err(format!("tokenizer.ggml.tokens has entry {i} equal to entry {first} ({s:?}); llama.cpp needs every token once"));
        }
    }
    special_tokens(h, model, tokens.len() as u64)
}

/// A tokenizer that adds BOS (or EOS) to every prompt must have one: llama.cpp disables special
/// ids outside the vocabulary and then asserts `special_bos_id != LLAMA_TOKEN_NULL` while
/// tokenizing (src/llama-vocab.cpp:3477, 3514). Checked for the SentencePiece (`llama`) and
/// BPE (`gpt2`) tokenizers, with their defaults (src/llama-vocab.cpp:2005, 2062, 2468).
fn special_tokens(h: &GgufHeader, model: &str, n_tokens: u64) -> Check {
    let (default_bos, default_eos, default_add_bos) = match model {
        "llama" => (1, 2, true),
        "gpt2" => (11, 11, false),
        _ => return Ok(()),
    };
    for (what, id_key, add_key, default_id, default_add) in [
        ("BOS", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.add_bos_token", default_bos, default_add_bos),
        ("EOS", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_eos_token", default_eos, false),
    ] {
        let adds = h.get_bool(add_key).unwrap_or(default_add);
        let id = h.get_u64(id_key).filter(|&id| id < n_tokens).or(Some(default_id).filter(|&id| id < n_tokens));
        if adds && id.is_none() {
            let given = h.get_u64(id_key).map_or_else(|| "none is given".to_owned(), |id| format!("{id_key} is {id}"));
            return Err(format!("the tokenizer adds a {what} token to every prompt but {given} and the vocabulary has {n_tokens} tokens"));
        }
    }
    Ok(())
}

/// The `llama` architecture's tensors against its hyperparameters: what `create_tensor` would
/// refuse (src/models/llama.cpp:33-88, a load error) and what the graph asserts on.
fn llama_shapes(h: &GgufHeader) -> Check {
    let (Some(n_embd), Some(n_layer)) = (h.get_u64("llama.embedding_length"), h.get_u64("llama.block_count")) else {
        return Ok(()); // llama.cpp refuses missing keys itself
    };
    // Per-layer arrays of heads or FFN widths: only the generic checks.
    let scalar = |k: &str| match h.kv.get(k) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or(()),
    };
    let (Ok(n_head), Ok(n_head_kv), Ok(n_ff)) =
        (scalar("llama.attention.head_count"), scalar("llama.attention.head_count_kv"), scalar("llama.feed_forward_length"))
    else {
        return Ok(());
    };
    let Some(n_head) = n_head else {
        return Err("llama.attention.head_count is missing; a llama model needs attention heads".into());
    };
    if n_embd == 0 {
        return Err("llama.embedding_length is 0".into());
    }
    if n_head == 0 {
        return Err("llama.attention.head_count is 0; a llama model needs attention heads".into());
    }
    let n_head_kv = n_head_kv.unwrap_or(n_head);
    if n_head_kv == 0 {
        return Err("llama.attention.head_count_kv is 0; a llama model needs KV heads".into());
    }
    let key_length = h.get_u64("llama.attention.key_length");
    if key_length.is_none() && n_embd % n_head != 0 {
        return Err(format!("llama.attention.head_count {n_head} does not divide llama.embedding_length {n_embd}"));
    }
    let head_k = key_length.unwrap_or(n_embd / n_head);
    let head_v = h.get_u64("llama.attention.value_length").unwrap_or(n_embd / n_head);
    // GGML_ASSERT(n_embd_head == hparams.n_embd_head_k()) and (n_embd_head == n_rot) in the
    // llama graph (src/models/llama.cpp:102-103); n_rot != head size throws at load
    // (src/llama-model.cpp:1454); RoPE needs an even number of dimensions
    // (GGML_ASSERT(n_dims % 2 == 0), ggml/src/ggml-cpu/ops.cpp:6355).
    if head_k == 0 || head_k % 2 != 0 {
        return Err(format!("the attention head size is {head_k} (llama.attention.key_length or llama.embedding_length / llama.attention.head_count); RoPE needs an even, non-zero one"));
    }
    if head_v != head_k {
        return Err(format!("llama.attention.value_length {head_v} differs from the key head size {head_k}; the llama graph needs them equal"));
    }
    let n_rot = h.get_u64("llama.rope.dimension_count").unwrap_or(head_k);
    if n_rot != head_k {
        return Err(format!("llama.rope.dimension_count {n_rot} is not the attention head size {head_k}"));
    }

    // One layer per block: llama.cpp loads blk.0 … blk.{n-1} and refuses files with more.
    let layers = layer_indices(h, "blk.");
    if !layers.is_empty() && layers.len() as u64 != n_layer {
        return Err(format!("llama.block_count is {n_layer}{}", describe_layers(&layers, "blk.").replacen(';', " but", 1)));
    }
    if let Some(gap) = (0..n_layer).find(|i| !layers.contains(i)).filter(|_| !layers.is_empty()) {
        return Err(format!("llama.block_count is {n_layer} but layer blk.{gap} is missing{}", describe_layers(&layers, "blk.")));
    }

    let n_vocab = match h.kv.get("tokenizer.ggml.tokens") {
        Some(Value::Array(t)) => Some(t.len() as u64),
        _ => None,
    };
    let n_expert = h.get_u64("llama.expert_count").unwrap_or(0);
    let (q, kv_k, kv_v) = (head_k.saturating_mul(n_head), head_k.saturating_mul(n_head_kv), head_v.saturating_mul(n_head_kv));
    let qkv = q.saturating_add(kv_k).saturating_add(kv_v);
    let emb = || format!("llama.embedding_length {n_embd}");
    let vocab = || format!("llama.embedding_length {n_embd} and the {} tokens of tokenizer.ggml.tokens", n_vocab.unwrap_or(0));

    match n_vocab {
        Some(nv) => {
            want(h, "token_embd.weight", &[n_embd, nv], &vocab)?;
            optional(h, "output.weight", &[n_embd, nv], &vocab)?;
        }
        None => {
            input_width(h, "token_embd.weight", n_embd, true, &emb)?;
            input_width(h, "output.weight", n_embd, false, &emb)?;
        }
    }
    vector(h, "output_norm.weight", n_embd, true, &emb)?;
    // RoPE frequency factors must be F32 (GGML_ASSERT(c->type == GGML_TYPE_F32), ggml/src/ggml.c:4304).
    for n in ["rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"] {
        vector(h, n, n_rot / 2, false, &|| format!("half the head size {head_k}"))?;
    }
    let qs = || format!("llama.embedding_length {n_embd} and {n_head} heads of {head_k}");
    let ks = || format!("llama.embedding_length {n_embd} and {n_head_kv} KV heads of {head_k}");
    let vs = || format!("llama.embedding_length {n_embd} and {n_head_kv} KV heads of {head_v}");
    for il in 0..n_layer {
        let t = |n: &str| format!("blk.{il}.{n}");
        vector(h, &t("attn_norm.weight"), n_embd, true, &emb)?;
        if h.tensor(&t("attn_qkv.weight")).is_some() {
            let sum = || format!("query, key and value widths {q} + {kv_k} + {kv_v}");
            want(h, &t("attn_qkv.weight"), &[n_embd, qkv], &|| format!("{} and {}", emb(), sum()))?;
            vector(h, &t("attn_qkv.bias"), qkv, false, &sum)?;
        } else {
            want(h, &t("attn_q.weight"), &[n_embd, q], &qs)?;
            want(h, &t("attn_k.weight"), &[n_embd, kv_k], &ks)?;
            want(h, &t("attn_v.weight"), &[n_embd, kv_v], &vs)?;
        }
        vector(h, &t("attn_q.bias"), q, false, &qs)?;
        vector(h, &t("attn_k.bias"), kv_k, false, &ks)?;
        vector(h, &t("attn_v.bias"), kv_v, false, &vs)?;
        want(h, &t("attn_output.weight"), &[q, n_embd], &qs)?;
        vector(h, &t("attn_output.bias"), n_embd, false, &emb)?;
        vector(h, &t("ffn_norm.weight"), n_embd, true, &emb)?;
        if let (0, Some(n_ff)) = (n_expert, n_ff) {
            let ff = || format!("llama.embedding_length {n_embd} and llama.feed_forward_length {n_ff}");
            want(h, &t("ffn_gate.weight"), &[n_embd, n_ff], &ff)?;
            want(h, &t("ffn_up.weight"), &[n_embd, n_ff], &ff)?;
            want(h, &t("ffn_down.weight"), &[n_ff, n_embd], &ff)?;
            vector(h, &t("ffn_gate.bias"), n_ff, false, &ff)?;
            vector(h, &t("ffn_up.bias"), n_ff, false, &ff)?;
            vector(h, &t("ffn_down.bias"), n_embd, false, &emb)?;
        }
    }
    Ok(())
}

/// Projector types whose encoders have no standard ViT layers (`has_standard_layers`,
/// tools/mtmd/clip.cpp:2270).
const NO_STANDARD_LAYERS: &[&str] = &["gemma3nv", "qwen3tts_spkenc", "pockettts_gen"];

/// Every `clip` file: the vision tower's heads divide its width (the attention reshapes to
/// `d_head × n_head`, ggml_reshape_3d asserts on the element count: ggml/src/ggml.c:3758), and
/// every layer `block_count` names exists (clip.cpp resizes its layer list to the count first,
/// then requires each layer's `attn_out`: tools/mtmd/clip.cpp:2277-2283).
fn clip_generic(h: &GgufHeader) -> Check {
    let proj = h.get_str("clip.projector_type");
    let standard = |p: Option<&str>| !p.is_some_and(|p| NO_STANDARD_LAYERS.contains(&p));
    for modality in ["vision", "audio"] {
        epsilon(h, &format!("clip.{modality}.attention.layer_norm_epsilon"))?;
    }
    if h.get_bool("clip.has_vision_encoder") == Some(true) && standard(proj.or_else(|| h.get_str("clip.vision.projector_type"))) {
        let (ek, hk) = ("clip.vision.embedding_length", "clip.vision.attention.head_count");
        if let (Some(n_embd), Some(n_head)) = (h.get_u64(ek), h.get_u64(hk)) {
            if n_head == 0 {
                return Err(format!("{hk} is 0; the vision encoder's attention needs at least one head"));
            }
            if h.get_u64("clip.vision.attention.head_dim").is_none() && n_embd % n_head != 0 {
                return Err(format!("{hk} {n_head} does not divide {ek} {n_embd}: no head size fits"));
            }
        }
        layers_present(h, "vision", "v")?;
    }
    if h.get_bool("clip.has_audio_encoder") == Some(true) && standard(proj.or_else(|| h.get_str("clip.audio.projector_type"))) {
        layers_present(h, "audio", "a")?;
    }
    Ok(())
}

/// Each of `clip.{modality}.block_count` layers has its `attn_out` weight.
fn layers_present(h: &GgufHeader, modality: &str, prefix: &str) -> Check {
    let key = format!("clip.{modality}.block_count");
    let Some(n_layer) = h.get_u64(&key) else { return Ok(()) };
    let blk = format!("{prefix}.blk.");
    for il in 0..n_layer {
        let name = format!("{blk}{il}.attn_out.weight");
        if h.tensor(&name).is_none() {
            return Err(format!("{key} is {n_layer} but tensor {name} is missing{}", describe_layers(&layer_indices(h, &blk), &blk)));
        }
    }
    Ok(())
}

/// The LLaVA projectors (`mlp`, `mlp_norm`): every shape `clip_graph_llava::build`
/// (tools/mtmd/models/llava.cpp) relies on — ggml asserts on each mismatch (ggml_can_mul_mat,
/// ggml_can_repeat, reshape element counts, im2col's `OH > 0`) and clip.cpp dereferences the
/// tensors it takes as present. Returns the projector's output width (`clip_n_mmproj_embd`).
fn llava_shapes(h: &GgufHeader, proj_type: &str) -> Check<u64> {
    let v = |k: &str| format!("clip.vision.{k}");
    let get = |k: &str| h.get_u64(&v(k)).ok_or_else(|| format!("{} is missing", v(k)));
    let (n_embd, n_head, n_layer) = (get("embedding_length")?, get("attention.head_count")?, get("block_count")?);
    let (image, patch) = (get("image_size")?, get("patch_size")?);
    if n_embd == 0 {
        return Err(format!("{} is 0", v("embedding_length")));
    }
    let d_head = h.get_u64(&v("attention.head_dim")).unwrap_or(n_embd / n_head.max(1));
    let emb = || format!("{} {n_embd}", v("embedding_length"));

    // The patch embedding is a convolution with stride patch_size over an image_size square:
    // it must have a patch_size kernel, 3 input and n_embd output channels, and the image must
    // hold whole patches (clip_graph::build_inp, tools/mtmd/clip.cpp:572; im2col asserts
    // OW > 0 and OH > 0, ggml/src/ggml.c:4579; the reshape to n_patches × n_embd asserts on
    // the element count, ggml/src/ggml.c:3758).
    if patch == 0 {
        return Err(format!("{} is 0", v("patch_size")));
    }
    let pe = h.tensor("v.patch_embd.weight").ok_or("tensor v.patch_embd.weight is missing")?;
    let [kw, kh, ic, oc] = ne4(pe);
    if kw != patch || kh != patch {
        return Err(format!("{} is {patch} but v.patch_embd.weight {} has a {kw}×{kh} kernel", v("patch_size"), shape(&pe.ne)));
    }
    if ic != 3 {
        return Err(format!("v.patch_embd.weight {} reads {ic} colour channels; images have 3", shape(&pe.ne)));
    }
    if oc != n_embd {
        return Err(format!("{} is {n_embd} but v.patch_embd.weight {} makes {oc} channels", v("embedding_length"), shape(&pe.ne)));
    }
    if !matches!(pe.ggml_type, 0 | 1) {
        return Err(format!("v.patch_embd.weight is {}; llama.cpp's convolution (im2col) takes F32 or F16", type_name(pe.ggml_type)));
    }
    if image == 0 || image > MAX_IMAGE_SIDE {
        return Err(format!("{} is {image}; a LLaVA projector takes square images of 1 to {MAX_IMAGE_SIDE} pixels", v("image_size")));
    }
    if image % patch != 0 {
        return Err(format!("{} {image} is not a multiple of {} {patch}", v("image_size"), v("patch_size")));
    }
    vector(h, "v.patch_embd.bias", n_embd, false, &emb)?;
    // Positions: one per patch, and one more for the class embedding, which is concatenated to
    // the patches (ggml_concat asserts equal widths and types, ggml/src/ggml.c:2637-2645); an
    // index past the table is a GGML_ASSERT while encoding.
    let grid = image / patch;
    let class = h.tensor("v.class_embd").is_some();
    vector(h, "v.class_embd", n_embd, false, &emb)?;
    let n_pos = grid * grid + u64::from(class);
    let pos = h.tensor("v.position_embd.weight").ok_or("tensor v.position_embd.weight is missing")?;
    let [pw, rows, p2, p3] = ne4(pos);
    if pw != n_embd || p2 != 1 || p3 != 1 {
        return Err(format!("tensor v.position_embd.weight is {} but {} needs [{n_embd}, positions]", shape(&pos.ne), emb()));
    }
    weight_type(pos)?;
    if rows != n_pos {
        return Err(format!(
            "tensor v.position_embd.weight has {rows} positions but {} {image} / {} {patch} make {grid}×{grid} = {} patches{}",
            v("image_size"),
            v("patch_size"),
            grid * grid,
            if class { " + 1 class embedding" } else { "" }
        ));
    }
    for n in ["v.pre_ln.weight", "v.pre_ln.bias", "v.post_ln.weight", "v.post_ln.bias"] {
        vector(h, n, n_embd, false, &emb)?;
    }
    if let Some(pins) = h.get_int_array(&v("image_grid_pinpoints")) {
        if pins.len() % 2 != 0 || pins.iter().any(|&p| p <= 0 || p as u64 > MAX_IMAGE_SIDE) {
            return Err(format!("{} {pins:?} is not a list of width, height pairs of 1 to {MAX_IMAGE_SIDE} pixels", v("image_grid_pinpoints")));
        }
    }

    // Layers: the graph runs layers 0 … used-1 — all but the last, or up to the deepest
    // `feature_layer` — and stacks the feature layers' inputs into the projector's input.
    let layers = layer_indices(h, "v.blk.");
    if n_layer == 0 {
        return Err(format!("{} is 0{}", v("block_count"), describe_layers(&layers, "v.blk.")));
    }
    let features: BTreeSet<i64> = h.get_int_array(&v("feature_layer")).unwrap_or_default().into_iter().filter(|&l| l >= 0).collect();
    if let Some(&deepest) = features.last() {
        if deepest as u64 > n_layer {
            return Err(format!("{} names layer {deepest} but {} is {n_layer}", v("feature_layer"), v("block_count")));
        }
    }
    let used = features.last().map_or(n_layer - 1, |&l| l as u64);
    let width_in = n_embd.saturating_mul((features.len() as u64).max(1));
    let heads = n_head.saturating_mul(d_head);
    let att = || format!("{} and {n_head} heads of {d_head}", emb());
    for il in 0..used {
        let t = |n: &str| format!("v.blk.{il}.{n}");
        for n in ["ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "attn_out.bias"] {
            vector(h, &t(n), n_embd, false, &emb)?;
        }
        for n in ["attn_q", "attn_k", "attn_v"] {
            want(h, &t(&format!("{n}.weight")), &[n_embd, heads], &att)?;
            vector(h, &t(&format!("{n}.bias")), heads, false, &att)?;
        }
        want(h, &t("attn_out.weight"), &[heads, n_embd], &att)?;
        // clip.cpp swaps up and down when "down" reads n_embd values (legacy exports,
        // tools/mtmd/clip.cpp:2335-2349).
        let (mut up, mut down, mut swapped) = ("ffn_up", "ffn_down", "");
        if h.tensor(&t("ffn_down.weight")).is_some_and(|d| d.ne.first() == Some(&n_embd)) {
            (up, down, swapped) = (down, up, "; llama.cpp swaps ffn_up and ffn_down when ffn_down reads the embedding width");
        }
        let up_w = input_width(h, &t(&format!("{up}.weight")), n_embd, true, &emb)?.ok_or("unreachable")?;
        let n_ff = ne4(up_w)[1];
        let ff = || format!("{} and the FFN width {n_ff} of {}{swapped}", emb(), up_w.name);
        if ne4(up_w)[2..] != [1, 1] {
            return Err(format!("tensor {} is {} but must be a matrix", up_w.name, shape(&up_w.ne)));
        }
        optional(h, &t("ffn_gate.weight"), &[n_embd, n_ff], &ff)?;
        want(h, &t(&format!("{down}.weight")), &[n_ff, n_embd], &ff)?;
        vector(h, &t(&format!("{up}.bias")), n_ff, false, &ff)?;
        vector(h, &t("ffn_gate.bias"), n_ff, false, &ff)?;
        vector(h, &t(&format!("{down}.bias")), n_embd, false, &emb)?;
    }

    // The projector: mm.0 reads what the tower outputs (with feature layers, their
    // concatenation), each later layer what the one before makes. clip_n_mmproj_embd reads
    // mm.2.weight (mlp) or mm.3.bias (mlp_norm) unconditionally (tools/mtmd/clip.cpp:5978-5995).
    let tower = || {
        if features.is_empty() {
            format!("the vision tower's width {n_embd}")
        } else {
            format!("{} stacked feature layers of {} {n_embd}", features.len(), v("embedding_length"))
        }
    };
    let mm0 = input_width(h, "mm.0.weight", width_in, true, &tower)?.ok_or("unreachable")?;
    let hidden = ne4(mm0)[1];
    if ne4(mm0)[2..] != [1, 1] {
        return Err(format!("tensor mm.0.weight is {} but must be a matrix", shape(&mm0.ne)));
    }
    let mid = || format!("the width {hidden} that mm.0.weight makes");
    vector(h, "mm.0.bias", hidden, true, &mid)?;
    let norm = proj_type == "mlp_norm" || h.tensor("mm.3.weight").is_some();
    let (last, last_bias) = if norm { ("mm.3.weight", "mm.3.bias") } else { ("mm.2.weight", "mm.2.bias") };
    if norm {
        vector(h, "mm.1.weight", hidden, true, &mid)?;
        vector(h, "mm.1.bias", hidden, true, &mid)?;
    }
    let out_w = input_width(h, last, hidden, true, &mid)?.ok_or("unreachable")?;
    let out = ne4(out_w)[1];
    if ne4(out_w)[2..] != [1, 1] {
        return Err(format!("tensor {last} is {} but must be a matrix", shape(&out_w.ne)));
    }
    let outs = || format!("the width {out} that {last} makes");
    vector(h, last_bias, out, true, &outs)?;
    if norm {
        vector(h, "mm.4.weight", out, true, &outs)?;
        vector(h, "mm.4.bias", out, true, &outs)?;
    }
    Ok(out)
}

/// A tensor's shape in ggml's four dimensions.
fn ne4(t: &TensorInfo) -> [u64; 4] {
    std::array::from_fn(|i| t.ne.get(i).copied().unwrap_or(1))
}

/// `[a, b, …]` as the file declares it.
fn shape(ne: &[u64]) -> String {
    format!("{ne:?}")
}

/// Whether `t` has shape `want` (trailing 1s ignored, as llama.cpp's `check_tensor_dims`).
fn same_shape(t: &TensorInfo, want: &[u64]) -> bool {
    ne4(t).iter().enumerate().all(|(i, &n)| n == want.get(i).copied().unwrap_or(1))
}

fn mismatch(t: &TensorInfo, want: &[u64], why: &dyn Fn() -> String) -> String {
    format!("tensor {} is {} but should be {} ({})", t.name, shape(&t.ne), shape(want), why())
}

/// Tensor `name` must exist with shape `want`; `why` names the keys `want` comes from.
fn want<'h>(h: &'h GgufHeader, name: &str, want: &[u64], why: &dyn Fn() -> String) -> Check<&'h TensorInfo> {
    let t = h.tensor(name).ok_or_else(|| format!("tensor {name} is missing"))?;
    if !same_shape(t, want) {
        return Err(mismatch(t, want, why));
    }
    weight_type(t)?;
    Ok(t)
}

/// Tensor `name`, if present, must have shape `want`.
fn optional(h: &GgufHeader, name: &str, want: &[u64], why: &dyn Fn() -> String) -> Check {
    match h.tensor(name) {
        Some(t) if !same_shape(t, want) => Err(mismatch(t, want, why)),
        Some(t) => weight_type(t),
        None => Ok(()),
    }
}

/// Weights are multiplied (`ggml_mul_mat`) or looked up (`ggml_get_rows`) into F32 activations:
/// float or quantized types only. ggml's CPU backend has no matrix product for its integer and
/// F64 types (`GGML_TYPE_I8` … `GGML_TYPE_F64`, ggml/include/ggml.h:414-418); converters never
/// write weights so.
fn weight_type(t: &TensorInfo) -> Check {
    if (24..=28).contains(&t.ggml_type) {
        return Err(format!("tensor {} is {}; weights must be float or quantized", t.name, type_name(t.ggml_type)));
    }
    Ok(())
}

/// Matrix `name` (required or not) must read `width` values: its first dimension
/// (ggml_can_mul_mat, ggml/src/ggml.c:3354).
fn input_width<'h>(h: &'h GgufHeader, name: &str, width: u64, required: bool, why: &dyn Fn() -> String) -> Check<Option<&'h TensorInfo>> {
    match h.tensor(name) {
        None if required => Err(format!("tensor {name} is missing")),
        None => Ok(None),
        Some(t) if ne4(t)[0] != width => {
            Err(format!("tensor {} is {} but must read {width} values ({}): [{width}, …]", t.name, shape(&t.ne), why()))
        }
        Some(t) => weight_type(t).map(|()| Some(t)),
    }
}

/// Vector `name` (required or not) must have `len` F32 values: norms, biases and embeddings are
/// added to or multiplied with F32 activations, and ggml's CPU add/mul has no F32 × F16 kernel
/// (GGML_ABORT "unsupported types", ggml/src/ggml-cpu/binary-ops.cpp:135); converters always
/// write them as F32.
fn vector(h: &GgufHeader, name: &str, len: u64, required: bool, why: &dyn Fn() -> String) -> Check {
    match h.tensor(name) {
        None if required => Err(format!("tensor {name} is missing")),
        None => Ok(()),
        Some(t) if !same_shape(t, &[len]) => Err(mismatch(t, &[len], why)),
        Some(t) if t.ggml_type != 0 => {
            Err(format!("tensor {name} is {}; llama.cpp adds and multiplies such vectors only as F32", type_name(t.ggml_type)))
        }
        Some(_) => Ok(()),
    }
}

/// The ggml type's name.
fn type_name(id: u32) -> String {
    let name = match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        30 => "BF16",
        _ => return format!("ggml type {id}"),
    };
    name.to_owned()
}

/// The layer numbers of tensors named `{prefix}{N}.…`.
fn layer_indices(h: &GgufHeader, prefix: &str) -> BTreeSet<u64> {
    h.tensors
        .iter()
        .filter_map(|t| t.name.strip_prefix(prefix)?.split('.').next()?.parse().ok())
        .collect()
}

/// `; the file has N layers (blk.0 … blk.M)` (empty without layers).
fn describe_layers(layers: &BTreeSet<u64>, prefix: &str) -> String {
    match (layers.first(), layers.last()) {
        (Some(a), Some(b)) if a == b => format!("; the file has 1 layer ({prefix}{a})"),
        (Some(a), Some(b)) => format!("; the file has {} layers ({prefix}{a} … {prefix}{b})", layers.len()),
        _ => String::new(),
    }
}

/// A per-layer hyperparameter as llama.cpp's `get_key_or_arr` reads it: a scalar for every
/// layer, or an array with one entry per layer; `None` when absent or malformed (llama.cpp
/// refuses those itself).
fn per_layer(h: &GgufHeader, key: &str, n_layer: u64) -> Option<Vec<u64>> {
    match h.kv.get(key)? {
        Value::Array(items) if items.len() as u64 == n_layer => items.iter().map(Value::as_u64).collect(),
        Value::Array(_) => None,
        v => v.as_u64().map(|x| vec![x; usize::try_from(n_layer).unwrap_or(0)]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::tiny;

    fn header(w: &crate::gguf::GgufWriter) -> GgufHeader {
        let mut bytes = Vec::new();
        w.write_to(&mut bytes).unwrap();
        let n = bytes.len() as u64;
        GgufHeader::read_from(std::io::Cursor::new(bytes), n).unwrap()
    }

    #[test]
    fn the_tiny_model_passes_every_check() {
        let t = header(&tiny::text_model(0));
        text_generic(&t, "llama").unwrap();
        llama_shapes(&t).unwrap();
        for m in [tiny::mmproj(0), tiny::mmproj_with(0, tiny::text::N_EMBD, true), tiny::mmproj_with_width(0, 48)] {
            let m = header(&m);
            clip_generic(&m).unwrap();
            llava_shapes(&m, "mlp").unwrap();
        }
        assert_eq!(llava_shapes(&header(&tiny::mmproj_with_width(0, 48)), "mlp"), Ok(48));
    }

    #[test]
    fn per_layer_head_counts_and_experts() {
        let mut w = tiny::text_model(0);
        w.set("llama.attention.head_count_kv", Value::Array(vec![Value::U32(2), Value::U32(3)]));
        let e = text_generic(&header(&w), "llama").unwrap_err();
        assert!(e.contains("head_count_kv is 3") && e.contains("(layer 1)"), "{e}");
        let mut w = tiny::text_model(0);
        w.set("llama.expert_used_count", Value::U32(2));
        let e = text_generic(&header(&w), "llama").unwrap_err();
        assert!(e.contains("expert_used_count is 2, more than llama.expert_count 0"), "{e}");
        w.set("llama.expert_count", Value::U32(4));
        text_generic(&header(&w), "llama").unwrap();
        w.set("llama.expert_count", Value::U32(4000));
        assert!(text_generic(&header(&w), "llama").unwrap_err().contains("at most 1024"));
    }

    #[test]
    fn a_tokenizer_that_adds_bos_needs_one() {
        let mut w = crate::gguf::GgufWriter::new();
        let one = Value::Array(vec![Value::String("<unk>".into())]);
        w.string("tokenizer.ggml.model", "llama").kv("tokenizer.ggml.tokens", one);
        // SentencePiece adds BOS by default; its default id 1 is outside a 1-token vocabulary
        assert!(vocabulary(&header(&w)).unwrap_err().contains("adds a BOS token"));
        w.bool("tokenizer.ggml.add_bos_token", false);
        vocabulary(&header(&w)).unwrap();
        w.bool("tokenizer.ggml.add_eos_token", true).u32("tokenizer.ggml.eos_token_id", 7);
        let e = vocabulary(&header(&w)).unwrap_err();
        assert!(e.contains("EOS") && e.contains("eos_token_id is 7"), "{e}");
        w.set("tokenizer.ggml.eos_token_id", Value::U32(0));
        vocabulary(&header(&w)).unwrap();
    }

    #[test]
    fn projector_variants_name_the_culprit() {
        let check = |w: &crate::gguf::GgufWriter| {
            let h = header(w);
            clip_generic(&h).and_then(|()| llava_shapes(&h, "mlp").map(|_| ()))
        };
        let mut w = tiny::mmproj(0);
        w.set("clip.vision.feature_layer", Value::Array(vec![Value::I32(0), Value::I32(2)]));
        // two stacked feature layers: mm.0 must read 64 values
        let e = check(&w).unwrap_err();
        assert!(e.contains("mm.0.weight") && e.contains("2 stacked feature layers"), "{e}");
        let mut w = tiny::mmproj(0);
        w.set("clip.vision.image_grid_pinpoints", Value::Array(vec![Value::I32(64), Value::I32(0)]));
        assert!(check(&w).unwrap_err().contains("image_grid_pinpoints"));
        let mut w = tiny::mmproj(0);
        w.remove_tensor("mm.0.bias");
        assert_eq!(check(&w).unwrap_err(), "tensor mm.0.bias is missing");
        let mut w = tiny::mmproj(0);
        w.reshape("v.patch_embd.weight", &[8, 8, 1, 96]);
        assert!(check(&w).unwrap_err().contains("reads 1 colour channels"));
    }
}
