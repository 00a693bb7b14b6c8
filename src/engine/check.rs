//! Checks on the input files before llama.cpp sees them, so that a wrong file gives a precise
//! one-line error instead of a generic load failure (or an abort deep inside llama.cpp).

use std::path::Path;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gguf::GgufHeader;

/// Reads a GGUF header, mapping failures to `NotFound`, `Io` or `BadGguf`.
pub(super) fn gguf(path: &Path, what: &'static str) -> Result<GgufHeader> {
    if !path.exists() {
        return Err(Error::NotFound { what, path: path.to_owned() });
    }
    if path.is_dir() {
        return Err(Error::BadGguf { what, path: path.to_owned(), reason: "it is a directory".into() });
    }
    GgufHeader::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof => {
            Error::BadGguf { what, path: path.to_owned(), reason: e.to_string() }
        }
        _ => Error::Io { what, path: path.to_owned(), source: e },
    })
}

/// Architectures whose cache is not a plain KV cache (state-space / recurrent layers).
const RECURRENT: &[&str] = &["mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7", "jamba", "falcon-h1", "granitehybrid", "lfm2", "nemotron_h", "plamo2", "qwen3next"];

/// The text model must be a language model, not a projector or an encoder.
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
    Ok(())
}

/// The projector must be a `clip` file whose output width matches the model's hidden size
/// (checked from the tensors for the LLaVA projector types; llama.cpp checks the others).
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
    let model_arch = model.architecture().unwrap_or("");
    let Some(model_width) = model.get_u64(&format!("{model_arch}.embedding_length")) else {
        return Ok(());
    };
    let proj_type = mmproj.get_str("clip.projector_type").unwrap_or("mlp");
    // LLaVA projectors: the last linear layer's output rows are the image token width.
    let last = match proj_type {
        "mlp" | "mlp_norm" => ["mm.2.weight", "mm.4.weight"]
            .iter()
            .rev()
            .find_map(|n| mmproj.tensor(n).filter(|t| t.ne.len() == 2)),
        _ => None,
    };
    if let Some(t) = last {
        let proj_width = t.ne[1];
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
