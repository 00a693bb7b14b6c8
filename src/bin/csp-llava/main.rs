//! `csp-llava`: the command-line front end. Parse → set up logging → run → exit code.
//! Errors print as one line on stderr with a non-zero exit (1; clap's usage errors exit 2).

mod args;
mod hub;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;
use csp_llava::config::{default_threads, ModelConfig, Request, ALL_LAYERS};
use csp_llava::gguf::tiny;
use csp_llava::{Engine, Event};
use indicatif::{ProgressBar, ProgressStyle};

use args::{Cli, Command, RunArgs};

fn main() -> ExitCode {
    let argv = args::rewrite_llama_flags(std::env::args_os());
    if let Some(flag) = args::unsupported_llama_flag(&argv) {
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
    let verbose = match &cli.command {
        Some(Command::Demo { run, .. }) => run.verbose,
        Some(Command::Bench(b)) => b.common.verbose,
        Some(Command::Eval(e)) => e.common.verbose,
        Some(Command::Calibrate(c)) => c.common.verbose,
        _ => cli.run.verbose,
    };
    init_tracing(verbose);
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Interrupted>() || matches!(e.downcast_ref::<csp_llava::Error>(), Some(csp_llava::Error::Cancelled)) => {
            let _ = std::io::stdout().flush();
            eprintln!("csp-llava: interrupted");
            ExitCode::from(130)
        }
        Err(e) if e.is::<Usage>() => {
            let _ = std::io::stdout().flush();
            eprintln!("csp-llava: error: {e:#}");
            ExitCode::from(2)
        }
        Err(e) if e.is::<ReaderGone>() => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes joined by ": ".
            let _ = std::io::stdout().flush();
            eprintln!("csp-llava: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Ctrl-C stopped the run (exit 130, as a shell reports SIGINT).
#[derive(Debug)]
struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// A flag value out of range or flags that contradict each other: a usage error, exit 2 like
/// clap's own (a value that does not parse), so the same kind of mistake always exits the same.
#[derive(Debug)]
struct Usage(csp_llava::Error);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Usage {}

/// Checks of flag values before anything is loaded; their failures are usage errors.
fn usage(r: csp_llava::Result<()>) -> Result<()> {
    r.map_err(|e| Usage(e).into())
}

/// The reader of stdout went away (`csp-llava … | head`): stop quietly, exit 0.
#[derive(Debug)]
struct ReaderGone;

impl std::fmt::Display for ReaderGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("broken pipe")
    }
}

impl std::error::Error for ReaderGone {}

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

fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Some(Command::GenTinyModel { dir, seed }) => gen_tiny_model(&dir, seed),
        Some(Command::Demo { dir, run }) => demo(dir, run),
        Some(Command::Bench(b)) => bench(&b),
        Some(Command::Eval(e)) => eval(&e),
        Some(Command::Calibrate(c)) => calibrate(&c),
        Some(Command::PromptLayout { model, mmproj }) => prompt_layout(&model, &mmproj),
        None => run(&cli.run),
    }
}

fn gen_tiny_model(dir: &Path, seed: u64) -> Result<()> {
    tiny::write_all(dir, seed).with_context(|| format!("cannot write the tiny model into {}", dir.display()))?;
    println!("{}", dir.join(tiny::TEXT_FILE).display());
    println!("{}", dir.join(tiny::MMPROJ_FILE).display());
    for i in 0..tiny::N_SAMPLE_IMAGES {
        println!("{}", dir.join(tiny::image_file(i)).display());
    }
    Ok(())
}

/// The tiny model's directory (written once per process) for commands run without -m.
fn tiny_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join("csp-llava-demo");
    tiny::write_all(&dir, 0).with_context(|| format!("cannot write the tiny model into {}", dir.display()))?;
    Ok(dir)
}

