//! The library's error type. Every variant renders as one line that names the culprit and, where
//! there is one, the way out; the binary prints it and exits non-zero.

use std::path::PathBuf;

/// Errors of the csp-llava library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The run was cancelled through the engine's [`crate::CancelHandle`] (Ctrl-C in the CLI).
    #[error("interrupted")]
    Cancelled,
    /// An input file does not exist.
    #[error("{what} not found: {}", path.display())]
    NotFound {
        /// "model", "mmproj", "image", "prompt file"
        what: &'static str,
        /// The path given.
        path: PathBuf,
    },
    /// An output file cannot be written.
    #[error("cannot write {what} {}: {cause}", path.display())]
    Write {
        /// What the file is for.
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        cause: std::io::Error,
    },
    /// An input file exists but cannot be read.
    // `cause`, not `source`: the message already says it, and a source would be printed twice
    // by error chains ("Is a directory: Is a directory").
    #[error("cannot read {what} {}: {cause}", path.display())]
    Io {
        /// What the file was for.
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        cause: std::io::Error,
    },
    /// A path that is not a regular file where one is read (a FIFO would block, a device never
    /// end).
    #[error("cannot read {what} {}: it is {kind}", path.display())]
    NotRegularFile {
        /// What the file was for.
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// "a directory", "not a regular file (…)"
        kind: &'static str,
    },
    /// An input file larger than csp-llava reads for its purpose.
    #[error("cannot read {what} {}: {size} bytes, more than the {max} allowed", path.display())]
    TooLarge {
        /// What the file was for.
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// Its size (or what was read before stopping).
        size: u64,
        /// The bound.
        max: u64,
    },
    /// A model or projector file is not a readable GGUF file.
    #[error("{what} {} is not a valid GGUF file: {reason}", path.display())]
    BadGguf {
        /// "model" or "mmproj"
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A model family or file kind csp-llava cannot run.
    #[error("unsupported {what}: {reason}")]
    Unsupported {
        /// What is unsupported.
        what: &'static str,
        /// Why, and what to do.
        reason: String,
    },
    /// llama.cpp could not load a model that looked valid.
    #[error("llama.cpp failed to load {what} {} (run with -v to see its log)", path.display())]
    Load {
        /// "model" or "mmproj"
        what: &'static str,
        /// The path given.
        path: PathBuf,
    },
    /// The projector's output width differs from the text model's hidden size.
    #[error(
        "projector {} does not fit model {}: it outputs {proj_width} values per image token, the model's hidden size is {model_width}",
        mmproj.display(), model.display()
    )]
    ProjectorMismatch {
        /// mmproj path
        mmproj: PathBuf,
        /// model path
        model: PathBuf,
        /// projector output width
        proj_width: u64,
        /// text model hidden size
        model_width: u64,
    },
    /// A setting is out of range or inconsistent.
    #[error("invalid {field}: {reason}")]
    Config {
        /// The flag or field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The prompt (text + image tokens) does not fit the context.
    #[error(
        "prompt is {n_tokens} tokens ({n_image_tokens} of them from {n_images} image(s)) but the context holds {n_ctx}; raise -c/--ctx-size (model trained for {n_ctx_train}) or pass fewer images"
    )]
    PromptTooLong {
        /// Prompt tokens, image tokens included.
        n_tokens: usize,
        /// Image tokens.
        n_image_tokens: usize,
        /// Images.
        n_images: usize,
        /// Context size.
        n_ctx: u32,
        /// Model's trained context.
        n_ctx_train: u32,
    },
    /// The prompt could not be formatted or tokenized.
    #[error("prompt: {0}")]
    Prompt(String),
    /// A llama.cpp or libmtmd call failed.
    #[error("llama.cpp: {op} failed (code {code})")]
    Llama {
        /// The operation.
        op: &'static str,
        /// Its return code.
        code: i32,
    },
    /// The attention observer failed inside llama.cpp's graph callback.
    #[error("attention observer: {0}")]
    Callback(String),
    /// The llama.cpp backend could not be initialised.
    #[error("llama.cpp backend: {0}")]
    Backend(String),
    /// A context could not be created (usually out of memory for the requested -c).
    #[error("cannot create a llama.cpp context with {n_ctx} cells: {reason}")]
    Context {
        /// Requested context size.
        n_ctx: u32,
        /// llama-cpp-2's message.
        reason: String,
    },
    /// An image that cannot be used: not an image, corrupt, or over the pixel/memory limits
    /// (`engine::image`).
    #[error("cannot decode image {name}: {reason}")]
    Image {
        /// The file's path as given (or a name for an in-memory image).
        name: String,
        /// Why (`engine::image::DecodeError`).
        reason: String,
    },
    /// A model or projector whose metadata contradicts its tensors, or that llama.cpp would abort
    /// on (`engine::check`): the reason names the key or tensor and the contradiction.
    #[error("{what} {} cannot be used: {reason}", path.display())]
    BadModel {
        /// "model" or "mmproj"
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// What contradicts what.
        reason: String,
    },
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
