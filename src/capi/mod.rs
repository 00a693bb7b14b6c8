//! The C ABI (`include/csp_llava.h`, generated from this file by cbindgen; `tests/capi.rs`
//! checks that the header matches and runs `examples/c/chat.c`). Opaque handles, plain C types,
//! callbacks run inside the call that takes them. Every function catches panics; functions that
//! return a pointer return NULL on error, functions that return `int` a negative value; the
//! error's one line is then [`cspl_last_error`] (per thread). Null pointers are errors, not
//! crashes. This module and `src/llama/` are the only places with `unsafe`.
#![allow(unsafe_code)]
// C names and C-style docs
#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::Arc;

use crate::config::{ImageData, ModelConfig};
use crate::engine::{Chat, ChatConfig, ChatEvent, Engine, Flow};
use crate::policy::{Budget, PolicyKind};

/// A loaded model: text model + projector. Free with `cspl_engine_free`; chats made from it
/// keep it alive until they are freed too.
#[derive(Debug)]
pub struct cspl_engine {
    engine: Arc<Engine>,
}

/// A conversation about images read and pruned once (see `Chat`). Free with `cspl_chat_free`.
#[derive(Debug)]
pub struct cspl_chat {
    chat: Chat,
}

/// How a model is loaded.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct cspl_engine_params {
    /// CPU threads; 0 = every core.
    pub n_threads: u32,
    /// Layers on the GPU; -1 = all when a GPU backend exists.
    pub n_gpu_layers: i32,
}

/// How a chat runs.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct cspl_chat_params {
    /// Pruning policy by name ("csp", "h2o", "snapkv", "lookm", "streaming", "random", "knorm",
    /// "vnorm", "keydiff", "full", …); NULL = "csp".
    pub policy: *const c_char,
    /// Share of the images' prompt kept (0 < budget <= 1).
    pub budget: f32,
    /// Context cells; 0 = 4096 (or the model's trained context if smaller).
    pub n_ctx: u32,
    /// Cap on the cache while the images are read (cells); 0 = none.
    pub kv_max_cells: u32,
    /// Tokens per answer at most.
    pub n_predict: i32,
    /// Sampling temperature; 0 = greedy.
    pub temperature: f32,
    /// Sampler seed (the same chat gives the same answers).
    pub seed: u32,
}

/// Called with each piece of an answer (NUL-terminated UTF-8) during `cspl_chat_ask`; return
/// 0 to go on, non-zero to stop the answer there (not an error).
pub type cspl_token_cb = Option<unsafe extern "C" fn(piece: *const c_char, user_data: *mut c_void) -> c_int>;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: &str) {
    let line: String = msg.lines().next().unwrap_or_default().chars().filter(|c| *c != '\0').collect();
    LAST_ERROR.with(|e| *e.borrow_mut() = CString::new(line).unwrap_or_default());
}

/// Runs `f`, turning errors and panics into the last error and `fail`.
fn guard<T>(fail: T, f: impl FnOnce() -> Result<T, String>) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => {
            set_error("");
            v
        }
        Ok(Err(msg)) => {
            set_error(&msg);
            fail
        }
        Err(_) => {
            set_error("internal error (a panic was caught at the C boundary)");
            fail
        }
    }
}

/// A C string argument, or an error naming it.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string valid for the call.
unsafe fn str_arg<'a>(p: *const c_char, what: &str) -> Result<&'a str, String> {
    if p.is_null() {
        return Err(format!("{what} is NULL"));
    }
    // SAFETY: non-null, NUL-terminated and valid for the call (the caller's contract).
    unsafe { CStr::from_ptr(p) }.to_str().map_err(|_| format!("{what} is not UTF-8"))
}

/// The last error of this thread: one line, empty after a call that succeeded. Valid until the
/// next call on this thread.
#[no_mangle]
pub extern "C" fn cspl_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The defaults: every core, all layers on a GPU when there is one.
#[no_mangle]
pub extern "C" fn cspl_engine_params_default() -> cspl_engine_params {
    cspl_engine_params { n_threads: 0, n_gpu_layers: -1 }
}

/// The defaults: CSP keeping 0.2 of the images' prompt, 4096 cells, 256 tokens per answer,
/// greedy, seed 0.
#[no_mangle]
pub extern "C" fn cspl_chat_params_default() -> cspl_chat_params {
    cspl_chat_params { policy: std::ptr::null(), budget: 0.2, n_ctx: 0, kv_max_cells: 0, n_predict: 256, temperature: 0.0, seed: 0 }
}

