//! libmtmd: the projector (vision encoder), prompt tokenization into chunks, and chunk-by-chunk
//! evaluation (`mtmd_helper_eval_chunk_single` for text, `mtmd_encode_chunk` +
//! `mtmd_helper_decode_image_chunk` for media, so image encoding is timed on its own).

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use llama_cpp_2::mtmd::{MtmdBitmap, MtmdContext, MtmdContextParams, MtmdInputChunk, MtmdInputChunkType, MtmdInputChunks, MtmdInputText};
use llama_cpp_sys_2 as sys;

use super::context::Context;
use super::model::Model;
use crate::error::{Error, Result};

/// mtmd's media marker in prompt text (`<__media__>`).
#[must_use]
pub fn marker() -> &'static str {
    llama_cpp_2::mtmd::mtmd_default_marker()
}

/// A loaded projector. `Send + Sync`: libmtmd keeps per-context encode buffers, so the context
/// sits behind a mutex and one chunk is encoded (and its embeddings decoded) at a time.
pub struct Mtmd {
    // Field order: the mtmd context refers to the model, so it is dropped first.
    inner: Mutex<MtmdContext>,
    _model: Arc<Model>,
}

impl std::fmt::Debug for Mtmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mtmd").finish_non_exhaustive()
    }
}

/// What a chunk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    /// Text tokens.
    Text,
    /// An image's embeddings (computed by the encoder when the chunk is read).
    Image,
    /// Audio embeddings.
    Audio,
}

/// A tokenized prompt: text runs and media chunks, in order.
pub struct Chunks(MtmdInputChunks);

impl std::fmt::Debug for Chunks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunks").field("len", &self.len()).finish()
    }
}

/// One chunk of [`Chunks`].
#[derive(Debug)]
pub struct Chunk<'a>(MtmdInputChunk<'a>);

/// An image in mtmd's hands (its own copy of the RGB pixels), ready to tokenize.
pub struct Bitmap(MtmdBitmap);

impl std::fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bitmap").field("nx", &self.0.nx()).field("ny", &self.0.ny()).finish()
    }
}

impl Bitmap {
    /// Copies `width × height` RGB8 pixels (row-major) and tags them with `id` (which the
    /// image's chunk carries).
    ///
    /// # Errors
    /// A pixel buffer of the wrong length or an id with a NUL byte, as a one-line reason.
    pub fn from_rgb(width: u32, height: u32, rgb: &[u8], id: &str) -> std::result::Result<Self, String> {
        let mut b = MtmdBitmap::from_image_data(width, height, rgb).map_err(|e| e.to_string())?;
        b.set_id(id).map_err(|_| "bad media id".to_owned())?;
        Ok(Self(b))
    }
}

/// What mtmd would make of a prompt, counted without pixels: see [`Mtmd::count_prompt`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptCount {
    /// All tokens (KV cells), text and media.
    pub n_tokens: usize,
    /// Positions.
    pub n_positions: i64,
    /// Tokens of each media chunk, in order.
    pub media_tokens: Vec<usize>,
}

impl Chunks {
    /// Number of chunks.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Chunk `i`.
    #[must_use]
    pub fn get(&self, i: usize) -> Option<Chunk<'_>> {
        self.0.get(i).map(Chunk)
    }
}

impl Chunk<'_> {
    /// What it holds.
    #[must_use]
    pub fn kind(&self) -> ChunkKind {
        match self.0.chunk_type() {
            MtmdInputChunkType::Text => ChunkKind::Text,
            MtmdInputChunkType::Image => ChunkKind::Image,
            MtmdInputChunkType::Audio => ChunkKind::Audio,
        }
    }

    /// Tokens (KV cells) it occupies.
    #[must_use]
    pub fn n_tokens(&self) -> usize {
        self.0.n_tokens()
    }

    /// Positions it occupies (fewer than tokens under M-RoPE).
    #[must_use]
    pub fn n_positions(&self) -> i32 {
        self.0.n_positions()
    }

    /// The id of a media chunk (the [`Bitmap`]'s).
    #[must_use]
    pub fn id(&self) -> Option<String> {
        self.0.id()
    }

    /// The token ids of a text chunk.
    #[must_use]
    pub fn text_tokens(&self) -> Option<Vec<i32>> {
        self.0.text_tokens().map(|t| t.iter().map(|t| t.0).collect())
    }
}

