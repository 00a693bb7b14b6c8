//! The commands, one file each, and what they share: loading the engine from the model flags,
//! progress bars, Ctrl-C, and the error kinds that decide the exit code (usage errors 2,
//! interruption 130, a reader gone away 0).

pub mod bench;
mod bench_plot;
pub mod calibrate;
pub mod chat;
pub mod demo;
pub mod eval;
pub mod layout;
pub mod plan;
pub mod plot;
pub mod run;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use csp_llava::config::{default_threads, ModelConfig, ALL_LAYERS};
use csp_llava::gguf::{families, shapes, tiny};
use csp_llava::Engine;
use indicatif::{ProgressBar, ProgressStyle};

use crate::args::{self, ModelFlags};
use crate::hub;

/// Ctrl-C stopped the run (exit 130, as a shell reports SIGINT).
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// A flag value out of range or flags that contradict each other: a usage error, exit 2 like
/// clap's own (a value that does not parse), so the same kind of mistake always exits the same.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub csp_llava::Error);

/// Checks of flag values before anything is loaded; their failures are usage errors.
pub fn usage(r: csp_llava::Result<()>) -> Result<()> {
    r.map_err(|e| Usage(e).into())
}

/// Every policy × budget of a bench/eval grid, checked before anything is loaded.
fn usage_grid(cfg: &csp_llava::PolicyConfig, policies: &[csp_llava::policy::PolicySpec], budgets: &[csp_llava::Budget]) -> Result<()> {
    for spec in policies {
        for b in budgets {
            usage(spec.config(cfg, *b).validate())?;
        }
    }
    Ok(())
}

/// The reader of stdout went away (`csp-llava … | head`): stop quietly, exit 0.
#[derive(Debug, thiserror::Error)]
#[error("broken pipe")]
pub struct ReaderGone;

/// Writes to stdout; a closed pipe becomes [`ReaderGone`], other failures (a full disk) errors.
fn out_err(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        ReaderGone.into()
    } else {
        anyhow::Error::new(e).context("cannot write the output")
    }
}

/// Ctrl-C during a run: the first asks the engine to stop at its next check (between chunks and
/// tokens, and inside llama.cpp's graph evaluation), so the answer so far and the timing line
/// are printed and the exit code is 130. Where nothing checks within a second (llama.cpp loading
/// the model, the vision encoder on a large image), or on a second Ctrl-C, the process ends at
/// once with 130.
fn install_interrupt(cancel: &csp_llava::CancelHandle) {
    let cancel = cancel.clone();
    let installed = ctrlc::set_handler(move || {
        if cancel.is_cancelled() {
            eprintln!("\ncsp-llava: interrupted");
            csp_llava::llama::exit_now(130);
        }
        cancel.cancel();
        std::thread::spawn(|| {
            std::thread::sleep(std::time::Duration::from_millis(900));
            let _ = std::io::stdout().flush();
            eprintln!("\ncsp-llava: interrupted");
            csp_llava::llama::exit_now(130);
        });
    });
    if let Err(e) = installed {
        tracing::debug!("no Ctrl-C handler: {e}");
    }
}

/// `-hf`'s model and projector (an explicit `--mmproj` wins over the repository's).
fn hf_pair(hf: &args::HfArgs, mmproj: Option<&PathBuf>) -> Result<(PathBuf, PathBuf)> {
    let files = hub::resolve(hf)?;
    let repo = hf.hf_repo.as_deref().unwrap_or_default();
    let mmproj = match (mmproj, files.mmproj) {
        (Some(p), _) => p.clone(),
        (None, Some(p)) => p,
        (None, None) => {
            bail!("the repository {repo} has no mmproj*.gguf projector; give one with --mmproj")
        }
    };
    Ok((files.model, mmproj))
}

/// `csp-llava gen-tiny-model DIR`.
pub fn gen_tiny_model(dir: &Path, seed: u64, family: families::Family) -> Result<()> {
    families::write_family(dir, family, seed).with_context(|| format!("cannot write the tiny model into {}", dir.display()))?;
    println!("{}", dir.join(tiny::TEXT_FILE).display());
    println!("{}", dir.join(tiny::MMPROJ_FILE).display());
    for i in 0..tiny::N_SAMPLE_IMAGES {
        println!("{}", dir.join(tiny::image_file(i)).display());
    }
    Ok(())
}