fn load(a: &args::ModelArgs) -> Result<Engine> {
    let (ngl, threads) = (a.n_gpu_layers, a.threads);
    let (model, mmproj) = match (a.model.as_ref(), a.mmproj.as_ref()) {
        (None, p) if a.hf.hf_repo.is_some() => hf_pair(&a.hf, p)?,
        (Some(m), Some(p)) => (m.clone(), p.clone()),
        (None, None) => {
            let d = tiny_dir()?;
            eprintln!("csp-llava: no -m given: using the built-in tiny model in {}", d.display());
            (d.join(tiny::TEXT_FILE), d.join(tiny::MMPROJ_FILE))
        }
        (Some(m), None) => bail!("missing --mmproj (the multimodal projector GGUF that belongs to {})", m.display()),
        (None, Some(_)) => bail!("missing -m/--model (the text model GGUF)"),
    };
    let mcfg = ModelConfig { model, mmproj, n_gpu_layers: ngl.unwrap_or(ALL_LAYERS), threads: threads.unwrap_or_else(default_threads).max(1) };
    Ok(Engine::load(&mcfg)?)
}

fn bench(a: &args::BenchArgs) -> Result<()> {
    let cfg = a.config().map_err(anyhow::Error::msg)?;
    usage(cfg.ctx.validate())?;
    for b in &cfg.budgets {
        usage(csp_llava::PolicyConfig { budget: *b, ..cfg.policy.clone() }.validate())?;
    }
    // the plot is written after the whole run: make sure it can be, first
    let plot = a.plot.as_ref().map(|p| std::fs::File::create(p).with_context(|| format!("cannot write the plot {}", p.display()))).transpose()?;
    let engine = load(&a.common)?;
    let scratch = std::env::temp_dir().join(format!("csp-llava-bench-{}", std::process::id()));
    // Ctrl-C: remove the synthetic images before going
    let on_signal = scratch.clone();
    let _ = ctrlc::set_handler(move || {
        let _ = std::fs::remove_dir_all(&on_signal);
        eprintln!("\ncsp-llava: interrupted");
        csp_llava::llama::exit_now(130);
    });
    let bar = if std::io::stderr().is_terminal() && a.common.verbose == 0 {
        ProgressBar::new(0).with_style(ProgressStyle::with_template("bench [{bar:30}] {pos}/{len} runs {elapsed}").expect("valid template").progress_chars("=> "))
    } else {
        ProgressBar::hidden()
    };
    let mut last = std::time::Instant::now();
    let rows = csp_llava::bench::run(&engine, &cfg, &scratch, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        if bar.is_hidden() && (last.elapsed().as_secs() >= 10 || done == total) {
            eprintln!("bench: {done}/{total} runs");
            last = std::time::Instant::now();
        }
    });
    bar.finish_and_clear();
    let _ = std::fs::remove_dir_all(&scratch);
    let rows = rows?;
    let mut out = std::io::stdout().lock();
    match a.output {
        args::BenchOutput::Md => write!(out, "{}", csp_llava::bench::markdown(&rows))?,
        args::BenchOutput::Csv => write!(out, "{}", csp_llava::bench::csv(&rows))?,
        args::BenchOutput::Json => writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?,
        args::BenchOutput::Jsonl => {
            for r in &rows {
                writeln!(out, "{}", serde_json::to_string(r)?)?;
            }
        }
    }
    if let (Some(mut f), Some(p)) = (plot, &a.plot) {
        f.write_all(csp_llava::bench::svg(&rows).as_bytes()).with_context(|| format!("cannot write the plot {}", p.display()))?;
    }
    Ok(())
}