impl Mtmd {
    /// Loads a projector for `model`.
    ///
    /// # Errors
    /// [`Error::Load`]; a path that is not UTF-8 ([`Error::Config`]).
    pub fn load(path: &Path, model: &Arc<Model>, use_gpu: bool, n_threads: u32) -> Result<Self> {
        let params = MtmdContextParams {
            use_gpu,
            print_timings: false,
            n_threads: i32::try_from(n_threads).unwrap_or(i32::MAX),
            ..MtmdContextParams::default()
        };
        let path_str = path.to_str().ok_or_else(|| Error::Config { field: "mmproj", reason: "the path is not valid UTF-8".into() })?;
        let ctx = MtmdContext::init_from_file(path_str, model.raw(), &params).map_err(|_| Error::Load { what: "mmproj", path: path.to_path_buf() })?;
        Ok(Self { inner: Mutex::new(ctx), _model: Arc::clone(model) })
    }

    /// The context, locked (a poisoned lock is taken over: it holds no invariant a panic
    /// elsewhere could break).
    fn lock(&self) -> MutexGuard<'_, MtmdContext> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Image tokens get 2-D positions (M-RoPE).
    #[must_use]
    pub fn uses_mrope(&self) -> bool {
        self.lock().decode_use_mrope()
    }

    /// Image tokens attend to each other both ways (Gemma 3).
    #[must_use]
    pub fn uses_non_causal(&self) -> bool {
        self.lock().decode_use_non_causal()
    }

    /// The projector has a vision encoder.
    #[must_use]
    pub fn supports_vision(&self) -> bool {
        self.lock().support_vision()
    }

    /// Tokenizes `text` (with [`marker`]s, special tokens parsed and added) and the images, one
    /// per marker.
    ///
    /// # Errors
    /// [`Error::Prompt`] with mtmd's reason.
    pub fn tokenize(&self, text: &str, images: &[Bitmap]) -> Result<Chunks> {
        let refs: Vec<&MtmdBitmap> = images.iter().map(|b| &b.0).collect();
        self.lock()
            .tokenize(MtmdInputText { text: text.to_owned(), add_special: true, parse_special: true }, &refs)
            .map(Chunks)
            .map_err(|e| Error::Prompt(format!("mtmd could not tokenize the prompt: {e}")))
    }

    /// Tokenizes text that continues a sequence (a later turn of a chat): special tokens parsed,
    /// none added (no BOS).
    ///
    /// # Errors
    /// [`Error::Prompt`] with mtmd's reason.
    pub fn tokenize_continuation(&self, text: &str) -> Result<Chunks> {
        self.lock()
            .tokenize(MtmdInputText { text: text.to_owned(), add_special: false, parse_special: true }, &[])
            .map(Chunks)
            .map_err(|e| Error::Prompt(format!("mtmd could not tokenize the text: {e}")))
    }

    /// llama.cpp's own `mtmd_helper_eval_chunks` over all chunks (the reference path), sequence
    /// 0; returns the next position.
    ///
    /// # Errors
    /// [`Error::Prompt`] with mtmd's code.
    pub fn eval_chunks(&self, ctx: &mut Context, chunks: &Chunks, n_past: i32, n_batch: u32) -> Result<i32> {
        let mut mtmd = self.lock();
        chunks
            .0
            .eval_chunks(&mut mtmd, ctx.raw_mut(), n_past, 0, i32::try_from(n_batch).unwrap_or(i32::MAX), true)
            .map_err(|e| Error::Prompt(format!("eval_chunks failed: {e}")))
    }

