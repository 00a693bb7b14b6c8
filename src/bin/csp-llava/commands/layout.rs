//! `csp-llava prompt-layout` (hidden): how prompts are laid out for a model — text token ids and
//! image slots — one JSON line per input line, for the projector training.

use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use csp_llava::config::{ModelConfig, Request};
use csp_llava::gguf::tiny;
use csp_llava::Engine;

/// More images than any training prompt has; a bound on what one input line may ask for.
const MAX_IMAGES: u64 = 1024;

pub fn prompt_layout(model: &Path, mmproj: &Path) -> Result<()> {
    let mut cfg = ModelConfig::new(model, mmproj);
    cfg.threads = 1;
    let engine = Engine::load(&cfg)?;
    let blank = std::env::temp_dir().join(format!("csp-llava-blank-{}.png", std::process::id()));
    tiny::write_png(&blank, 112, &vec![128u8; 112 * 112 * 3])?;
    let res = layout_lines(&engine, &blank);
    let _ = std::fs::remove_file(&blank);
    res
}

fn layout_lines(engine: &Engine, blank: &Path) -> Result<()> {
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line).context("each input line is {\"prompt\": …, \"n_images\": K}")?;
        let n = v["n_images"].as_u64().unwrap_or(0);
        if n > MAX_IMAGES {
            bail!("n_images {n} is more than {MAX_IMAGES}");
        }
        let req = Request {
            images: vec![blank.to_owned(); n as usize],
            prompt: v["prompt"].as_str().unwrap_or_default().to_owned(),
            raw: v["raw"].as_bool().unwrap_or(false),
            image_label: v["image_label"].as_str().map(str::to_owned),
            ..Default::default()
        };
        let prompt = engine.prepare(&req)?;
        let chunks: Vec<serde_json::Value> = (0..prompt.spans.len())
            .map(|i| {
                let c = prompt.chunks.get(i).expect("one chunk per span");
                match c.text_tokens() {
                    Some(t) => serde_json::json!({ "text": t }),
                    None => serde_json::json!({ "image": c.n_tokens() }),
                }
            })
            .collect();
        writeln!(out, "{}", serde_json::json!({ "chunks": chunks }))?;
    }
    Ok(())
}
