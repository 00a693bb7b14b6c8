//! `csp-llava chat` (and `-cnv`): a conversation about images read and pruned once. Questions
//! and commands come one per line from standard input — a terminal or a pipe, so it can be
//! scripted; answers stream to stdout, a timing line per answer to stderr.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::Arc;

use anyhow::{Context, Result};
use csp_llava::engine::{human_bytes, StopReason};
use csp_llava::{Chat, ChatConfig, ChatEvent, Engine, Flow};

use super::{model_config, out_err, progress, read_text_file, usage};
use crate::args::RunArgs;

const HELP: &str = "commands: /image FILE (before the first question), /clear, /save FILE, /load FILE, /stats, /quit; anything else is a question";

/// Ctrl-C stops the answer being written; a second one (before the next answer) exits.
fn install_chat_interrupt(cancel: &csp_llava::CancelHandle) {
    let cancel = cancel.clone();
    if let Err(e) = ctrlc::set_handler(move || {
        if cancel.is_cancelled() {
            let _ = std::io::stdout().flush();
            eprintln!("\ncsp-llava: interrupted");
            csp_llava::llama::exit_now(130);
        }
        cancel.cancel();
    }) {
        tracing::debug!("no Ctrl-C handler: {e}");
    }
}

/// `csp-llava chat [flags]`.
pub fn chat(a: &RunArgs, verbose: u8) -> Result<()> {
    let sampling = a.sampling.sampling();
    usage(sampling.validate())?;
    let policy = a.policy().map_err(anyhow::Error::msg)?;
    usage(policy.validate())?;
    let mut ctx = a.ctx.context();
    let mcfg = model_config(&a.model, false)?;
    let first = match (&a.prompt.prompt, &a.prompt.file) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(f)) => Some(read_text_file(f, "prompt file")?),
        (None, None) => None,
    };
    let mut request = super::run::request_with(&a.prompt, String::new())?;
    if a.ctx.kv_max_cells == Some(crate::args::CapArg::Auto) {
        let planned = csp_llava::config::Request { prompt: first.clone().unwrap_or_default(), ..request.clone() };
        super::plan::resolve_auto_cap(&mcfg, &mut ctx, &planned, sampling.n_predict, a.ctx.mem)?;
    }
    usage(ctx.validate())?;
    let images = std::mem::take(&mut request.images);

    let cancel = csp_llava::CancelHandle::new();
    install_chat_interrupt(&cancel);
    let spinner = progress(verbose, None, "loading model");
    let mut engine = Engine::load(&mcfg)?;
    spinner.finish_and_clear();
    engine.set_cancel_handle(cancel.clone());
    let engine = Arc::new(engine);
    let cfg = ChatConfig { ctx, policy, sampling, request };
    let mut chat = Chat::new(Arc::clone(&engine), cfg.clone());
    for image in images {
        chat.add_image(image);
    }
    let terminal = std::io::stdin().is_terminal();
    if terminal {
        eprintln!("csp-llava chat — {HELP}; Ctrl-C stops an answer, twice exits");
    }
    let mut failed = false;
    let ask = |chat: &mut Chat, q: &str| -> Result<()> {
        cancel.reset();
        let mut stdout = std::io::stdout().lock();
        let mut write_err = None;
        let answer = chat.ask(q, &mut |e| match e {
            ChatEvent::Pruned { cells_before, cells_after, ms } => {
                eprintln!("[images read and pruned: {cells_before} -> {cells_after} cells, {ms:.0} ms]");
                Flow::Continue
            }
            ChatEvent::Text(t) => match stdout.write_all(t.as_bytes()).and_then(|()| stdout.flush()) {
                Ok(()) => Flow::Continue,
                Err(e) => {
                    write_err = Some(e);
                    Flow::Stop
                }
            },
            ChatEvent::Reading { .. } => Flow::Continue,
        });
        if let Some(e) = write_err {
            return Err(out_err(e));
        }
        let answer = answer?;
        writeln!(stdout).map_err(out_err)?;
        let stopped = if answer.stop == StopReason::Cancelled { " (stopped)" } else { "" };
        let tps = if answer.decode_ms > 0.0 { answer.n_tokens as f64 * 1e3 / answer.decode_ms } else { 0.0 };
        eprintln!(
            "[{} question tokens; {} tokens{stopped}; first token after {:.0} ms; {tps:.1} tok/s; {} cells]",
            answer.n_question_tokens, answer.n_tokens, answer.ttft_ms, answer.kv_cells
        );
        Ok(())
    };
    let report = |r: Result<()>, failed: &mut bool| -> Result<()> {
        match r {
            Err(e) if e.is::<super::ReaderGone>() => Err(e),
            Err(e) => {
                *failed = true;
                eprintln!("csp-llava: error: {}", crate::message(&e));
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    };
    if let Some(q) = first {
        let r = ask(&mut chat, &q);
        report(r, &mut failed)?;
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if terminal {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("cannot read standard input")?;
        let line = line.trim();
        match line.split_once(' ').map_or((line, ""), |(c, r)| (c, r.trim())) {
            ("", _) => {}
            ("/quit" | "/exit", _) => break,
            ("/help", _) => eprintln!("{HELP}"),
            ("/clear", _) => {
                chat.reset();
                eprintln!("[cleared]");
            }
            ("/save" | "/load", "") => {
                failed = true;
                eprintln!("csp-llava: error: {line} needs a file");
            }
            ("/save", path) => match chat.save(std::path::Path::new(path)) {
                Ok(()) => eprintln!("[saved to {path}]"),
                Err(e) => {
                    failed = true;
                    eprintln!("csp-llava: error: {e}");
                }
            },
            ("/load", path) => match Chat::load(Arc::clone(&engine), std::path::Path::new(path), cfg.clone()) {
                Ok(c) => {
                    chat = c;
                    let s = chat.stats();
                    eprintln!("[loaded {path}: {} images, {} turns, {} cells]", s.n_images, s.n_turns, s.kv_cells);
                }
                Err(e) => {
                    failed = true;
                    eprintln!("csp-llava: error: {e}");
                }
            },
            ("/image", "") => {
                failed = true;
                eprintln!("csp-llava: error: /image needs a file");
            }
            ("/image", path) => {
                if chat.stats().n_turns > 0 {
                    failed = true;
                    eprintln!("csp-llava: error: images come before the first question: /clear, then add them");
                } else {
                    chat.add_image(path);
                }
            }
            ("/stats", _) => {
                let s = chat.stats();
                eprintln!(
                    "[{} images, {} turns; cache {} cells ({}); images' prompt {} -> {} cells]",
                    s.n_images,
                    s.n_turns,
                    s.kv_cells,
                    human_bytes(s.kv_bytes),
                    s.cells_before_pruning,
                    s.cells_after_pruning
                );
            }
            (cmd, _) if cmd.starts_with('/') => {
                failed = true;
                eprintln!("csp-llava: error: unknown command {cmd} ({HELP})");
            }
            _ => {
                let r = ask(&mut chat, line);
                report(r, &mut failed)?;
            }
        }
    }
    if failed && !terminal {
        anyhow::bail!("some lines of the chat failed (see above)");
    }
    Ok(())
}
