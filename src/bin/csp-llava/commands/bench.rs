//! `csp-llava bench`: speed and memory of each policy × budget next to llama.cpp's own path.

use std::io::Write;

use anyhow::{Context, Result};

use super::{load, progress, usage, usage_grid};
use crate::args::{BenchArgs, BenchOutput, ModelFlags};

pub fn bench(a: &BenchArgs, verbose: u8) -> Result<()> {
    let cfg = a.config().map_err(anyhow::Error::msg)?;
    usage(cfg.ctx.validate())?;
    usage_grid(&cfg.policy, &cfg.policies, &cfg.budgets)?;
    // the plot is written after the whole run: make sure it can be, first
    let plot = a.plot.as_ref().map(|p| std::fs::File::create(p).with_context(|| format!("cannot write the plot {}", p.display()))).transpose()?;
    // -ngl and -t lists: one engine per point (as llama-bench reloads per model setting)
    let ngls: Vec<Option<u32>> = if a.model.n_gpu_layers.is_empty() { vec![None] } else { a.model.n_gpu_layers.iter().copied().map(Some).collect() };
    let threads: Vec<Option<u32>> = if a.model.threads.is_empty() { vec![None] } else { a.model.threads.iter().copied().map(Some).collect() };
    let points: Vec<ModelFlags> = ngls
        .iter()
        .flat_map(|&ngl| threads.iter().map(move |&t| (ngl, t)))
        .map(|(ngl, t)| ModelFlags { n_gpu_layers: ngl.into_iter().collect(), threads: t.into_iter().collect(), ..a.model.clone() })
        .collect();
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
    let mut out = std::io::stdout().lock();
    let mut all_rows = Vec::new();
    let mut first_prov = None;
    for (k, point) in points.iter().enumerate() {
        if stop.is_cancelled() {
            break;
        }
        let engine = load(point)?;
        let prov = csp_llava::bench::Provenance::of(&engine, &cfg);
        if k == 0 {
            // the header, then each row as it is measured (json is one document: at the end)
            match a.output {
                BenchOutput::Md => {
                    writeln!(
                        out,
                        "<!-- csp-llava {} ({}) | {} ({} bytes) | {} | {} | {} threads, -ngl {} | -fa {} | -ctk {} -ctv {} | -r {} -n {} -->",
                        prov.version,
                        prov.commit,
                        prov.model,
                        prov.model_bytes,
                        prov.device,
                        prov.cpu,
                        prov.threads,
                        prov.n_gpu_layers,
                        prov.flash_attn,
                        prov.type_k,
                        prov.type_v,
                        prov.reps,
                        prov.n_predict
                    )?;
                    write!(out, "{}", csp_llava::bench::markdown_header())?;
                }
                BenchOutput::Csv => write!(out, "{}", csp_llava::bench::csv_header())?,
                BenchOutput::Jsonl => writeln!(out, "{}", serde_json::to_string(&serde_json::json!({ "provenance": prov }))?)?,
                BenchOutput::Sql => write!(out, "{}", csp_llava::bench::sql_header())?,
                BenchOutput::Json => {}
            }
            out.flush()?;
        }
        let bar = progress(verbose, Some("bench [{bar:30}] {pos}/{len} runs {elapsed} (eta {eta})"), "bench");
        let mut last = std::time::Instant::now();
        let t0 = std::time::Instant::now();
        let mut write_err = None;
        let rows = csp_llava::bench::run(
            &engine,
            &cfg,
            &scratch,
            &mut |done, total| {
                if done == 0 {
                    let sweep = if points.len() > 1 { format!(" (sweep point {}/{}: -t {} -ngl {})", k + 1, points.len(), prov.threads, prov.n_gpu_layers) } else { String::new() };
                    eprintln!("bench: {total} runs ({} measured + 1 warm-up per configuration) on {} ({}, {} threads){sweep}", cfg.reps, prov.device, prov.cpu, prov.threads);
                }
                bar.set_length(total as u64);
                bar.set_position(done as u64);
                if bar.is_hidden() && (last.elapsed().as_secs() >= 10 || done == total) {
                    let eta = t0.elapsed().as_secs_f64() / done.max(1) as f64 * (total - done) as f64;
                    eprintln!("bench: {done}/{total} runs, about {eta:.0} s left");
                    last = std::time::Instant::now();
                }
            },
            &mut |r| {
                let Some(line) = row_line(a.output, &prov, r) else { return };
                bar.suspend(|| {
                    if write_err.is_none() {
                        write_err = out.write_all(line.as_bytes()).and_then(|()| out.flush()).err();
                    }
                });
            },
            &|| stop.is_cancelled(),
        );
        bar.finish_and_clear();
        if let Some(e) = write_err {
            let _ = std::fs::remove_dir_all(&scratch);
            return Err(super::out_err(e));
        }
        let rows = match rows {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&scratch);
                return Err(e.into());
            }
        };
        // rows measured but not streamed (stopped before their last repetition)
        if stop.is_cancelled() && a.output != BenchOutput::Json {
            for line in rows.iter().filter(|r| r.reps < cfg.reps).filter_map(|r| row_line(a.output, &prov, r)) {
                out.write_all(line.as_bytes())?;
            }
        }
        first_prov.get_or_insert(prov);
        all_rows.extend(rows);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    if a.output == BenchOutput::Json {
        writeln!(out, "{}", serde_json::to_string_pretty(&serde_json::json!({ "provenance": first_prov, "rows": all_rows }))?)?;
    }
    out.flush()?;
    if let (Some(f), Some(p), Some(prov)) = (plot, &a.plot, &first_prov) {
        drop(f);
        super::bench_plot::write(p, prov, &all_rows)?;
    }
    if stop.is_cancelled() {
        // what was measured is written above; the exit status still says it was stopped
        return Err(super::Interrupted.into());
    }
    Ok(())
}

/// One row in a streamed output format (`None` for json, written whole at the end).
fn row_line(output: BenchOutput, prov: &csp_llava::bench::Provenance, r: &csp_llava::bench::BenchRow) -> Option<String> {
    Some(match output {
        BenchOutput::Md => csp_llava::bench::markdown_row(r),
        BenchOutput::Csv => csp_llava::bench::csv_row(r),
        BenchOutput::Jsonl => serde_json::to_string(r).ok()? + "\n",
        BenchOutput::Sql => csp_llava::bench::sql_row(prov, r),
        BenchOutput::Json => return None,
    })
}
