//! `csp-llava calibrate`: PrefixKV's offline per-layer retention profile.

use std::io::Write;

use anyhow::{bail, Context, Result};
use csp_llava::policy::Budget;

use super::{load, progress, usage};
use crate::args::CalibrateArgs;

pub fn calibrate(a: &CalibrateArgs, verbose: u8) -> Result<()> {
    let budgets = a
        .kv_budget
        .iter()
        .map(|b| match b {
            Budget::Fraction(f) => Ok(*f),
            Budget::Cells(n) => Err(anyhow::anyhow!("--kv-budget: PrefixKV profiles are per fraction; write {n} as a fraction like 0.2")),
        })
        .collect::<Result<Vec<f64>>>()?;
    if a.ctx.kv_max_cells.is_some() {
        bail!("--kv-max-cells does not apply to calibrate: the profile is measured on the full cache");
    }
    let ctx = a.ctx.context();
    usage(ctx.validate())?;
    let mut cases = Vec::new();
    for c in csp_llava::eval::load_cases(&a.data)? {
        match c {
            Ok(c) => cases.push(c),
            Err((id, e)) => eprintln!("csp-llava: skipping case {id}: {e}"),
        }
    }
    cases.truncate(a.max_cases);
    // written at the end: make sure it can be, first
    let mut out = std::fs::File::create(&a.out).with_context(|| format!("cannot write {}", a.out.display()))?;
    let engine = load(&a.model)?;
    let bar = progress(verbose, Some("calibrate [{bar:30}] {pos}/{len} cases {elapsed}"), "calibrate");
    bar.set_length(cases.len() as u64);
    let profile = csp_llava::eval::calibrate::calibrate(&engine, &cases, &budgets, &ctx, &mut |i| bar.set_position(i as u64))?;
    bar.finish_and_clear();
    out.write_all((serde_json::to_string_pretty(&profile)? + "\n").as_bytes()).with_context(|| format!("cannot write {}", a.out.display()))?;
    for e in &profile.budgets {
        let fmt: Vec<String> = e.retain.iter().map(|r| format!("{r:.2}")).collect();
        eprintln!("budget {}: retained per layer [{}]", e.budget, fmt.join(" "));
    }
    eprintln!("wrote {} ({} cases)", a.out.display(), profile.samples);
    Ok(())
}
