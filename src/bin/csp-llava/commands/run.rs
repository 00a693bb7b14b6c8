//! The main command: one request — load, read the images and prompt, prune, stream the answer,
//! print the timing line.

use std::io::Write;

use anyhow::{bail, Context, Result};
use csp_llava::config::Request;
use csp_llava::engine::StopReason;
use csp_llava::{Engine, Event};

use super::{install_interrupt, model_config, out_err, progress, read_text_file, usage, Interrupted};
use crate::args::{CapArg, PromptFlags, RunArgs};

/// The request the prompt flags describe.
fn request(p: &PromptFlags) -> Result<Request> {
    let prompt = match (&p.prompt, &p.file) {
        (Some(text), _) => text.clone(),
        (None, Some(f)) => read_text_file(f, "prompt file")?,
        (None, None) => {
            bail!("missing prompt: give one with -p TEXT or -f FILE (or chat with -cnv)")
        }
    };
    request_with(p, prompt)
}

/// The prompt flags' settings (images, template, labels) with `prompt` as the text.
pub(crate) fn request_with(p: &PromptFlags, prompt: String) -> Result<Request> {
    let chat_template = match &p.chat_template_file {
        Some(f) => Some(read_text_file(f, "chat template file")?),
        None => p.chat_template.clone(),
    };
    Ok(Request {
        images: p.images.clone(),
        prompt,
        system: p.system.clone(),
        chat_template,
        raw: p.no_chat_template,
        jinja: p.jinja || p.chat_template_file.is_some(),
        max_image_pixels: p.image_max_mp,
        image_label: if p.no_image_labels { Some(String::new()) } else { p.image_label.clone() },
        image_data: Vec::new(),
    })
}

/// `csp-llava [flags]`.
pub fn run(a: &RunArgs, verbose: u8) -> Result<()> {
    let sampling = a.sampling.sampling();
    usage(sampling.validate())?;
    let policy = a.policy().map_err(anyhow::Error::msg)?;
    usage(policy.validate())?;
    let mut ctx = a.context();
    let mcfg = model_config(&a.model, false)?;
    let req = request(&a.prompt)?;
    // a missing image is an error before a model that takes a minute to load is loaded
    for image in &req.images {
        csp_llava::input::open_regular(image, "image")?;
    }
    let auto_cap = a.ctx.kv_max_cells == Some(CapArg::Auto);
    if a.dry_run {
        return super::plan::dry_run(&mcfg, &ctx, auto_cap, &req, sampling.n_predict, a.ctx.mem, a.json);
    }
    if auto_cap {
        super::plan::resolve_auto_cap(&mcfg, &mut ctx, &req, sampling.n_predict, a.ctx.mem)?;
    }
    usage(ctx.validate())?;
    // written after the run: make sure it can be, first
    let retention_file = a.dump_retention.as_ref().map(|p| std::fs::File::create(p).with_context(|| format!("cannot write {}", p.display()))).transpose()?;

    let cancel = csp_llava::CancelHandle::new();
    install_interrupt(&cancel);
    let spinner = progress(verbose, None, "loading model");
    let mut engine = Engine::load(&mcfg)?;
    spinner.finish_and_clear();
    engine.set_cancel_handle(cancel.clone());
    if cancel.is_cancelled() {
        return Err(Interrupted.into());
    }

    let bar = progress(verbose, Some("{msg} [{bar:30}] {pos}/{len} tok"), "prefill");
    let json = a.json;
    let mut stdout = std::io::stdout().lock();
    // the first failed write (the reader went away, a full disk) stops generation
    let mut write_err: Option<std::io::Error> = None;
    let mut on_event = |ev: Event<'_>| match ev {
        Event::Prefill { tokens, n_tokens, .. } => {
            bar.set_length(n_tokens as u64);
            bar.set_position(tokens as u64);
            if tokens == n_tokens {
                bar.finish_and_clear();
            }
        }
        Event::Text(t) if !json && write_err.is_none() => {
            if let Err(e) = stdout.write_all(t.as_bytes()).and_then(|()| stdout.flush()) {
                write_err = Some(e);
                cancel.cancel();
            }
        }
        _ => {}
    };
    let report = engine.run(&req, &ctx, &sampling, &policy, &mut on_event);
    bar.finish_and_clear();
    if let Some(e) = write_err {
        return Err(out_err(e));
    }
    let report = report?;
    let written = if json {
        serde_json::to_writer(&mut stdout, &report).map_err(std::io::Error::from).and_then(|()| writeln!(stdout))
    } else {
        writeln!(stdout)
    };
    written.and_then(|()| stdout.flush()).map_err(out_err)?;
    if let (Some(f), Some(path)) = (retention_file, &a.dump_retention) {
        write_retention(f, &report).with_context(|| format!("cannot write {}", path.display()))?;
    }
    eprintln!("{}", report.timing_line());
    if report.stop == StopReason::Cancelled {
        return Err(Interrupted.into());
    }
    Ok(())
}

/// `--dump-retention`: one JSON line per prompt position.
fn write_retention(file: std::fs::File, report: &csp_llava::RunReport) -> Result<()> {
    let mut w = std::io::BufWriter::new(file);
    for t in &report.retention {
        serde_json::to_writer(&mut w, t)?;
        writeln!(w)?;
    }
    w.flush()?;
    Ok(())
}
