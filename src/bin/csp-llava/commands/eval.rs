//! `csp-llava eval`: fidelity and accuracy of each policy × budget on a JSONL set of cases, with
//! per-case lines that survive interruption and a `--resume` that never duplicates or loses one.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use csp_llava::eval::{self, CaseResult};

use super::{install_interrupt, load, progress, usage, usage_grid, Interrupted};
use crate::args::{EvalArgs, EvalOutput};

pub fn eval(a: &EvalArgs, verbose: u8) -> Result<()> {
    let cfg = a.config().map_err(anyhow::Error::msg)?;
    usage(cfg.ctx.validate())?;
    usage_grid(&cfg.policy, &cfg.policies, &cfg.budgets)?;
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
    let mut engine = load(&a.model)?;
    engine.set_cancel_handle(cancel.clone());
    let bar = progress(verbose, Some("eval [{bar:30}] {pos}/{len} cases {elapsed}"), "eval");
    bar.set_length(cases.len() as u64);
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
    let paired = eval::paired(&results);
    let protocol = cfg.protocol_name(&results);
    let mut stdout = std::io::stdout().lock();
    match a.output {
        EvalOutput::Md => write!(stdout, "{}", eval::markdown(&summary, &paired, &protocol, failed))?,
        EvalOutput::Json => writeln!(
            stdout,
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "protocol": protocol, "summary": summary, "paired": paired, "failed": failed }))?
        )?,
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
fn resume_results(path: &Path) -> Result<Vec<CaseResult>> {
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