    /// Evaluates one text chunk at positions `n_past..`, sequence 0, in batches of `n_batch`.
    /// With `logits_last` the last token's logits are computed. Returns the next position.
    ///
    /// # Errors
    /// [`Error::Llama`] with llama.cpp's return code.
    pub fn eval_text(&self, ctx: &mut Context, chunk: &Chunk<'_>, n_past: i32, n_batch: u32, logits_last: bool) -> Result<i32> {
        let mtmd = self.lock();
        // The helper *adds* the tokens it decoded to *new_n_past for text chunks.
        let mut new_n_past = n_past;
        // SAFETY: all three pointers come from live wrappers borrowed for this call (ctx mutably,
        // mtmd locked); `chunk` belongs to chunks that outlive the call; new_n_past is a valid
        // out-pointer.
        let rc = unsafe {
            sys::mtmd_helper_eval_chunk_single(
                mtmd.as_raw(),
                ctx.raw_mut().as_raw(),
                chunk.0.as_raw(),
                n_past,
                0,
                i32::try_from(n_batch).unwrap_or(i32::MAX),
                logits_last,
                &mut new_n_past,
            )
        };
        if rc != 0 {
            return Err(Error::Llama { op: "decode text chunk", code: rc });
        }
        Ok(new_n_past)
    }

    /// Runs the vision (or audio) encoder on a media chunk and decodes its embeddings at
    /// positions `n_past..`; returns the next position and the time spent encoding.
    ///
    /// # Errors
    /// [`Error::Llama`] with mtmd's or llama.cpp's return code.
    pub fn read_media(&self, ctx: &mut Context, chunk: &Chunk<'_>, n_past: i32, n_batch: u32) -> Result<(i32, Duration)> {
        let mtmd = self.lock();
        let t = Instant::now();
        encode(&mtmd, chunk)?;
        let encode_time = t.elapsed();
        let mut new_n_past = n_past;
        // SAFETY: live pointers as above; mtmd_get_output_embd returns the context-owned buffer
        // holding n_tokens × n_embd floats of the chunk just encoded (checked non-null; the lock
        // keeps another encode from replacing it), which the helper only reads; no callback.
        let rc = unsafe {
            let embd = sys::mtmd_get_output_embd(mtmd.as_raw());
            if embd.is_null() {
                return Err(Error::Llama { op: "read image embeddings", code: -1 });
            }
            sys::mtmd_helper_decode_image_chunk(
                mtmd.as_raw(),
                ctx.raw_mut().as_raw(),
                chunk.0.as_raw(),
                embd,
                n_past,
                0,
                i32::try_from(n_batch).unwrap_or(i32::MAX),
                &mut new_n_past,
                None,
                std::ptr::null_mut(),
            )
        };
        if rc != 0 {
            return Err(Error::Llama { op: "decode image chunk", code: rc });
        }
        Ok((new_n_past, encode_time))
    }

    /// Runs the encoder on a media chunk and copies its embeddings (`n_tokens × n_embd` floats,
    /// token-major) — what the language model receives for that chunk.
    ///
    /// # Errors
    /// [`Error::Llama`] with mtmd's return code.
    pub fn embeddings(&self, chunk: &Chunk<'_>, n_embd: usize) -> Result<Vec<f32>> {
        let mtmd = self.lock();
        encode(&mtmd, chunk)?;
        let n = chunk.n_tokens() * n_embd;
        // SAFETY: after a successful encode, mtmd_get_output_embd points to n_tokens × n_embd
        // floats owned by the context (checked non-null), valid until the next encode (the
        // lock is held); we copy them.
        unsafe {
            let p = sys::mtmd_get_output_embd(mtmd.as_raw());
            if p.is_null() {
                return Err(Error::Llama { op: "read image embeddings", code: -1 });
            }
            Ok(std::slice::from_raw_parts(p, n).to_vec())
        }
    }

