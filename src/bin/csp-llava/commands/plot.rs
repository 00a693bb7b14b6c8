//! `csp-llava plot`: quality against memory from `eval -o json` outputs — per panel one metric
//! against the KV bytes each policy × budget kept (mean over the cases), one line per policy
//! through its budgets, the summary's 95% bootstrap intervals as error bars, the full cache as
//! a labelled point. One row of panels per input file (say K = 4, 8, 16), one column per metric.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use serde::Deserialize;

use crate::args::PlotArgs;

/// Tableau 10: distinct on white and for the common colour-vision deficiencies.
pub(super) const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The metrics `eval` summarises, with their axis labels.
const METRICS: &[(&str, &str)] = &[
    ("accuracy", "exact match"),
    ("contains", "answer contained"),
    ("kl", "KL(full ‖ policy)"),
    ("top1_agreement", "top-1 agreement"),
    ("rouge_l", "ROUGE-L vs full"),
    ("per_image_accuracy", "per-image accuracy"),
    ("perplexity", "perplexity of the full answer"),
];

/// What the plot reads of an `eval -o json` output.
#[derive(Debug, Deserialize)]
struct EvalJson {
    #[serde(default)]
    protocol: String,
    summary: Vec<serde_json::Map<String, serde_json::Value>>,
}

/// One policy × budget of one file: x (MiB, or cells for outputs without bytes) and the metric.
#[derive(Debug, Clone, Copy)]
struct Point {
    x: f64,
    y: f64,
    lo: f64,
    hi: f64,
}

/// One input: its title and, per metric, per policy, the points by budget.
struct Panel {
    title: String,
    x_label: &'static str,
    series: BTreeMap<String, BTreeMap<String, Vec<Point>>>,
}

fn read_panel(input: &str, metrics: &[String]) -> Result<Panel> {
    let (label, path) = match input.split_once('=') {
        Some((l, p)) if !l.is_empty() && !Path::new(input).exists() => (Some(l.to_string()), p),
        _ => (None, input),
    };
    let text = csp_llava::input::read_text(Path::new(path), "eval output", csp_llava::input::limits::JSON)?;
    let eval: EvalJson = serde_json::from_str(&text).with_context(|| format!("{path}: not an `eval -o json` output"))?;
    let bytes = eval.summary.iter().all(|r| r.get("kv_bytes_after").and_then(serde_json::Value::as_f64).is_some());
    let mut series: BTreeMap<String, BTreeMap<String, Vec<Point>>> = BTreeMap::new();
    for row in &eval.summary {
        let policy = row.get("policy").and_then(serde_json::Value::as_str).unwrap_or("?").to_string();
        let x = if bytes {
            row["kv_bytes_after"].as_f64().unwrap_or(0.0) / f64::from(1u32 << 20)
        } else {
            row.get("kv_cells_after").and_then(serde_json::Value::as_f64).unwrap_or(0.0)
        };
        for m in metrics {
            let Some(y) = row.get(m.as_str()).and_then(serde_json::Value::as_f64) else { continue };
            let ci = row.get(&format!("{m}_ci")).and_then(serde_json::Value::as_array);
            let bound = |i: usize| ci.and_then(|c| c.get(i)).and_then(serde_json::Value::as_f64).unwrap_or(y);
            series.entry(m.clone()).or_default().entry(policy.clone()).or_default().push(Point { x, y, lo: bound(0), hi: bound(1) });
        }
    }
    for by_policy in series.values_mut() {
        for pts in by_policy.values_mut() {
            pts.sort_by(|a, b| a.x.total_cmp(&b.x));
        }
    }
    let name = Path::new(path).file_stem().map_or_else(|| path.to_string(), |s| s.to_string_lossy().into_owned());
    let title = match (label, eval.protocol.is_empty()) {
        (Some(l), true) => l,
        (Some(l), false) => format!("{l} — {}", eval.protocol),
        (None, true) => name,
        (None, false) => format!("{name} — {}", eval.protocol),
    };
    Ok(Panel { title, x_label: if bytes { "KV cache kept (MiB)" } else { "KV cells kept" }, series })
}

/// Axis range with a margin; a flat range is widened.
fn range(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let (lo, hi) = if (hi - lo).abs() < 1e-9 { (lo - 0.5, hi + 0.5) } else { (lo, hi) };
    let m = 0.06 * (hi - lo);
    (lo - m)..(hi + m)
}