fn prompt_layout(model: &Path, mmproj: &Path) -> Result<()> {
    use std::io::BufRead;
    let mut cfg = ModelConfig::new(model, mmproj);
    cfg.threads = 1;
    let engine = Engine::load(&cfg)?;
    let blank = std::env::temp_dir().join(format!("csp-llava-blank-{}.png", std::process::id()));
    tiny::write_png(&blank, 112, &vec![128u8; 112 * 112 * 3])?;
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line).context("each input line is {\"prompt\": …, \"n_images\": K}")?;
        const MAX_IMAGES: u64 = 1024;
        let n = v["n_images"].as_u64().unwrap_or(0);
        if n > MAX_IMAGES {
            bail!("n_images {n} is more than {MAX_IMAGES}");
        }
        let n = n as usize;
        let req = Request {
            images: vec![blank.clone(); n],
            prompt: v["prompt"].as_str().unwrap_or_default().to_owned(),
            raw: v["raw"].as_bool().unwrap_or(false),
            ..Default::default()
        };
        let prompt = engine.prepare(&req)?;
        let chunks: Vec<serde_json::Value> = (0..prompt.spans.len())
            .map(|i| {
                let c = prompt.chunks.get(i).expect("chunk");
                match c.text_tokens() {
                    Some(t) => serde_json::json!({ "text": t.iter().map(|x| x.0).collect::<Vec<_>>() }),
                    None => serde_json::json!({ "image": c.n_tokens() }),
                }
            })
            .collect();
        writeln!(out, "{}", serde_json::json!({ "chunks": chunks }))?;
    }
    let _ = std::fs::remove_file(&blank);
    Ok(())
}

fn calibrate(a: &args::CalibrateArgs) -> Result<()> {
    use csp_llava::policy::Budget;
    let budgets = a
        .kv_budget
        .iter()
        .map(|b| match b {
            Budget::Fraction(f) => Ok(*f),
            Budget::Cells(n) => Err(anyhow::anyhow!("--kv-budget: PrefixKV profiles are per fraction; write {n} as a fraction like 0.2")),
        })
        .collect::<Result<Vec<f64>>>()?;
    let mut cases = Vec::new();
    for c in csp_llava::eval::load_cases(&a.data)? {
        match c {
            Ok(c) => cases.push(c),
            Err((id, e)) => eprintln!("csp-llava: skipping case {id}: {e}"),
        }
    }
    cases.truncate(a.max_cases);
    if a.common.bound.kv_max_cells.is_some() {
        anyhow::bail!("--kv-max-cells does not apply to calibrate: the profile is measured on the full cache");
    }
    let engine = load(&a.common)?;
    let ctx = csp_llava::config::ContextConfig { n_ctx: a.common.ctx_size, ..Default::default() };
    let bar = if std::io::stderr().is_terminal() && a.common.verbose == 0 {
        ProgressBar::new(cases.len() as u64).with_style(ProgressStyle::with_template("calibrate [{bar:30}] {pos}/{len} cases {elapsed}").expect("valid template").progress_chars("=> "))
    } else {
        ProgressBar::hidden()
    };
    let profile = csp_llava::eval::calibrate::calibrate(&engine, &cases, &budgets, &ctx, &mut |i| bar.set_position(i as u64))?;
    bar.finish_and_clear();
    std::fs::write(&a.out, serde_json::to_string_pretty(&profile)? + "\n").with_context(|| format!("cannot write {}", a.out.display()))?;
    for e in &profile.budgets {
        let fmt: Vec<String> = e.retain.iter().map(|r| format!("{r:.2}")).collect();
        eprintln!("budget {}: retained per layer [{}]", e.budget, fmt.join(" "));
    }
    eprintln!("wrote {} ({} cases)", a.out.display(), profile.samples);
    Ok(())
}

