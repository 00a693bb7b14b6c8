//! A conversation about images read once: [`Chat`] reads its images, prunes the cache with the
//! policy before any question is known (question-agnostic: the policy's window is the chat
//! template's framing after the images, as in the bounded prefill), then answers every
//! question from the pruned cache, reading only the new text of each turn. Answers are appended
//! to the cache, so follow-up questions see the conversation.
//!
//! ```no_run
//! use std::sync::Arc;
//! use csp_llava::{Chat, ChatConfig, ChatEvent, Engine, Flow, ModelConfig};
//!
//! let engine = Arc::new(Engine::load(&ModelConfig::new("text.gguf", "mmproj.gguf"))?);
//! let mut chat = Chat::new(engine, ChatConfig::default());
//! chat.add_image("a.png");
//! chat.add_image("b.png");
//! for q in ["Which image shows a circle?", "What color is it?"] {
//!     let answer = chat.ask(q, &mut |e| {
//!         if let ChatEvent::Text(t) = e {
//!             print!("{t}");
//!         }
//!         Flow::Continue
//!     })?;
//!     println!("\n({} tokens, {:.0} ms to the first token)", answer.n_tokens, answer.ttft_ms);
//! }
//! # Ok::<(), csp_llava::Error>(())
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::event::ms;
use super::prompt::{format_messages, place_markers};
use super::template::Message;
use super::{Engine, Event, PrefillMode, Session, StopReason};
use crate::config::{ContextConfig, ImageData, Request, SamplingConfig, DEFAULT_IMAGE_LABEL};
use crate::error::{Error, Result};
use crate::policy::{Budget, PolicyConfig, PolicyKind};

/// What the chat's images become before the first question: a stand-in question whose text is
/// never read (only what precedes it is), so the pruning cannot depend on a question.
const STAND_IN: &str = "?";

/// How a [`Chat`] runs: its context, policy, sampling and prompt settings.
#[derive(Debug, Clone)]
pub struct ChatConfig {
    /// The context (`n_ctx` 0: 4096 cells, or the model's trained context if smaller). A cap
    /// (`kv_max_cells`) bounds the cache while the images are read.
    pub ctx: ContextConfig,
    /// The policy that prunes the images once they are read (default: CSP at 0.2).
    pub policy: PolicyConfig,
    /// Sampling of every answer (`n_predict` per answer; the seed is fixed per chat, so the
    /// same chat gives the same answers).
    pub sampling: SamplingConfig,
    /// Template and image settings: `system`, `chat_template`, `jinja`, `raw`, `image_label`,
    /// `max_image_pixels` (its `images` and `prompt` are ignored).
    pub request: Request,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            ctx: ContextConfig::default(),
            policy: PolicyConfig { kind: PolicyKind::Csp, budget: Budget::Fraction(0.2), ..PolicyConfig::default() },
            sampling: SamplingConfig { n_predict: 256, seed: Some(0), ..SamplingConfig::default() },
            request: Request::default(),
        }
    }
}

/// What [`Chat::ask`] reports while it works.
#[derive(Debug)]
pub enum ChatEvent<'a> {
    /// Images being read: chunks and tokens done of all.
    Reading {
        /// Chunks done.
        chunk: usize,
        /// All chunks.
        n_chunks: usize,
    },
    /// The images were read and pruned (once per chat, before the first answer).
    Pruned {
        /// Cells the images' prompt took before pruning.
        cells_before: u32,
        /// Cells kept.
        cells_after: u32,
        /// Milliseconds encoding, reading and pruning.
        ms: f64,
    },
    /// A piece of the answer.
    Text(&'a str),
}

/// The callback's answer: go on, or stop the answer here (not an error: the chat stays usable
/// and the answer so far is part of the conversation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Go on.
    Continue,
    /// Stop the answer after this piece.
    Stop,
}

/// One answer of a [`Chat`].
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The text.
    pub text: String,
    /// Tokens generated.
    pub n_tokens: usize,
    /// Why it stopped ([`StopReason::Cancelled`] when the callback said [`Flow::Stop`]).
    pub stop: StopReason,
    /// Tokens read for the question (the new turn's text only).
    pub n_question_tokens: usize,
    /// Milliseconds from the call to the first token (reading the images the first time
    /// included).
    pub ttft_ms: f64,
    /// Milliseconds generating.
    pub decode_ms: f64,
    /// Cells the cache holds after the answer.
    pub kv_cells: u32,
}