/// Loads a text model and its projector (GGUF files); NULL params = the defaults. NULL on error.
///
/// # Safety
/// `model` and `mmproj` are NUL-terminated paths; `params` is NULL or points to a
/// `cspl_engine_params`.
#[no_mangle]
pub unsafe extern "C" fn cspl_engine_load(model: *const c_char, mmproj: *const c_char, params: *const cspl_engine_params) -> *mut cspl_engine {
    guard(std::ptr::null_mut(), || {
        // SAFETY: the caller passes NUL-terminated strings (or NULL, refused).
        let (model, mmproj) = unsafe { (str_arg(model, "model")?, str_arg(mmproj, "mmproj")?) };
        // SAFETY: NULL or a valid `cspl_engine_params` (the caller's contract).
        let p = if params.is_null() { cspl_engine_params_default() } else { unsafe { *params } };
        let mut cfg = ModelConfig::new(model, mmproj);
        if p.n_threads > 0 {
            cfg.threads = p.n_threads;
        }
        if let Ok(n) = u32::try_from(p.n_gpu_layers) {
            cfg.n_gpu_layers = n;
        }
        let engine = Engine::load(&cfg).map_err(|e| e.to_string())?;
        Ok(Box::into_raw(Box::new(cspl_engine { engine: Arc::new(engine) })))
    })
}

/// Frees an engine (NULL is fine). Chats made from it stay usable until freed.
///
/// # Safety
/// `engine` is NULL or a pointer `cspl_engine_load` returned, not freed before.
#[no_mangle]
pub unsafe extern "C" fn cspl_engine_free(engine: *mut cspl_engine) {
    if !engine.is_null() {
        // SAFETY: from Box::into_raw in cspl_engine_load, freed once (the caller's contract).
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(unsafe { Box::from_raw(engine) })));
    }
}

/// A chat with the engine's model; NULL params = the defaults. NULL on error (an unknown
/// policy, a budget outside (0, 1]).
///
/// # Safety
/// `engine` comes from `cspl_engine_load` and is not freed; `params` is NULL or valid, its
/// `policy` NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn cspl_chat_new(engine: *const cspl_engine, params: *const cspl_chat_params) -> *mut cspl_chat {
    guard(std::ptr::null_mut(), || {
        if engine.is_null() {
            return Err("engine is NULL".into());
        }
        // SAFETY: a live engine from cspl_engine_load (the caller's contract).
        let engine = unsafe { &*engine };
        // SAFETY: NULL or a valid `cspl_chat_params`.
        let p = if params.is_null() { cspl_chat_params_default() } else { unsafe { *params } };
        // SAFETY: NULL or a NUL-terminated string.
        let name = if p.policy.is_null() { "csp" } else { unsafe { str_arg(p.policy, "policy")? } };
        let kind: PolicyKind = name.parse()?;
        if !(p.budget > 0.0 && p.budget <= 1.0) {
            return Err(format!("budget {} is not in (0, 1]", p.budget));
        }
        let mut cfg = ChatConfig::default();
        cfg.policy.kind = kind;
        cfg.policy.budget = Budget::Fraction(f64::from(p.budget));
        cfg.ctx.n_ctx = p.n_ctx;
        cfg.ctx.kv_max_cells = (p.kv_max_cells > 0).then_some(crate::config::KvCap::Cells(p.kv_max_cells));
        cfg.sampling.n_predict = p.n_predict;
        cfg.sampling.temp = p.temperature;
        cfg.sampling.seed = Some(p.seed);
        cfg.policy.validate().map_err(|e| e.to_string())?;
        cfg.sampling.validate().map_err(|e| e.to_string())?;
        cfg.ctx.validate().map_err(|e| e.to_string())?;
        Ok(Box::into_raw(Box::new(cspl_chat { chat: Chat::new(Arc::clone(&engine.engine), cfg) })))
    })
}

/// Frees a chat (NULL is fine).
///
/// # Safety
/// `chat` is NULL or a pointer `cspl_chat_new` returned, not freed before.
#[no_mangle]
pub unsafe extern "C" fn cspl_chat_free(chat: *mut cspl_chat) {
    if !chat.is_null() {
        // SAFETY: from Box::into_raw in cspl_chat_new, freed once (the caller's contract).
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(unsafe { Box::from_raw(chat) })));
    }
}

/// The chat behind a handle, or an error.
///
/// # Safety
/// `chat` is NULL or a live handle from `cspl_chat_new`, used by one thread at a time.
unsafe fn chat_mut<'a>(chat: *mut cspl_chat) -> Result<&'a mut Chat, String> {
    if chat.is_null() {
        return Err("chat is NULL".into());
    }
    // SAFETY: a live handle used by one thread at a time (the caller's contract).
    Ok(unsafe { &mut (*chat).chat })
}

