//! An app's pattern: the engine and a chat live on a worker thread; the UI thread streams the
//! answer through a channel and cancels it after a few pieces (as a "stop" button would), then
//! asks again — the chat stays usable.
//!
//!     cargo run --release --example embed_cancel -- models/cache/smolvlm-dino a.png b.png

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use csp_llava::{Chat, ChatConfig, ChatEvent, Engine, Flow, ModelConfig};

enum Msg {
    Piece(String),
    Done(Result<usize, String>),
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().ok_or("usage: embed_cancel MODEL_DIR IMAGE...")?);
    let images: Vec<String> = args.collect();
    let engine = Arc::new(Engine::load(&ModelConfig::new(dir.join("text.gguf"), dir.join("mmproj.gguf")))?);
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let (qtx, qrx) = mpsc::channel::<String>();
    let worker = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut chat = Chat::new(engine, ChatConfig::default());
            for i in images {
                chat.add_image(i);
            }
            for q in qrx {
                stop.store(false, Ordering::SeqCst);
                let r = chat.ask(&q, &mut |e| {
                    if let ChatEvent::Text(t) = e {
                        let _ = tx.send(Msg::Piece(t.to_owned()));
                    }
                    if stop.load(Ordering::SeqCst) {
                        Flow::Stop
                    } else {
                        Flow::Continue
                    }
                });
                let _ = tx.send(Msg::Done(r.map(|a| a.n_tokens).map_err(|e| e.to_string())));
            }
        })
    };
    for (q, cancel_after) in [("Describe each image.", Some(3)), ("Which image shows a circle?", None)] {
        qtx.send(q.to_owned())?;
        let mut pieces = 0;
        for msg in &rx {
            match msg {
                Msg::Piece(p) => {
                    print!("{p}");
                    pieces += 1;
                    if Some(pieces) == cancel_after {
                        stop.store(true, Ordering::SeqCst); // the "stop" button
                    }
                }
                Msg::Done(r) => {
                    println!("\n[{q}: {r:?}]");
                    break;
                }
            }
        }
    }
    drop(qtx);
    worker.join().map_err(|_| "the worker panicked")?;
    Ok(())
}
