//! `csp-llava`: the command-line front end. Parse → set up logging → run a command → exit code.
//!
//! * `args.rs` — the flags, in groups every command shares; `llama_flags.rs` — llama.cpp's
//!   multi-letter short flags and the ones csp-llava does not have;
//! * `commands/` — one file per command (`run`, `demo`, `bench`, `eval`, `calibrate`, `layout`)
//!   and what they share (loading, progress bars, Ctrl-C, error kinds);
//! * `hub.rs` — `-hf` downloads.
//!
//! Exit codes: 0 success (and a reader that went away), 1 bad input (one stderr line
//! `csp-llava: error: …`), 2 usage errors (the same one line), 130 Ctrl-C.

mod args;
mod commands;
mod hub;
mod llama_flags;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command};
use commands::{Interrupted, ReaderGone, Usage};

fn main() -> ExitCode {
    let argv = llama_flags::rewrite_llama_flags(std::env::args_os());
    if let Some(flag) = llama_flags::unsupported_llama_flag(&argv) {
        eprintln!("csp-llava: error: csp-llava does not support {flag} (yet)");
        return ExitCode::from(2);
    }
    let cli = match Cli::try_parse_from(argv) {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // one line, as every other error: clap's first line, without its usage block
            let msg = e.render().to_string();
            let first = msg.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ");
            eprintln!("csp-llava: error: {first} (see --help)");
            return ExitCode::from(2);
        }
    };
    init_tracing(cli.verbose);
    let result = dispatch(cli);
    let _ = std::io::stdout().flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Interrupted>() || matches!(e.downcast_ref::<csp_llava::Error>(), Some(csp_llava::Error::Cancelled)) => {
            eprintln!("csp-llava: interrupted");
            ExitCode::from(130)
        }
        Err(e) if e.is::<ReaderGone>() => ExitCode::SUCCESS,
        Err(e) => {
            // one line: the error and its causes joined by ": "
            eprintln!("csp-llava: error: {}", message(&e));
            if e.is::<Usage>() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The error's line; a library settings error names the flag the user typed.
pub(crate) fn message(e: &anyhow::Error) -> String {
    let inner = e.downcast_ref::<Usage>().map(|u| &u.0).or_else(|| e.downcast_ref::<csp_llava::Error>());
    let msg = match inner {
        Some(csp_llava::Error::Config { field, reason }) => format!("invalid {}: {reason}", args::flag_of(field).unwrap_or(field)),
        _ => format!("{e:#}"),
    };
    // one line whatever a file's names held
    csp_llava::input::one_line(&msg)
}

/// Logs on stderr: warnings only by default (llama.cpp's own are routed through `tracing` and
/// quiet), `-v` info, `-vv` debug; `RUST_LOG` overrides.
fn init_tracing(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("RUST_LOG").ok().map_or_else(
        || {
            EnvFilter::new(match verbose {
                0 => "warn,llama-cpp-2=off",
                1 => "info",
                _ => "debug",
            })
        },
        EnvFilter::new,
    );
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .without_time()
        .init();
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let v = cli.verbose;
    let flags = match &cli.command {
        None => Some((&cli.run.model, &cli.run.ctx, "a run")),
        Some(Command::Chat(r)) => Some((&r.model, &r.ctx, "chat")),
        Some(Command::Demo { run, .. }) => Some((&run.model, &run.ctx, "demo")),
        Some(Command::Eval(e)) => Some((&e.model, &e.ctx, "eval")),
        Some(Command::Calibrate(c)) => Some((&c.model, &c.ctx, "calibrate")),
        _ => None,
    };
    if let Some(flag) = flags.and_then(|(m, c, what)| args::sweep_flag(m, c).map(|f| (f, what))) {
        return Err(commands::Usage(csp_llava::Error::Config { field: flag.0, reason: format!("a comma-separated list is a bench sweep; {} takes one value", flag.1) }).into());
    }
    match cli.command {
        Some(Command::GenTinyModel { dir, seed, family }) => commands::gen_tiny_model(&dir, seed, family),
        Some(Command::GenModel { dir, shape, quant, layers, seed }) => commands::gen_model(&dir, shape, quant, layers, seed),
        Some(Command::Demo { dir, run }) => commands::demo::demo(dir, run, v),
        Some(Command::Bench(b)) => commands::bench::bench(&b, v),
        Some(Command::Eval(e)) => commands::eval::eval(&e, v),
        Some(Command::Calibrate(c)) => commands::calibrate::calibrate(&c, v),
        Some(Command::Plot(p)) => commands::plot::plot(&p),
        Some(Command::PromptLayout { model, mmproj }) => commands::layout::prompt_layout(&model, &mmproj),
        Some(Command::Chat(run)) => commands::chat::chat(&run, v),
        None => {
            let r = &cli.run;
            let no_prompt = r.prompt.prompt.is_none() && r.prompt.file.is_none();
            if r.conversation || (no_prompt && !r.no_conversation && std::io::stdin().is_terminal()) {
                commands::chat::chat(r, v)
            } else {
                commands::run::run(r, v)
            }
        }
    }
}