fn eval(a: &args::EvalArgs) -> Result<()> {
    use csp_llava::eval::{self, CaseResult};
    let cfg = a.config().map_err(anyhow::Error::msg)?;
    usage(cfg.ctx.validate())?;
    for b in &cfg.budgets {
        usage(csp_llava::PolicyConfig { budget: *b, ..cfg.policy.clone() }.validate())?;
    }
    if cfg.policies.is_empty() {
        bail!("--kv-policy: give at least one policy");
    }
    if let Some(out) = &a.cases_out {
        if same_file(out, &a.data) {
            bail!("--cases-out {} is the --data file: it would overwrite the cases; write the results elsewhere", out.display());
        }
    }
    let cases = eval::load_cases(&a.data)?;
    let mut results: Vec<CaseResult> = match (a.resume, &a.cases_out) {
        (true, Some(path)) => resume_results(path)?,
        _ => Vec::new(),
    };
    let mut out_file = match &a.cases_out {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(a.resume)
                .truncate(!a.resume)
                .open(p)
                .with_context(|| format!("cannot write {}", p.display()))?,
        ),
        None => None,
    };
    let cancel = csp_llava::CancelHandle::new();
    install_interrupt(&cancel);
    let mut engine = load(&a.common)?;
    engine.set_cancel_handle(cancel.clone());
    let bar = if std::io::stderr().is_terminal() && a.common.verbose == 0 {
        ProgressBar::new(cases.len() as u64).with_style(ProgressStyle::with_template("eval [{bar:30}] {pos}/{len} cases {elapsed}").expect("valid template").progress_chars("=> "))
    } else {
        ProgressBar::hidden()
    };
    for case in &cases {
        let id = match case {
            Ok(c) => c.id.clone(),
            Err((id, _)) => id.clone(),
        };
        if results.iter().any(|r| r.id == id && r.ok) {
            bar.inc(1);
            continue;
        }
        results.retain(|r| r.id != id);
        let r = match case {
            Ok(c) => match eval::eval_case(&engine, c, &cfg) {
                Ok(r) => r,
                // Ctrl-C: the cases done so far are in --cases-out, whole; --resume goes on
                Err(_) if cancel.is_cancelled() => {
                    bar.finish_and_clear();
                    return Err(Interrupted.into());
                }
                Err(e) => CaseResult::failed(id.clone(), e.to_string()),
            },
            Err((_, e)) => CaseResult::failed(id.clone(), e.clone()),
        };
        if cancel.is_cancelled() {
            bar.finish_and_clear();
            return Err(Interrupted.into());
        }
        if let Some(e) = &r.error {
            bar.suspend(|| eprintln!("csp-llava: case {id} failed: {e}"));
        }
        if let Some(f) = out_file.as_mut() {
            // one write per line: a line is whole or absent, even after a crash
            f.write_all(format!("{}\n", serde_json::to_string(&r)?).as_bytes()).context("cannot write --cases-out")?;
            f.flush()?;
        }
        results.push(r);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let failed = results.iter().filter(|r| !r.ok).count();
    let summary = eval::summarize(&results);
    let mut stdout = std::io::stdout().lock();
    match a.output {
        args::EvalOutput::Md => write!(stdout, "{}", eval::markdown(&summary, failed))?,
        args::EvalOutput::Json => writeln!(stdout, "{}", serde_json::to_string_pretty(&serde_json::json!({ "summary": summary, "failed": failed }))?)?,
    }
    stdout.flush()?;
    if failed > 0 {
        bail!("{failed} of {} case(s) failed (see the lines above{})", results.len(), if a.cases_out.is_some() { " and --cases-out" } else { "" });
    }
    Ok(())
}

/// Whether `a` and `b` name the same file (both existing).
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// The completed cases of a `--cases-out` file being resumed. The file is rewritten (atomically)
/// to hold each completed case once, so the run's appends never duplicate; a last line cut
/// mid-write by a crash is dropped and that case rerun. Anything else that does not parse —
/// not UTF-8, a bad line in the middle — is refused and the file left as it is.
fn resume_results(path: &Path) -> Result<Vec<csp_llava::eval::CaseResult>> {
    use csp_llava::eval::CaseResult;
    let text = match csp_llava::input::read_text(path, "--cases-out file to resume", csp_llava::input::limits::JSON) {
        Ok(t) => t,
        Err(csp_llava::Error::NotFound { .. }) => return Ok(Vec::new()),
        Err(e) => bail!("{e}; --resume leaves it unchanged (move it away to start over)"),
    };
    let lines: Vec<(usize, &str)> = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).collect();
    let mut results: Vec<CaseResult> = Vec::new();
    for (k, (i, line)) in lines.iter().enumerate() {
        match serde_json::from_str::<CaseResult>(line) {
            Ok(r) => {
                results.retain(|o| o.id != r.id);
                results.push(r);
            }
            Err(_) if k + 1 == lines.len() && !text.ends_with('\n') => {
                eprintln!("csp-llava: {} line {}: cut short (an interrupted write); that case runs again", path.display(), i + 1);
            }
            Err(e) => bail!("{} line {}: not a case result ({e}); --resume leaves the file unchanged", path.display(), i + 1),
        }
    }
    results.retain(|r| r.ok);
    let mut body = String::new();
    for r in &results {
        body.push_str(&serde_json::to_string(r)?);
        body.push('\n');
    }
    if body != text {
        let tmp = path.with_extension("resume-tmp");
        std::fs::write(&tmp, &body).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    }
    Ok(results)
}

