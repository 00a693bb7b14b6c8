//! The text model: llama.cpp's `llama_model`, with what the engine reads of it.

use std::path::Path;
use std::sync::Mutex;

use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;

use crate::error::{Error, Result};

/// A loaded text model. `Send + Sync`: contexts made from it are serialised (llama.cpp's
/// context creation may write the model's `n_ctx_train`), everything else only reads it.
pub struct Model {
    inner: LlamaModel,
    /// Held while a context is created (see [`Model::raw_for_context`]).
    create: Mutex<()>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("n_layer", &self.n_layer()).field("n_embd", &self.n_embd()).finish_non_exhaustive()
    }
}

/// A chat message for llama.cpp's built-in formatter.
#[derive(Debug, Clone, Copy)]
pub struct ChatMessage<'a> {
    /// `system`, `user`, `assistant`.
    pub role: &'a str,
    /// The text.
    pub content: &'a str,
}

/// Why llama.cpp's built-in chat formatter could not format a chat.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatFormatError {
    /// A NUL byte in the template or a message (C strings cannot hold one).
    #[error("the {0} contains a NUL byte")]
    Nul(&'static str),
    /// llama.cpp does not know the template.
    #[error("{0}")]
    Unrecognised(String),
}

impl Model {
    /// Loads a GGUF text model, offloading `n_gpu_layers` layers when a GPU is used.
    ///
    /// # Errors
    /// [`Error::Load`] when llama.cpp cannot load the file; [`Error::Backend`].
    pub fn load(path: &Path, n_gpu_layers: u32, use_mmap: bool) -> Result<Self> {
        let backend = super::backend()?;
        let params = LlamaModelParams::default().with_n_gpu_layers(n_gpu_layers).with_use_mmap(use_mmap);
        let inner = LlamaModel::load_from_file(backend, path, &params).map_err(|_| Error::Load { what: "model", path: path.to_path_buf() })?;
        Ok(Self { inner, create: Mutex::new(()) })
    }

    /// Reads only the metadata of a GGUF text model and simulates its allocations (llama.cpp's
    /// `no_alloc`, as its `--fit` does): no weight is read, and contexts created from it
    /// allocate nothing but report in [`super::Context::memory_totals`] what they would.
    /// Such a model cannot evaluate anything.
    ///
    /// # Errors
    /// As [`Model::load`].
    pub fn load_no_alloc(path: &Path, n_gpu_layers: u32) -> Result<Self> {
        let backend = super::backend()?;
        let params = LlamaModelParams::default().with_n_gpu_layers(n_gpu_layers).with_no_alloc(true);
        let inner = LlamaModel::load_from_file(backend, path, &params).map_err(|_| Error::Load { what: "model", path: path.to_path_buf() })?;
        Ok(Self { inner, create: Mutex::new(()) })
    }

    /// Tokens `text` becomes (BOS as the model adds it, special tokens parsed): for estimates
    /// made without the projector, such as a memory plan.
    #[must_use]
    pub fn count_tokens(&self, text: &str) -> usize {
        self.inner.vocab().tokenize(text.as_bytes(), true, true).len()
    }

    /// The llama-cpp-2 model, for the other wrappers of this module.
    pub(super) fn raw(&self) -> &LlamaModel {
        &self.inner
    }

