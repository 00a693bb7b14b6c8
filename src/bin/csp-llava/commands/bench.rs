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
    // Ctrl-C: the run in progress finishes, then what was measured is written; a second
    // Ctrl-C removes the synthetic images and exits
    let stop = csp_llava::CancelHandle::new();
    let (on_signal, flag) = (scratch.clone(), stop.clone());
    let _ = ctrlc::set_handler(move || {
        if flag.is_cancelled() {
            let _ = std::fs::remove_dir_all(&on_signal);
            eprintln!("\ncsp-llava: interrupted");
            csp_llava::llama::exit_now(130);
        }
        flag.cancel();
        eprintln!("\nbench: stopping after this run (Ctrl-C again to quit now)");
    });
    let prov = csp_llava::bench::Provenance::of(&engine, &cfg);
    let bar = progress(verbose, Some("bench [{bar:30}] {pos}/{len} runs {elapsed} (eta {eta})"), "bench");
    let mut last = std::time::Instant::now();
    let t0 = std::time::Instant::now();
    let rows = csp_llava::bench::run(
        &engine,
        &cfg,
        &scratch,
        &mut |done, total| {
            if done == 0 {
                eprintln!("bench: {total} runs ({} measured + 1 warm-up per configuration) on {} ({}, {} threads)", cfg.reps, prov.device, prov.cpu, prov.threads);
            }
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            if bar.is_hidden() && (last.elapsed().as_secs() >= 10 || done == total) {
                let eta = t0.elapsed().as_secs_f64() / done as f64 * (total - done) as f64;
                eprintln!("bench: {done}/{total} runs, about {eta:.0} s left");
                last = std::time::Instant::now();
            }
        },
        &|| stop.is_cancelled(),
    );
    bar.finish_and_clear();
    let _ = std::fs::remove_dir_all(&scratch);
    let rows = rows?;
    let mut out = std::io::stdout().lock();
    match a.output {
        BenchOutput::Md => {
            writeln!(
                out,
                "<!-- csp-llava {} ({}) | {} ({} bytes) | {} | {} | {} threads, -ngl {} | -fa {} | -ctk {} -ctv {} | -r {} -n {} -->",
                prov.version, prov.commit, prov.model, prov.model_bytes, prov.device, prov.cpu, prov.threads, prov.n_gpu_layers, prov.flash_attn, prov.type_k, prov.type_v, prov.reps, prov.n_predict
            )?;
            write!(out, "{}", csp_llava::bench::markdown(&rows))?;
        }
        BenchOutput::Csv => write!(out, "{}", csp_llava::bench::csv(&rows))?,
        BenchOutput::Json => writeln!(out, "{}", serde_json::to_string_pretty(&serde_json::json!({ "provenance": prov, "rows": rows }))?)?,
        BenchOutput::Jsonl => {
            writeln!(out, "{}", serde_json::to_string(&serde_json::json!({ "provenance": prov }))?)?;
            for r in &rows {
                writeln!(out, "{}", serde_json::to_string(r)?)?;
            }
        }
        BenchOutput::Sql => write!(out, "{}", csp_llava::bench::sql(&prov, &rows))?,
    }
    if let (Some(mut f), Some(p)) = (plot, &a.plot) {
        f.write_all(csp_llava::bench::svg(&rows).as_bytes()).with_context(|| format!("cannot write the plot {}", p.display()))?;
    }
    if stop.is_cancelled() {
        // what was measured is written above; the exit status still says it was stopped
        return Err(super::Interrupted.into());
    }
    Ok(())
}