/// Where `models/build.sh` puts the real small VLM (the checkout this binary was built from).
fn real_model_dir() -> Option<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/cache");
    d.join("smolvlm-dino/.stamp").exists().then_some(d)
}

/// easy-vqa test images of the demo (red triangle, blue circle, red circle, black rectangle) and a
/// question about one of them by its number.
const DEMO_IMAGES: [u32; 4] = [12, 6, 4, 11];
const DEMO_PROMPT: &str = "In image 4, what shape is in the image?";

fn demo(dir: Option<PathBuf>, mut run_args: RunArgs) -> Result<()> {
    if run_args.hf.hf_repo.is_some() {
        return run(&run_args);
    }
    let own_model = run_args.model.is_some() || run_args.mmproj.is_some();
    let real = if own_model || dir.is_some() { None } else { real_model_dir() };
    if let Some(cache) = real {
        let m = cache.join("smolvlm-dino");
        run_args.model = Some(m.join("text.gguf"));
        run_args.mmproj = Some(m.join("mmproj.gguf"));
        let own_images = !run_args.images.is_empty();
        if !own_images {
            run_args.images = DEMO_IMAGES.iter().map(|i| cache.join(format!("easy-vqa/test/images112/{i}.png"))).collect();
        }
        if run_args.prompt.is_none() && run_args.file.is_none() {
            run_args.prompt = Some(if own_images { "What shape is in image 1?".into() } else { DEMO_PROMPT.into() });
        }
        if run_args.kv_policy == csp_llava::PolicyKind::Full {
            run_args.kv_policy = csp_llava::PolicyKind::Csp;
            run_args.kv_budget.get_or_insert(csp_llava::Budget::Fraction(0.5));
        }
        run_args.n_predict.get_or_insert(16);
        run_args.temp.get_or_insert(0.0);
        if !run_args.json {
            let images = if own_images { format!("{} image(s) of yours", run_args.images.len()) } else { "4 easy-vqa test images".into() };
            eprintln!(
                "csp-llava demo: SmolLM2-135M + DINOv2-small (models/build.sh), {images}, {} keeping {} of the KV cache\nprompt: {}",
                run_args.kv_policy.name(),
                run_args.kv_budget.map_or("0.2".into(), |b| b.to_string()),
                run_args.prompt.as_deref().unwrap_or("")
            );
        }
        return run(&run_args);
    }
    let why = if own_model {
        None
    } else if dir.is_some() {
        Some("--dir asks for the tiny random-weight model")
    } else {
        Some("the real small VLM is not built (models/build.sh needs PyPI), so this is the tiny random-weight model")
    };
    let dir = dir.unwrap_or_else(|| std::env::temp_dir().join("csp-llava-demo"));
    if !own_model {
        tiny::write_all(&dir, 0).with_context(|| format!("cannot write the tiny model into {}", dir.display()))?;
        run_args.model = Some(dir.join(tiny::TEXT_FILE));
        run_args.mmproj = Some(dir.join(tiny::MMPROJ_FILE));
        if run_args.images.is_empty() {
            run_args.images = (0..3).map(|i| dir.join(tiny::image_file(i))).collect();
        }
    }
    if run_args.prompt.is_none() && run_args.file.is_none() {
        run_args.prompt = Some(format!("Compare the {} images.", run_args.images.len()));
    }
    run_args.n_predict.get_or_insert(48);
    run_args.temp.get_or_insert(0.0);
    if let (false, Some(why)) = (run_args.json, why) {
        eprintln!("csp-llava demo: {why} in {} — its answer is gibberish; it shows the pipeline", dir.display());
    }
    run(&run_args)
}