    /// The model and the lock to hold while a context is created from it.
    pub(super) fn raw_for_context(&self) -> (&LlamaModel, std::sync::MutexGuard<'_, ()>) {
        (&self.inner, self.create.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Layers.
    #[must_use]
    pub fn n_layer(&self) -> u32 {
        self.inner.n_layer()
    }

    /// Query heads per layer.
    #[must_use]
    pub fn n_head(&self) -> u32 {
        self.inner.n_head()
    }

    /// Key/value heads per layer (GQA).
    #[must_use]
    pub fn n_head_kv(&self) -> u32 {
        self.inner.n_head_kv()
    }

    /// Hidden size.
    #[must_use]
    pub fn n_embd(&self) -> i32 {
        self.inner.n_embd()
    }

    /// The context the model was trained with.
    #[must_use]
    pub fn n_ctx_train(&self) -> u32 {
        self.inner.n_ctx_train()
    }

    /// Vocabulary size.
    #[must_use]
    pub fn n_vocab(&self) -> i32 {
        self.inner.n_vocab()
    }

    /// Recurrent or hybrid (Mamba, RWKV, Jamba …): no transformer KV cache to prune.
    #[must_use]
    pub fn is_recurrent_or_hybrid(&self) -> bool {
        self.inner.is_recurrent() || self.inner.is_hybrid()
    }

    /// How a *text* token's keys and queries are rotated, as 1-D RoPE: `Some(false)` NORM (pairs
    /// `(2i, 2i+1)`), `Some(true)` NEOX (pairs `(i, i + n_rot/2)`). M-RoPE (Qwen2-VL, interleaved
    /// in Qwen3-VL) rotates NEOX pairs by each section's position component, and a text token has
    /// the same position in every component: its rotation is NEOX's (`tests/families.rs` checks
    /// it against llama.cpp). `None` for vision RoPE or none.
    #[must_use]
    pub fn rope_neox(&self) -> Option<bool> {
        use llama_cpp_2::model::RopeType;
        match self.inner.rope_type()? {
            RopeType::Norm => Some(false),
            RopeType::NeoX | RopeType::MRope | RopeType::IMRope => Some(true),
            RopeType::Vision => None,
        }
    }

    /// The frequency scale the model was trained with (1 without RoPE scaling).
    #[must_use]
    pub fn rope_freq_scale_train(&self) -> f32 {
        // SAFETY: a live model pointer owned by `inner`; the call only reads its hparams.
        unsafe { llama_cpp_sys_2::llama_model_rope_freq_scale_train(self.inner.as_raw()) }
    }

    /// A metadata value as text (`general.architecture`, `{arch}.attention.scale`, …).
    #[must_use]
    pub fn meta(&self, key: &str) -> Option<String> {
        self.inner.meta_val_str(key).ok()
    }

    /// Whether `token` ends generation (EOS, EOT, …).
    #[must_use]
    pub fn is_eog(&self, token: i32) -> bool {
        self.inner.vocab().is_eog(LlamaToken(token))
    }

    /// The bytes a token stands for; `special` renders control tokens as their text. Empty for
    /// ids outside the vocabulary (llama.cpp would assert on them).
    #[must_use]
    pub fn token_bytes(&self, token: i32, special: bool) -> Vec<u8> {
        let vocab = self.inner.vocab();
        if !(0..vocab.n_tokens()).contains(&token) {
            return Vec::new();
        }
        vocab.token_to_piece(LlamaToken(token), special, None)
    }

    /// BOS and EOS ids (−1 when the model has none).
    #[must_use]
    pub fn bos_eos(&self) -> (i32, i32) {
        let vocab = self.inner.vocab();
        (vocab.bos().0, vocab.eos().0)
    }

    /// Whether tokenization adds BOS / EOS.
    #[must_use]
    pub fn adds_bos_eos(&self) -> (bool, bool) {
        let vocab = self.inner.vocab();
        (vocab.should_add_bos(), vocab.should_add_eos())
    }

    /// The model's `tokenizer.chat_template`, raw bytes (`None` when it has none).
    #[must_use]
    pub fn chat_template(&self) -> Option<Vec<u8>> {
        let t = self.inner.chat_template(None).ok()?;
        Some(t.as_c_str().to_bytes().to_vec())
    }

    /// llama.cpp's formatter (`llama_chat_apply_template`) with `template` (a built-in name or a
    /// template text llama.cpp recognises), the assistant's turn opened.
    ///
    /// # Errors
    /// [`ChatFormatError`].
    pub fn apply_chat_template(&self, template: &[u8], messages: &[ChatMessage<'_>]) -> std::result::Result<String, ChatFormatError> {
        // llama.cpp only matches the template's text against known markers: a non-UTF-8 byte
        // cannot be part of one
        let tmpl = LlamaChatTemplate::new(&String::from_utf8_lossy(template)).map_err(|_| ChatFormatError::Nul("chat template"))?;
        let chat = messages
            .iter()
            .map(|m| LlamaChatMessage::new(m.role.to_owned(), m.content.to_owned()))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| ChatFormatError::Nul("prompt"))?;
        self.inner.apply_chat_template(&tmpl, &chat, true).map_err(|e| ChatFormatError::Unrecognised(e.to_string()))
    }
}
