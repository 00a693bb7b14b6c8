//! `csp-llava bench`: speed and memory of each policy × budget next to llama.cpp's own path.

use std::io::Write;

use anyhow::{Context, Result};

use super::{load, progress, usage, usage_grid};
use crate::args::{BenchArgs, BenchOutput};

pub fn bench(a: &BenchArgs, verbose: u8) -> Result<()> {
    let cfg = a.config().map_err(anyhow::Error::msg)?;
    usage(cfg.ctx.validate())?;
    usage_grid(&cfg.policy, &cfg.policies, &cfg.budgets)?;
    // the plot is written after the whole run: make sure it can be, first
    let plot = a.plot.as_ref().map(|p| std::fs::File::create(p).with_context(|| format!("cannot write the plot {}", p.display()))).transpose()?;
    let engine = load(&a.model)?;
    let scratch = std::env::temp_dir().join(format!("csp-llava-bench-{}", std::process::id()));
    // Ctrl-C: remove the synthetic images before going
    let on_signal = scratch.clone();
    let _ = ctrlc::set_handler(move || {
        let _ = std::fs::remove_dir_all(&on_signal);
        eprintln!("\ncsp-llava: interrupted");
        csp_llava::llama::exit_now(130);
    });
    let bar = progress(verbose, Some("bench [{bar:30}] {pos}/{len} runs {elapsed}"), "bench");
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
        BenchOutput::Md => write!(out, "{}", csp_llava::bench::markdown(&rows))?,
        BenchOutput::Csv => write!(out, "{}", csp_llava::bench::csv(&rows))?,
        BenchOutput::Json => writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?,
        BenchOutput::Jsonl => {
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
