//! One question about images, answered from a cache pruned by CSP (20%), streamed.
//!
//!     cargo run --release --example ask -- models/cache/smolvlm-dino "Which image is red?" a.png b.png
//!
//! (a directory holding `text.gguf` and `mmproj.gguf`, the question, then images.)

use std::io::Write;

use csp_llava::{Budget, ContextConfig, Engine, Event, ModelConfig, PolicyConfig, PolicyKind, Request, SamplingConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().ok_or("usage: ask MODEL_DIR QUESTION IMAGE...")?);
    let question = args.next().ok_or("usage: ask MODEL_DIR QUESTION IMAGE...")?;
    let engine = Engine::load(&ModelConfig::new(dir.join("text.gguf"), dir.join("mmproj.gguf")))?;
    let request = Request { images: args.map(Into::into).collect(), prompt: question, ..Default::default() };
    let policy = PolicyConfig { kind: PolicyKind::Csp, budget: Budget::Fraction(0.2), ..Default::default() };
    let sampling = SamplingConfig { n_predict: 64, temp: 0.0, ..Default::default() };
    let report = engine.run(&request, &ContextConfig::default(), &sampling, &policy, &mut |e| {
        if let Event::Text(t) = e {
            print!("{t}");
            let _ = std::io::stdout().flush();
        }
    })?;
    println!();
    eprintln!("{}", report.timing_line());
    Ok(())
}