/// Adds an image file (read with the others before the first question). 0, or -1 on error.
///
/// # Safety
/// `chat` is a live handle; `path` a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn cspl_chat_add_image_file(chat: *mut cspl_chat, path: *const c_char) -> c_int {
    guard(-1, || {
        // SAFETY: per this function's contract.
        let (chat, path) = unsafe { (chat_mut(chat)?, str_arg(path, "path")?) };
        chat.add_image(path);
        Ok(0)
    })
}

/// Adds an image as RGB8 pixels (`width × height × 3` bytes, row-major), copied. 0, or -1 on
/// error.
///
/// # Safety
/// `chat` is a live handle; `rgb` points to `width * height * 3` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn cspl_chat_add_image_rgb(chat: *mut cspl_chat, rgb: *const u8, width: u32, height: u32) -> c_int {
    guard(-1, || {
        // SAFETY: per this function's contract.
        let chat = unsafe { chat_mut(chat)? };
        if rgb.is_null() {
            return Err("rgb is NULL".into());
        }
        let n = u64::from(width) * u64::from(height) * 3;
        if width == 0 || height == 0 || n > (crate::engine::image::MAX_MAX_PIXELS * 3) {
            return Err(format!("{width} × {height} pixels is not a valid image size"));
        }
        // SAFETY: `rgb` holds width·height·3 readable bytes (the caller's contract; the size is
        // bounded above).
        let pixels = unsafe { std::slice::from_raw_parts(rgb, n as usize) }.to_vec();
        let k = chat.stats().n_images + 1;
        chat.add_image_data(ImageData::Rgb { name: format!("RGB buffer {k}"), width, height, rgb: Arc::new(pixels) });
        Ok(0)
    })
}

/// Answers `question` from the chat (reading and pruning the images first, the first time);
/// `cb` (may be NULL) gets each piece of the answer and can stop it. Returns the number of
/// tokens generated (>= 0), or -1 on error (the chat holds what it held before).
///
/// # Safety
/// `chat` is a live handle; `question` a NUL-terminated string; `cb` NULL or a function that
/// may be called with `user_data` during this call.
#[no_mangle]
pub unsafe extern "C" fn cspl_chat_ask(chat: *mut cspl_chat, question: *const c_char, cb: cspl_token_cb, user_data: *mut c_void) -> c_int {
    guard(-1, || {
        // SAFETY: per this function's contract.
        let (chat, question) = unsafe { (chat_mut(chat)?, str_arg(question, "question")?) };
        let mut on_event = |e: ChatEvent<'_>| {
            let (ChatEvent::Text(piece), Some(f)) = (e, cb) else { return Flow::Continue };
            let Ok(c) = CString::new(piece.replace('\0', "")) else { return Flow::Continue };
            // SAFETY: `c` is NUL-terminated and alive for the call; `f` and `user_data` are the
            // caller's, valid during cspl_chat_ask.
            if unsafe { f(c.as_ptr(), user_data) } == 0 {
                Flow::Continue
            } else {
                Flow::Stop
            }
        };
        let answer = chat.ask(question, &mut on_event).map_err(|e| e.to_string())?;
        Ok(c_int::try_from(answer.n_tokens).unwrap_or(c_int::MAX))
    })
}

/// Forgets the chat's images, turns and cache. 0, or -1 on error.
///
/// # Safety
/// `chat` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn cspl_chat_reset(chat: *mut cspl_chat) -> c_int {
    guard(-1, || {
        // SAFETY: per this function's contract.
        unsafe { chat_mut(chat)? }.reset();
        Ok(0)
    })
}

/// Saves the chat to a file (see `Chat::save`). 0, or -1 on error.
///
/// # Safety
/// `chat` is a live handle; `path` a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn cspl_chat_save(chat: *mut cspl_chat, path: *const c_char) -> c_int {
    guard(-1, || {
        // SAFETY: per this function's contract.
        let (chat, path) = unsafe { (chat_mut(chat)?, str_arg(path, "path")?) };
        chat.save(std::path::Path::new(path)).map_err(|e| e.to_string())?;
        Ok(0)
    })
}

/// Loads a chat `cspl_chat_save` wrote, for the engine's model (the file brings its context,
/// template and sampling settings). NULL on error (another model, a damaged file).
///
/// # Safety
/// `engine` is a live handle; `path` a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn cspl_chat_load(engine: *const cspl_engine, path: *const c_char) -> *mut cspl_chat {
    guard(std::ptr::null_mut(), || {
        if engine.is_null() {
            return Err("engine is NULL".into());
        }
        // SAFETY: per this function's contract.
        let (engine, path) = unsafe { (&*engine, str_arg(path, "path")?) };
        let chat = Chat::load(Arc::clone(&engine.engine), std::path::Path::new(path), ChatConfig::default()).map_err(|e| e.to_string())?;
        Ok(Box::into_raw(Box::new(cspl_chat { chat })))
    })
}