/// What a chat holds: [`Chat::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ChatStats {
    /// Images read.
    pub n_images: usize,
    /// Questions answered.
    pub n_turns: usize,
    /// Cells in the cache.
    pub kv_cells: u32,
    /// K+V bytes of those cells.
    pub kv_bytes: u64,
    /// Cells the images' prompt took before pruning (0 before the images are read).
    pub cells_before_pruning: u32,
    /// Cells kept of it.
    pub cells_after_pruning: u32,
    /// Old turns removed from the cache to make room for new ones (the images stay).
    pub turns_evicted: usize,
}

/// A conversation over images read and pruned once; see the module docs.
pub struct Chat {
    engine: Arc<Engine>,
    cfg: ChatConfig,
    images: Vec<ImageData>,
    session: Option<Session<'static>>,
    /// The conversation's turns (user, assistant, …); the first user turn holds the images.
    turns: Vec<Message>,
    /// The template text the cache holds.
    cached: String,
    stats: ChatStats,
    /// Per-layer/per-head masks, decode sinks or decode-time eviction shape the cache: a state
    /// file cannot carry them.
    overrides: bool,
    /// Positions `[p0, p1)` of each turn still in the cache (question and answer), oldest first.
    turn_spans: std::collections::VecDeque<(i32, i32)>,
}

impl std::fmt::Debug for Chat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chat").field("images", &self.images).field("turns", &self.turns.len()).field("stats", &self.stats).finish_non_exhaustive()
    }
}

impl Chat {
    /// A chat with nothing in it yet.
    #[must_use]
    pub fn new(engine: Arc<Engine>, cfg: ChatConfig) -> Self {
        let mut cfg = cfg;
        // a fixed seed: the same chat (and a saved one, loaded) gives the same answers
        cfg.sampling.seed.get_or_insert_with(|| {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            (t.as_nanos() as u32) ^ std::process::id()
        });
        Self { engine, cfg, images: Vec::new(), session: None, turns: Vec::new(), cached: String::new(), stats: ChatStats::default(), overrides: false, turn_spans: std::collections::VecDeque::new() }
    }

    /// Adds an image file, read with the others at [`Chat::read_images`] or the first question.
    /// Images come before the conversation: once they are read, adding one is an error of
    /// [`Chat::ask`] until [`Chat::reset`].
    pub fn add_image(&mut self, path: impl Into<PathBuf>) {
        self.images.push(ImageData::File(path.into()));
    }

    /// Adds an image held in memory (an encoded file's bytes, or RGB pixels), like
    /// [`Chat::add_image`]; it is checked and decoded when the images are read.
    pub fn add_image_data(&mut self, image: ImageData) {
        self.images.push(image);
    }

    /// What the chat holds.
    #[must_use]
    pub fn stats(&self) -> ChatStats {
        let mut s = self.stats;
        if let Some(session) = &self.session {
            let kv = session.kv_info();
            s.kv_cells = kv.n_used;
            s.kv_bytes = u64::from(kv.n_used) * kv.bytes_per_cell();
        }
        s
    }

    /// The conversation so far: (role, text) pairs, images as their markers.
    #[must_use]
    pub fn transcript(&self) -> Vec<(String, String)> {
        self.turns.iter().map(|m| (m.role.clone(), m.content.clone())).collect()
    }

    /// Forgets everything: images, turns and the cache.
    pub fn reset(&mut self) {
        self.images.clear();
        self.session = None;
        self.turns.clear();
        self.cached.clear();
        self.stats = ChatStats::default();
        self.overrides = false;
        self.turn_spans.clear();
    }

    fn ctx(&self) -> ContextConfig {
        let mut ctx = self.cfg.ctx.clone();
        if ctx.n_ctx == 0 {
            ctx.n_ctx = 4096.min(self.engine.model().n_ctx_train().max(1));
        }
        ctx.kv_shrink = false;
        ctx
    }

    fn user_text(&self, question: &str) -> Result<String> {
        let label = self.cfg.request.image_label.as_deref().unwrap_or(DEFAULT_IMAGE_LABEL);
        place_markers(question, self.images.len(), label)
    }

