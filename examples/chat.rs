//! Prune once, ask several: the images are read and pruned (CSP, 20% of the cache) before any
//! question, then each question is answered from the pruned cache.
//!
//!     cargo run --release --example chat -- models/cache/smolvlm-dino a.png b.png
//!
//! (a directory holding `text.gguf` and `mmproj.gguf`, then images); questions come from
//! standard input, one per line.

use std::io::BufRead;
use std::sync::Arc;

use csp_llava::{Chat, ChatConfig, ChatEvent, Engine, Flow, ModelConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().ok_or("usage: chat MODEL_DIR IMAGE...")?);
    let engine = Arc::new(Engine::load(&ModelConfig::new(dir.join("text.gguf"), dir.join("mmproj.gguf")))?);
    let mut chat = Chat::new(engine, ChatConfig::default());
    for image in args {
        chat.add_image(image);
    }
    chat.read_images(&mut |e| {
        if let ChatEvent::Pruned { cells_before, cells_after, ms } = e {
            eprintln!("images read and pruned: {cells_before} -> {cells_after} cells in {ms:.0} ms");
        }
        Flow::Continue
    })?;
    for line in std::io::stdin().lock().lines() {
        let question = line?;
        if question.trim().is_empty() {
            continue;
        }
        let answer = chat.ask(&question, &mut |e| {
            if let ChatEvent::Text(piece) = e {
                print!("{piece}");
            }
            Flow::Continue
        })?;
        println!();
        eprintln!("[{} question tokens read, {} tokens, first after {:.0} ms, {} cells]", answer.n_question_tokens, answer.n_tokens, answer.ttft_ms, answer.kv_cells);
    }
    Ok(())
}