/// `-hf`'s model and projector (an explicit `--mmproj` wins over the repository's).
fn hf_pair(hf: &args::HfArgs, mmproj: Option<&PathBuf>) -> Result<(PathBuf, PathBuf)> {
    let files = hub::resolve(hf)?;
    let repo = hf.hf_repo.as_deref().unwrap_or_default();
    let mmproj = match (mmproj, files.mmproj) {
        (Some(p), _) => p.clone(),
        (None, Some(p)) => p,
        (None, None) => bail!("the repository {repo} has no mmproj*.gguf projector; give one with --mmproj"),
    };
    Ok((files.model, mmproj))
}

fn run(a: &RunArgs) -> Result<()> {
    let hf;
    let (model, mmproj) = if a.hf.hf_repo.is_some() {
        hf = hf_pair(&a.hf, a.mmproj.as_ref())?;
        (&hf.0, &hf.1)
    } else {
        let Some(model) = &a.model else {
            bail!("missing -m/--model (the text model GGUF); try `csp-llava demo` or `csp-llava --help`");
        };
        let Some(mmproj) = &a.mmproj else {
            bail!("missing --mmproj (the multimodal projector GGUF that belongs to {})", model.display());
        };
        (model, mmproj)
    };
    let prompt = match (&a.prompt, &a.file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => read_text_file(f, "prompt file")?,
        (None, None) => bail!("missing prompt: give one with -p TEXT or -f FILE"),
    };
    let chat_template = match &a.chat_template_file {
        Some(f) => Some(read_text_file(f, "chat template file")?),
        None => a.chat_template.clone(),
    };
    let sampling = a.sampling();
    usage(sampling.validate())?;
    let policy = a.policy().map_err(anyhow::Error::msg)?;
    usage(policy.validate())?;
    let ctx = a.context();
    usage(ctx.validate())?;
    // written after the run: make sure it can be, first
    let retention_file = a.dump_retention.as_ref().map(|p| std::fs::File::create(p).with_context(|| format!("cannot write {}", p.display()))).transpose()?;
    let mcfg = ModelConfig {
        model: model.clone(),
        mmproj: mmproj.clone(),
        n_gpu_layers: a.n_gpu_layers.unwrap_or(ALL_LAYERS),
        threads: a.threads.unwrap_or_else(default_threads).max(1),
    };
    let req = Request {
        images: a.images.clone(),
        prompt,
        system: a.system.clone(),
        chat_template,
        raw: a.no_chat_template,
        jinja: a.jinja || a.chat_template_file.is_some(),
        max_image_pixels: a.image_max_mp,
    };

    let show_progress = std::io::stderr().is_terminal() && a.verbose == 0;
    let cancel = csp_llava::CancelHandle::new();
    install_interrupt(&cancel);
    let spinner = progress(show_progress, None, "loading model");
    let mut engine = Engine::load(&mcfg)?;
    spinner.finish_and_clear();
    engine.set_cancel_handle(cancel.clone());
    if cancel.is_cancelled() {
        return Err(Interrupted.into());
    }

    let bar = progress(show_progress, Some(0), "prefill");
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
    if report.stop == csp_llava::engine::StopReason::Cancelled {
        return Err(Interrupted.into());
    }
    Ok(())
}

/// Reads a small text file given on the command line (a regular file of at most 16 MiB).
fn read_text_file(path: &Path, what: &'static str) -> Result<String> {
    Ok(csp_llava::input::read_text(path, what, csp_llava::input::limits::TEXT)?)
}

fn write_retention(file: std::fs::File, report: &csp_llava::RunReport) -> Result<()> {
    let mut w = std::io::BufWriter::new(file);
    for t in &report.retention {
        serde_json::to_writer(&mut w, t)?;
        writeln!(w)?;
    }
    w.flush()?;
    Ok(())
}

fn progress(show: bool, len: Option<u64>, msg: &'static str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    match len {
        None => {
            let pb = ProgressBar::new_spinner().with_message(msg);
            pb.enable_steady_tick(std::time::Duration::from_millis(120));
            pb
        }
        Some(n) => ProgressBar::new(n).with_message(msg).with_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} tok").expect("valid template").progress_chars("=> "),
        ),
    }
}