    fn render(&self, turns: &[Message]) -> Result<String> {
        if self.cfg.request.raw {
            return Ok(turns.iter().map(|m| m.content.as_str()).collect());
        }
        format_messages(self.engine.model(), &self.cfg.request, turns)
    }

    /// Reads the images and prunes the cache with the policy, before any question (done by the
    /// first [`Chat::ask`] otherwise). Nothing to do without images or once they are read.
    ///
    /// # Errors
    /// Unreadable images, a prompt that does not fit, policy and llama.cpp failures.
    pub fn read_images(&mut self, on_event: &mut dyn FnMut(ChatEvent<'_>) -> Flow) -> Result<()> {
        if self.session.is_some() || self.images.is_empty() {
            return Ok(());
        }
        let t = Instant::now();
        let ctx = self.ctx();
        let req = Request { images: Vec::new(), image_data: self.images.clone(), prompt: STAND_IN.into(), ..self.cfg.request.clone() };
        let mut prompt = self.engine.prepare_for(&req, &ctx)?;
        if !prompt.defer_question() {
            return Err(Error::Prompt("the chat template puts nothing after the images; a chat needs the question after them".into()));
        }
        // the stand-in question is never read: the cache holds the template up to the last image
        prompt.deferred.clear();
        let plan = self.engine.plan(&prompt, &self.cfg.policy)?;
        let n_predict = self.cfg.sampling.n_predict.max(0);
        let pre = self.engine.prefill_pruned_shared(&prompt, &ctx, &plan, n_predict, PrefillMode::Chunked, &mut |e| {
            if let Event::Prefill { chunk, n_chunks, .. } = e {
                let _ = on_event(ChatEvent::Reading { chunk, n_chunks });
            }
        })?;
        let marker = crate::llama::marker();
        let text = self.render(&[Message::new("user", self.user_text(STAND_IN)?)])?;
        let end = text.rfind(marker).map(|i| i + marker.len()).ok_or_else(|| Error::Prompt("the chat template dropped the images".into()))?;
        self.cached = text[..end].to_owned();
        self.stats.n_images = self.images.len();
        self.stats.cells_before_pruning = pre.kv_before.n_used;
        self.stats.cells_after_pruning = pre.session.kv_info().n_used;
        self.overrides = pre.pruning.retention.as_ref().is_some_and(|r| r.per_head.is_some()) || plan.decode_sink.is_some() || pre.session.decode_eviction.is_some();
        let _ = on_event(ChatEvent::Pruned { cells_before: self.stats.cells_before_pruning, cells_after: self.stats.cells_after_pruning, ms: ms(t) });
        self.session = Some(pre.session);
        Ok(())
    }

    /// Answers `question` from the chat's cache, reading only the new turn's text (and, the
    /// first time, the images, pruned before the question is read). `on_event` sees progress
    /// and each piece of the answer; [`Flow::Stop`] ends the answer there.
    ///
    /// # Errors
    /// An empty question, images added after the first question, a conversation that no
    /// longer fits the context, a chat template that rewrites earlier turns, llama.cpp failures.
    /// After an error the chat holds what it held before the call.
    pub fn ask(&mut self, question: &str, on_event: &mut dyn FnMut(ChatEvent<'_>) -> Flow) -> Result<Answer> {
        if question.trim().is_empty() {
            return Err(Error::Prompt("the question is empty".into()));
        }
        if self.stats.n_images != self.images.len() && self.session.is_some() {
            return Err(Error::Prompt("images can only be added before the first question; reset the chat to start over with more images".into()));
        }
        let t = Instant::now();
        self.read_images(on_event)?;
        let first = self.turns.is_empty();
        let content = if first { self.user_text(question)? } else { question.to_owned() };
        let mut turns = self.turns.clone();
        turns.push(Message::new("user", content));
        let text = self.render(&turns)?;
        let tail = text.strip_prefix(self.cached.as_str()).ok_or_else(|| {
            Error::Prompt("the chat template renders the earlier turns differently once a new one is added, so the cache cannot be extended; reset the chat".into())
        })?;
        if self.session.is_none() {
            // no images: the first turn is a text prompt of its own
            let ctx = self.ctx();
            let req = Request { prompt: question.to_owned(), ..self.cfg.request.clone() };
            let prompt = self.engine.prepare_for(&req, &ctx)?;
            let mut session = self.engine.session_shared(&prompt, &ctx, Vec::new())?;
            session.prefill(&prompt, PrefillMode::Chunked, &mut |_| {})?;
            self.session = Some(session);
            self.cached.clone_from(&text);
        }
        let session = self.session.as_mut().expect("set above");
        let snapshot = session.snapshot()?;
        // room for the new turn and its answer: the oldest turns leave the cache (the images and
        // the transcript stay; later turns are read from the full transcript's text)
        let need = self.engine.mtmd().tokenize_continuation(tail).map_or(0, |c| (0..c.len()).filter_map(|i| c.get(i)).filter_map(|c| c.text_tokens()).map(|t| t.len()).sum::<usize>())
            + usize::try_from(self.cfg.sampling.n_predict).unwrap_or(256).min(session.n_ctx() as usize / 4)
            + 1;
        let mut evicted = 0;
        while (session.n_ctx() as usize).saturating_sub(session.kv_info().n_used as usize) < need {
            let Some((p0, p1)) = self.turn_spans.pop_front() else { break };
            session.remove_positions(p0, p1)?;
            evicted += 1;
        }
        self.stats.turns_evicted += evicted;
        let turn_start = session.n_past();
        let n_question_tokens = if self.cached.len() == text.len() { 0 } else { session.eval_continuation(tail).inspect_err(|_| {
            let _ = session.restore(&snapshot);
        })? };
        let mut ttft = None;
        let generated = session.generate_until(&self.cfg.sampling, &mut |e| match e {
            Event::Text(piece) => {
                ttft.get_or_insert_with(|| ms(t));
                on_event(ChatEvent::Text(piece)) == Flow::Continue
            }
            Event::Prefill { .. } => true,
        });
        let generated = match generated {
            Ok(g) => g,
            Err(e) => {
                let _ = session.restore(&snapshot);
                return Err(e);
            }
        };
        // the cache holds every token shown except one generation stopped at without reading it
        if matches!(generated.stop, StopReason::Length | StopReason::Context) {
            if let Some(&last) = generated.tokens.last() {
                if !self.engine.model().is_eog(last) && session.decode_one(last).is_err() {
                    tracing::warn!("the context is full: the chat cannot take another turn");
                }
            }
        }
        self.turns = turns;
        self.turns.push(Message::new("assistant", generated.text.clone()));
        self.cached = text + &generated.text;
        self.stats.n_turns += 1;
        self.turn_spans.push_back((turn_start, session.n_past()));
        let kv_cells = session.kv_info().n_used;
        Ok(Answer {
            n_tokens: generated.tokens.len(),
            text: generated.text,
            stop: generated.stop,
            n_question_tokens,
            ttft_ms: ttft.unwrap_or_else(|| ms(t)),
            decode_ms: generated.decode_ms,
            kv_cells,
        })
    }

    /// Saves the chat to `path` (written to a temporary file, then renamed): the pruned cache,
    /// the transcript, the template text the cache holds, the sampling settings (with the
    /// seed) and what identifies the model; [`Chat::load`] continues it, in this process or
    /// another, with the same next answer.
    ///
    /// # Errors
    /// A chat whose images are not read yet, a cache shaped by per-layer/per-head masks or
    /// decode-time eviction (not in llama.cpp's state; prune at global granularity to save),
    /// I/O errors.
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        let session = self.session.as_ref().ok_or_else(|| Error::Prompt("nothing to save yet: the chat has not read its images or a question".into()))?;
        if self.overrides {
            return Err(Error::Unsupported { what: "saving this chat", reason: "its cache is pruned per layer or head (masks) or evicts while decoding, which the saved state cannot carry; use --kv-granularity global".into() });
        }
        let state = session.state_bytes()?;
        let meta = SavedChat {
            model: ModelId::of(&self.engine),
            n_ctx: session.n_ctx(),
            type_k: self.cfg.ctx.type_k.name().to_owned(),
            type_v: self.cfg.ctx.type_v.name().to_owned(),
            flash_attn: session.flash_attn(),
            sampling: self.cfg.sampling.clone(),
            system: self.cfg.request.system.clone(),
            chat_template: self.cfg.request.chat_template.clone(),
            jinja: self.cfg.request.jinja,
            raw: self.cfg.request.raw,
            image_label: self.cfg.request.image_label.clone(),
            policy: self.cfg.policy.kind.name().to_owned(),
            images: self.images.iter().map(ImageData::name).collect(),
            turns: self.transcript(),
            cached: self.cached.clone(),
            n_past: session.n_past(),
            n_cells: session.kv_info().n_used,
            state_fnv: fnv1a(&state),
            n_turns: self.stats.n_turns,
            turn_spans: self.turn_spans.iter().copied().collect(),
            turns_evicted: self.stats.turns_evicted,
            cells_before_pruning: self.stats.cells_before_pruning,
            cells_after_pruning: self.stats.cells_after_pruning,
        };
        let json = serde_json::to_vec(&meta).map_err(|e| Error::Prompt(format!("cannot encode the chat: {e}")))?;
        let io = |e: std::io::Error| Error::Write { what: "chat file", path: path.to_path_buf(), cause: e };
        let tmp = path.with_extension("tmp-csp-llava");
        let written = (|| -> Result<()> {
            use std::io::Write;
            let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
            f.write_all(CHAT_MAGIC).map_err(io)?;
            f.write_all(&CHAT_VERSION.to_le_bytes()).map_err(io)?;
            f.write_all(&(json.len() as u64).to_le_bytes()).map_err(io)?;
            f.write_all(&json).map_err(io)?;
            f.write_all(&(state.len() as u64).to_le_bytes()).map_err(io)?;
            f.write_all(&state).map_err(io)?;
            f.into_inner().map_err(|e| io(e.into_error()))?.sync_all().map_err(io)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Loads a chat [`Chat::save`] wrote, for `engine` (the same model). The context geometry,
    /// chat template settings and sampling come from the file; `cfg` gives the rest (threads of
    /// the engine, policy for nothing: the images are read already).
    ///
    /// # Errors
    /// A file that is not a chat file, of another version, damaged, or saved with another model.
    pub fn load(engine: Arc<Engine>, path: &std::path::Path, cfg: ChatConfig) -> Result<Self> {
        let bytes = crate::input::read_bounded(path, "chat file", MAX_CHAT_FILE)?;
        let bad = |why: &str| Error::Prompt(format!("{} is not a csp-llava chat file ({why})", path.display()));
        let take = |at: &mut usize, n: usize| -> Result<&[u8]> {
            let s = bytes.get(*at..at.checked_add(n).ok_or_else(|| bad("truncated"))?).ok_or_else(|| bad("truncated"))?;
            *at += n;
            Ok(s)
        };
        let mut at = 0;
        if take(&mut at, CHAT_MAGIC.len())? != CHAT_MAGIC {
            return Err(bad("no CSPLCHAT header"));
        }
        let version = u32::from_le_bytes(take(&mut at, 4)?.try_into().expect("4 bytes"));
        if version != CHAT_VERSION {
            return Err(Error::Prompt(format!("{} is a chat file of version {version}; this csp-llava reads version {CHAT_VERSION}", path.display())));
        }
        let len = |at: &mut usize| -> Result<usize> { usize::try_from(u64::from_le_bytes(take(at, 8)?.try_into().expect("8 bytes"))).map_err(|_| bad("a length overflows")) };
        let n = len(&mut at)?;
        let meta: SavedChat = serde_json::from_slice(take(&mut at, n)?).map_err(|e| bad(&format!("its header does not parse: {e}")))?;
        let n = len(&mut at)?;
        let state = take(&mut at, n)?;
        if at != bytes.len() {
            return Err(bad("bytes after the cache"));
        }
        if fnv1a(state) != meta.state_fnv {
            return Err(Error::Prompt(format!("{} is damaged: its cache does not match its checksum", path.display())));
        }
        let here = ModelId::of(&engine);
        if meta.model != here {
            return Err(Error::Config {
                field: "model",
                reason: format!("{} was saved with another model ({}); this one is {}", path.display(), meta.model, here),
            });
        }
        let parse_type = |t: &str| t.parse().map_err(|_| bad(&format!("unknown cache type {t}")));
        let mut cfg = cfg;
        cfg.ctx.n_ctx = meta.n_ctx;
        cfg.ctx.type_k = parse_type(&meta.type_k)?;
        cfg.ctx.type_v = parse_type(&meta.type_v)?;
        cfg.ctx.flash_attn = if meta.flash_attn { crate::config::FlashAttn::On } else { crate::config::FlashAttn::Off };
        cfg.ctx.kv_max_cells = None;
        cfg.sampling = meta.sampling.clone();
        cfg.request = Request { system: meta.system.clone(), chat_template: meta.chat_template.clone(), jinja: meta.jinja, raw: meta.raw, image_label: meta.image_label.clone(), ..Request::default() };
        let mut chat = Chat::new(Arc::clone(&engine), cfg);
        let ctx = chat.ctx();
        // an empty context of the saved geometry, then the saved cells
        let stub = engine.prepare_for(&Request { prompt: "x".into(), raw: true, ..Request::default() }, &ctx)?;
        let mut session = engine.session_shared(&stub, &ctx, Vec::new())?;
        session.load_state_bytes(state, meta.n_past)?;
        if session.kv_info().n_used != meta.n_cells {
            return Err(Error::Prompt(format!("{}: llama.cpp restored {} of its {} cells", path.display(), session.kv_info().n_used, meta.n_cells)));
        }
        chat.images = meta.images.iter().map(|n| ImageData::File(n.into())).collect();
        chat.turns = meta.turns.iter().map(|(r, c)| Message::new(r, c.as_str())).collect();
        chat.cached = meta.cached;
        chat.stats = ChatStats {
            n_images: meta.images.len(),
            n_turns: meta.n_turns,
            cells_before_pruning: meta.cells_before_pruning,
            cells_after_pruning: meta.cells_after_pruning,
            turns_evicted: meta.turns_evicted,
            ..ChatStats::default()
        };
        chat.turn_spans = meta.turn_spans.iter().copied().collect();
        chat.session = Some(session);
        Ok(chat)
    }
}

/// The first bytes of a chat file, then [`CHAT_VERSION`] (u32 LE), the JSON header's length
/// (u64 LE), the header ([`SavedChat`]), the cache state's length (u64 LE) and the state
/// (llama.cpp's sequence state).
const CHAT_MAGIC: &[u8; 8] = b"CSPLCHAT";
const CHAT_VERSION: u32 = 1;
/// Largest chat file read (the cache of a long chat with a 7B model is a few GB).
const MAX_CHAT_FILE: u64 = 64 << 30;

/// FNV-1a (64-bit) of `bytes`, in hex: a checksum (not a cryptographic hash) for chat files.
fn fnv1a(bytes: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// What identifies a model for a saved chat.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct ModelId {
    n_vocab: i32,
    n_layer: u32,
    n_embd: i32,
    n_head_kv: u32,
    /// Size of the text model file in bytes.
    file_bytes: u64,
    /// FNV-1a of the file's first 4 MiB (header and the first weights), in hex.
    head: String,
}

impl ModelId {
    fn of(engine: &Engine) -> Self {
        let m = engine.model();
        let path = &engine.config().model;
        let file_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let mut buf = Vec::with_capacity(4 << 20);
        if let Ok(f) = std::fs::File::open(path) {
            use std::io::Read;
            let _ = f.take(4 << 20).read_to_end(&mut buf);
        }
        Self { n_vocab: m.n_vocab(), n_layer: m.n_layer(), n_embd: m.n_embd(), n_head_kv: m.n_head_kv(), file_bytes, head: fnv1a(&buf) }
    }
}

impl std::fmt::Display for ModelId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} layers, width {}, vocabulary {}, {} bytes", self.n_layer, self.n_embd, self.n_vocab, self.file_bytes)
    }
}

/// A chat file's header.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SavedChat {
    model: ModelId,
    n_ctx: u32,
    type_k: String,
    type_v: String,
    flash_attn: bool,
    sampling: SamplingConfig,
    system: Option<String>,
    chat_template: Option<String>,
    jinja: bool,
    raw: bool,
    image_label: Option<String>,
    /// The policy that pruned the images (for the record).
    policy: String,
    images: Vec<String>,
    turns: Vec<(String, String)>,
    cached: String,
    n_past: i32,
    /// Cells of the cache.
    n_cells: u32,
    /// FNV-1a of the cache state, in hex.
    state_fnv: String,
    n_turns: usize,
    turn_spans: Vec<(i32, i32)>,
    turns_evicted: usize,
    cells_before_pruning: u32,
    cells_after_pruning: u32,
}