/// `csp-llava gen-model DIR --shape S --quant Q`.
pub fn gen_model(dir: &Path, shape: shapes::Shape, quant: shapes::Quant, layers: Option<u32>, seed: u64) -> Result<()> {
    let t0 = std::time::Instant::now();
    let w = shapes::write(dir, shape, quant, seed, layers).with_context(|| format!("cannot write the {} model into {}", shape.name(), dir.display()))?;
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    eprintln!(
        "csp-llava: wrote {} ({:.2} GiB of weights) and {} ({:.2} GiB) in {:.1} s; random weights: speed and memory only",
        w.text.display(),
        gib(w.text_tensor_bytes),
        w.mmproj.display(),
        gib(w.mmproj_tensor_bytes),
        t0.elapsed().as_secs_f64()
    );
    println!("{}", w.text.display());
    println!("{}", w.mmproj.display());
    Ok(())
}

/// The tiny model's directory (written once per process) for commands run without -m.
fn tiny_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join("csp-llava-demo");
    tiny::write_all(&dir, 0).with_context(|| format!("cannot write the tiny model into {}", dir.display()))?;
    Ok(dir)
}

/// The model and projector the flags name: `-m`/`--mmproj`, `-hf`, or (`tiny_default`, for
/// bench/eval/calibrate) the built-in tiny model when neither is given.
fn model_files(a: &ModelFlags, tiny_default: bool) -> Result<(PathBuf, PathBuf)> {
    Ok(match (a.model.as_ref(), a.mmproj.as_ref()) {
        (None, p) if a.hf.hf_repo.is_some() => hf_pair(&a.hf, p)?,
        (Some(m), Some(p)) => (m.clone(), p.clone()),
        (None, None) if tiny_default => {
            let d = tiny_dir()?;
            eprintln!("csp-llava: no -m given: using the built-in tiny model in {}", d.display());
            (d.join(tiny::TEXT_FILE), d.join(tiny::MMPROJ_FILE))
        }
        (None, None) => bail!("missing -m/--model (the text model GGUF); try `csp-llava demo` or `csp-llava --help`"),
        (Some(m), None) => bail!("missing --mmproj (the multimodal projector GGUF that belongs to {})", m.display()),
        (None, Some(_)) => bail!("missing -m/--model (the text model GGUF)"),
    })
}

/// What `Engine::load` needs, from the model flags.
fn model_config(a: &ModelFlags, tiny_default: bool) -> Result<ModelConfig> {
    let (model, mmproj) = model_files(a, tiny_default)?;
    Ok(ModelConfig { model, mmproj, n_gpu_layers: a.ngl().unwrap_or(ALL_LAYERS), threads: a.threads().unwrap_or_else(default_threads).max(1), use_mmap: !a.no_mmap })
}

/// Loads the engine for bench/eval/calibrate (the tiny model without -m).
fn load(a: &ModelFlags) -> Result<Engine> {
    Ok(Engine::load(&model_config(a, true)?)?)
}

/// Reads a small text file given on the command line (a regular file of at most 16 MiB).
fn read_text_file(path: &Path, what: &'static str) -> Result<String> {
    Ok(csp_llava::input::read_text(path, what, csp_llava::input::limits::TEXT)?)
}

/// A progress bar on stderr when it is a terminal and no logs are asked for; `template` names
/// `{pos}`/`{len}`; `None` = a spinner with `msg`.
fn progress(verbose: u8, template: Option<&'static str>, msg: &'static str) -> ProgressBar {
    if !std::io::stderr().is_terminal() || verbose > 0 {
        return ProgressBar::hidden();
    }
    match template {
        None => {
            let pb = ProgressBar::new_spinner().with_message(msg);
            pb.enable_steady_tick(std::time::Duration::from_millis(120));
            pb
        }
        Some(t) => ProgressBar::new(0).with_message(msg).with_style(ProgressStyle::with_template(t).expect("valid template").progress_chars("=> ")),
    }
}