    /// Tokenizes `text` (with mtmd markers) as [`Mtmd::tokenize`] would, for images of the
    /// given `(width, height)` sizes — but with mtmd's *placeholder* bitmaps (`mtmd_bitmap_init`
    /// without data: "treated as a placeholder for counting tokens", mtmd.h), which go through
    /// the preprocessor's size arithmetic without any pixels. So a prompt's length is known
    /// before any image is decoded. `None` when mtmd refuses (the real tokenization then says
    /// why).
    #[must_use]
    pub fn count_prompt(&self, text: &str, add_special: bool, sizes: &[(u32, u32)]) -> Option<PromptCount> {
        /// Frees the placeholder bitmaps and the chunk list on every return path.
        struct Owned {
            bitmaps: Vec<*mut sys::mtmd_bitmap>,
            chunks: *mut sys::mtmd_input_chunks,
        }
        impl Drop for Owned {
            fn drop(&mut self) {
                for &b in &self.bitmaps {
                    // SAFETY: each pointer came from mtmd_bitmap_init (non-null) and is freed once.
                    unsafe { sys::mtmd_bitmap_free(b) };
                }
                if !self.chunks.is_null() {
                    // SAFETY: from mtmd_input_chunks_init, freed once; its chunks go with it.
                    unsafe { sys::mtmd_input_chunks_free(self.chunks) };
                }
            }
        }
        let text = std::ffi::CString::new(text).ok()?;
        let mut owned = Owned { bitmaps: Vec::with_capacity(sizes.len()), chunks: std::ptr::null_mut() };
        for &(nx, ny) in sizes {
            // SAFETY: a null data pointer is mtmd's documented placeholder (nothing is read).
            let b = unsafe { sys::mtmd_bitmap_init(nx, ny, std::ptr::null()) };
            if b.is_null() {
                return None;
            }
            owned.bitmaps.push(b);
        }
        // SAFETY: no arguments; returns an owned list (or null, checked).
        owned.chunks = unsafe { sys::mtmd_input_chunks_init() };
        if owned.chunks.is_null() {
            return None;
        }
        let input = sys::mtmd_input_text { text: text.as_ptr(), text_len: text.as_bytes().len(), add_special, parse_special: true };
        let ptrs: Vec<*const sys::mtmd_bitmap> = owned.bitmaps.iter().map(|&b| b.cast_const()).collect();
        let mtmd = self.lock();
        // SAFETY: a live mtmd context (locked); `input` and the C string it points to outlive
        // the call; `ptrs` holds `ptrs.len()` live bitmaps; the output list is ours. C++
        // exceptions are caught inside mtmd_tokenize (return code 2).
        let rc = unsafe { sys::mtmd_tokenize(mtmd.as_raw(), owned.chunks, &raw const input, ptrs.as_ptr().cast_mut(), ptrs.len()) };
        drop(mtmd);
        if rc != 0 {
            tracing::debug!(rc, "mtmd could not count the prompt with placeholder images");
            return None;
        }
        let mut count = PromptCount { n_tokens: 0, n_positions: 0, media_tokens: Vec::with_capacity(sizes.len()) };
        // SAFETY: the list filled above.
        let n = unsafe { sys::mtmd_input_chunks_size(owned.chunks) };
        for i in 0..n {
            // SAFETY: i < size; the chunk is owned by the list, which outlives these reads.
            let (kind, n_tokens, n_pos) = unsafe {
                let c = sys::mtmd_input_chunks_get(owned.chunks, i);
                if c.is_null() {
                    return None;
                }
                (sys::mtmd_input_chunk_get_type(c), sys::mtmd_input_chunk_get_n_tokens(c), sys::mtmd_input_chunk_get_n_pos(c))
            };
            count.n_tokens += n_tokens;
            count.n_positions += i64::from(n_pos);
            if kind != sys::MTMD_INPUT_CHUNK_TYPE_TEXT {
                count.media_tokens.push(n_tokens);
            }
        }
        Some(count)
    }
}

/// Runs the encoder on one media chunk; the embeddings stay in the (locked) mtmd context.
fn encode(mtmd: &MtmdContext, chunk: &Chunk<'_>) -> Result<()> {
    // SAFETY: live mtmd context (locked by the caller) and chunk; mtmd_encode_chunk writes only
    // into the context.
    let rc = unsafe { sys::mtmd_encode_chunk(mtmd.as_raw(), chunk.0.as_raw()) };
    if rc != 0 {
        return Err(Error::Llama { op: "encode image", code: rc });
    }
    Ok(())
}