pub fn plot(a: &PlotArgs) -> Result<()> {
    for m in &a.metric {
        if !METRICS.iter().any(|(k, _)| k == m) {
            let known: Vec<&str> = METRICS.iter().map(|(k, _)| *k).collect();
            return Err(super::Usage(csp_llava::Error::Config { field: "--metric", reason: format!("unknown metric `{m}` (one of {})", known.join(", ")) }).into());
        }
    }
    let panels = a.inputs.iter().map(|i| read_panel(i, &a.metric)).collect::<Result<Vec<_>>>()?;
    // colours by policy, the same in every panel
    let mut policies: Vec<String> = panels.iter().flat_map(|p| p.series.values().flat_map(|s| s.keys().cloned())).collect();
    policies.sort();
    policies.dedup();
    if policies.is_empty() {
        bail!("nothing to plot: the inputs have none of the metrics {}", a.metric.join(", "));
    }
    let others: Vec<&String> = policies.iter().filter(|p| *p != "full").collect();
    let index = |p: &str| others.iter().position(|q| *q == p).unwrap_or(0);
    let colour = |p: &str| -> RGBColor { if p == "full" { BLACK } else { PALETTE[index(p) % PALETTE.len()] } };
    let (w, h) = (520u32 * a.metric.len() as u32, 360u32 * panels.len() as u32);
    let root = SVGBackend::new(&a.out, (w, h)).into_drawing_area();
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let cells = root.split_evenly((panels.len(), a.metric.len()));
        for (i, panel) in panels.iter().enumerate() {
            for (j, m) in a.metric.iter().enumerate() {
                let area = &cells[i * a.metric.len() + j];
                let empty = BTreeMap::new();
                let by_policy = panel.series.get(m).unwrap_or(&empty);
                let pts: Vec<Point> = by_policy.values().flatten().copied().collect();
                let (x0, x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.x), b.max(p.x)));
                let (y0, y1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.lo), b.max(p.hi)));
                let label = METRICS.iter().find(|(k, _)| k == m).map_or(m.as_str(), |(_, l)| l);
                let mut chart = ChartBuilder::on(area)
                    .caption(format!("{} · {label}", panel.title), ("sans-serif", 15))
                    .margin(12)
                    .x_label_area_size(36)
                    .y_label_area_size(52)
                    .build_cartesian_2d(if pts.is_empty() { 0.0..1.0 } else { range(x0, x1) }, if pts.is_empty() { 0.0..1.0 } else { range(y0, y1) })?;
                chart.configure_mesh().x_desc(panel.x_label).y_desc(label).light_line_style(WHITE.mix(0.0)).draw()?;
                // policies at the same budget keep about the same bytes: dodge them sideways so
                // their intervals stay apart
                let dodge = |policy: &str| (index(policy) as f64 - others.len() as f64 / 2.0) * 0.008 * (x1 - x0).max(1e-9);
                if let Some(full) = by_policy.get("full").and_then(|p| p.first()) {
                    let line = BLACK.mix(0.35).stroke_width(1);
                    chart.draw_series(DashedLineSeries::new([(x0, full.y), (x1, full.y)], 4, 4, line))?;
                }
                for (policy, pts) in by_policy {
                    let c = colour(policy);
                    let d = if policy == "full" { 0.0 } else { dodge(policy) };
                    let pts: Vec<Point> = pts.iter().map(|p| Point { x: p.x + d, ..*p }).collect();
                    let style = ShapeStyle { color: c.to_rgba(), filled: true, stroke_width: 2 };
                    chart
                        .draw_series(LineSeries::new(pts.iter().map(|p| (p.x, p.y)), style))?
                        .label(policy.as_str())
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], style));
                    chart.draw_series(pts.iter().map(|p| ErrorBar::new_vertical(p.x, p.lo, p.y, p.hi, c.stroke_width(1), 6)))?;
                    chart.draw_series(pts.iter().map(|p| Circle::new((p.x, p.y), 3, c.filled())))?;
                }
                if !by_policy.is_empty() {
                    chart
                        .configure_series_labels()
                        .background_style(WHITE.mix(0.85))
                        .border_style(BLACK.mix(0.3))
                        .label_font(("sans-serif", 12))
                        .draw()?;
                }
            }
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", a.out.display()))?;
    eprintln!("csp-llava: wrote {}", a.out.display());
    Ok(())
}
