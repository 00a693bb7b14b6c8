//! csp-llava: run quantized (GGUF) vision-language models through llama.cpp's multimodal path
//! (libmtmd) and prune their KV cache with Cross-Self Pruning (CSP) and the policies it competes
//! with.
//!
//! ```text
//! Request ─▶ engine::prompt (chat template, image markers, mtmd chunks → spans)
//!         ─▶ Session::prefill (chunk by chunk through llama::*, image encode timed apart)
//!         ─▶ stats (cb_eval on kq-<il> → AttentionSink) ─▶ policy (score, vote) ─▶ evict + compact
//!         ─▶ Session::generate (llama.cpp sampler chain, streamed text)
//!         ─▶ RunReport (--json; timing line)
//! ```
//!
//! * [`llama`] and [`capi`] (the C ABI, `include/csp_llava.h`) are the only modules with `unsafe`.
//! * [`gguf`] writes the deterministic tiny test model and reads GGUF headers for input checks.
//! * [`config`] holds settings with llama.cpp's defaults; the binary maps flags onto them.
//!
//! # Example: read images once, ask several questions
//!
//! ```no_run
//! use std::sync::Arc;
//! use csp_llava::{Chat, ChatConfig, ChatEvent, Engine, Flow, ModelConfig};
//!
//! // a text model and its projector (GGUF); the engine is Send + Sync
//! let engine = Arc::new(Engine::load(&ModelConfig::new("text.gguf", "mmproj.gguf"))?);
//! // CSP keeps 20% of the images' cache, pruned before any question is known
//! let mut chat = Chat::new(engine, ChatConfig::default());
//! chat.add_image("a.png");
//! chat.add_image("b.png");
//! for question in ["Which image shows a circle?", "What color is it?"] {
//!     let answer = chat.ask(question, &mut |event| {
//!         if let ChatEvent::Text(piece) = event {
//!             print!("{piece}");
//!         }
//!         Flow::Continue // Flow::Stop ends the answer here
//!     })?;
//!     println!("\n[{} tokens, {:.0} ms to the first]", answer.n_tokens, answer.ttft_ms);
//! }
//! chat.save(std::path::Path::new("talk.chat"))?; // Chat::load continues it, in another process too
//! # Ok::<(), csp_llava::Error>(())
//! ```
//!
//! One-shot requests: [`Engine::run`] (`examples/ask.rs`); an app's worker thread with a stop
//! button: `examples/embed_cancel.rs`; the C ABI: [`capi`].
#![deny(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]

pub mod bench;
pub mod cancel;
pub mod capi;
pub mod config;
pub mod engine;
pub mod error;
pub mod eval;
pub mod gguf;
pub mod input;
pub mod llama;
pub mod policy;
pub mod rng;
pub mod span;
pub mod stats;

pub use cancel::CancelHandle;
pub use config::{CacheType, ContextConfig, FlashAttn, KvCap, ModelConfig, Request, SamplingConfig};
pub use engine::{Answer, Chat, ChatConfig, ChatEvent, Engine, Event, Flow, Prompt, RunReport, Session};
pub use policy::{Budget, PolicyConfig, PolicyKind};
pub use error::{Error, Result};
