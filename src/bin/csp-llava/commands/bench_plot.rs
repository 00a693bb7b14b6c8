//! `bench --plot FILE.svg`: per group of rows (image count, and the sweep's threads, `-ngl`,
//! batch sizes and depth where they vary) two panels — decode tok/s and KV bytes against the
//! fraction of the prompt's cells kept — one line per policy through its budgets, min–max
//! whiskers over the repetitions, llama.cpp's own full cache (the reference row) dashed, a
//! legend with line samples and a caption with the model and the machine.

use std::path::Path;

use anyhow::Result;
use csp_llava::bench::{BenchRow, Provenance};
use plotters::prelude::*;

use super::plot::PALETTE;

/// The rows of one group and its title.
struct Group<'a> {
    title: String,
    rows: Vec<&'a BenchRow>,
}

fn groups(rows: &[BenchRow]) -> Vec<Group<'_>> {
    let key = |r: &BenchRow| (r.n_images, r.threads, r.n_gpu_layers, r.n_batch, r.n_ubatch, r.depth);
    let varies = |f: &dyn Fn(&BenchRow) -> u64| rows.iter().any(|r| f(r) != f(&rows[0]));
    let (t, ngl, b, ub, d) = (varies(&|r| r.threads.into()), varies(&|r| r.n_gpu_layers.into()), varies(&|r| r.n_batch.into()), varies(&|r| r.n_ubatch.into()), varies(&|r| r.depth.into()));
    let mut keys: Vec<_> = rows.iter().map(key).collect();
    keys.dedup();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .map(|k| {
            let rows: Vec<&BenchRow> = rows.iter().filter(|r| key(r) == k).collect();
            let mut title = format!("{} image(s)", k.0);
            for (on, part) in [(t, format!("-t {}", k.1)), (ngl, format!("-ngl {}", k.2)), (b, format!("-b {}", k.3)), (ub, format!("-ub {}", k.4)), (d, format!("depth {}", k.5))] {
                if on {
                    title.push_str(", ");
                    title.push_str(&part);
                }
            }
            Group { title, rows }
        })
        .collect()
}

/// (kept fraction, value, min, max) of `policy`'s rows, by budget.
fn series(rows: &[&BenchRow], policy: &str, f: &dyn Fn(&BenchRow) -> (f64, f64, f64)) -> Vec<(f64, f64, f64, f64)> {
    let mut v: Vec<_> = rows
        .iter()
        .filter(|r| r.policy == policy && r.kv_budget.is_some())
        .map(|r| {
            let (y, lo, hi) = f(r);
            (f64::from(r.kv_cells) / f64::from(r.kv_cells_before.max(1)), y, lo, hi)
        })
        .collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

/// Draws the plot into `path`.
pub fn write(path: &Path, prov: &Provenance, rows: &[BenchRow]) -> Result<()> {
    let groups = groups(rows);
    let mut policies: Vec<&str> = rows.iter().filter(|r| r.kv_budget.is_some()).map(|r| r.policy.as_str()).collect();
    policies.sort_unstable();
    policies.dedup();
    let colour = |p: &str| PALETTE[policies.iter().position(|q| *q == p).unwrap_or(0) % PALETTE.len()];
    let n = groups.len().max(1) as u32;
    let root = SVGBackend::new(path, (1040, 40 + 340 * n)).into_drawing_area();
    let model = Path::new(&prov.model).file_name().map_or_else(|| prov.model.clone(), |f| f.to_string_lossy().into_owned());
    let caption =
        format!("csp-llava bench · {model} · {} · {} · {} threads, -ngl {}, -fa {} · {} ({})", prov.device, prov.cpu, prov.threads, prov.n_gpu_layers, prov.flash_attn, prov.version, prov.commit);
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let (head, body) = root.split_vertically(40);
        head.draw_text(&caption, &("sans-serif", 13).into_font().color(&BLACK), (12, 14))?;
        let cells = body.split_evenly((n as usize, 2));
        for (gi, g) in groups.iter().enumerate() {
            let max_kv = g.rows.iter().map(|r| r.kv_bytes).max().unwrap_or(0) as f64;
            let (unit, div) = if max_kv >= f64::from(1u32 << 20) { ("MiB", f64::from(1u32 << 20)) } else { ("KiB", 1024.0) };
            let kv_label = format!("KV bytes ({unit})");
            type Figure = Box<dyn Fn(&BenchRow) -> (f64, f64, f64)>;
            let panels: [(&str, Figure); 2] = [
                ("decode tok/s", Box::new(|r: &BenchRow| (r.decode_tok_s.median, r.decode_tok_s.min, r.decode_tok_s.max))),
                (kv_label.as_str(), Box::new(move |r: &BenchRow| (r.kv_bytes as f64 / div, r.kv_bytes as f64 / div, r.kv_bytes as f64 / div))),
            ];
            for (pi, (label, f)) in panels.iter().enumerate() {
                let area = &cells[gi * 2 + pi];
                let ymax = g.rows.iter().map(|r| f(r).2).fold(0.0, f64::max).max(1e-9) * 1.12;
                let mut chart = ChartBuilder::on(area)
                    .caption(format!("{}: {label} vs kept fraction", g.title), ("sans-serif", 14))
                    .margin(12)
                    .x_label_area_size(36)
                    .y_label_area_size(56)
                    .build_cartesian_2d(0.0..1.05f64, 0.0..ymax)?;
                chart.configure_mesh().x_desc("kept fraction of the prompt's cells").y_desc(*label).light_line_style(WHITE.mix(0.0)).draw()?;
                if let Some(r) = g.rows.iter().find(|r| r.reference) {
                    let y = f(r).0;
                    let style = BLACK.mix(0.45).stroke_width(1);
                    chart
                        .draw_series(DashedLineSeries::new([(0.0, y), (1.0, y)], 5, 4, style))?
                        .label("reference (llama.cpp, full)")
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], style));
                }
                for p in &policies {
                    let pts = series(&g.rows, p, f.as_ref());
                    if pts.is_empty() {
                        continue;
                    }
                    let c = colour(p);
                    let style = ShapeStyle { color: c.to_rgba(), filled: true, stroke_width: 2 };
                    chart.draw_series(LineSeries::new(pts.iter().map(|q| (q.0, q.1)), style))?.label(*p).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], style));
                    chart.draw_series(pts.iter().map(|q| ErrorBar::new_vertical(q.0, q.2, q.1, q.3, c.stroke_width(1), 6)))?;
                    chart.draw_series(pts.iter().map(|q| Circle::new((q.0, q.1), 3, c.filled())))?;
                }
                chart.configure_series_labels().position(SeriesLabelPosition::UpperLeft).background_style(WHITE.mix(0.85)).border_style(BLACK.mix(0.3)).label_font(("sans-serif", 11)).draw()?;
            }
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", path.display()))
}
