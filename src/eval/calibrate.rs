//! `csp-llava calibrate`: PrefixKV's offline profile (methods §2.4). One observed prefill per
//! calibration case (accumulated attention over all prompt queries, head mean per layer), the
//! common-threshold search per case and budget ([`prefixkv::calibrate_sample`]), then the
//! element-wise mean over cases (the reference's averaging script is not public; the mean is
//! the natural reading).

use super::Case;
use crate::config::{ContextConfig, Request};
use crate::engine::{Engine, PrefillMode};
use crate::error::{Error, Result};
use crate::stats::{Rows, StatRequest};
use crate::policy::prefixkv::{self, Profile};

/// Calibrates a profile for each retained budget in `budgets` over `cases`; `progress` sees
/// each case as it finishes.
///
/// # Errors
/// No usable case; engine errors of a case are returned with the case id.
pub fn calibrate(engine: &Engine, cases: &[Case], budgets: &[f64], ctx: &ContextConfig, progress: &mut dyn FnMut(usize)) -> Result<Profile> {
    if cases.is_empty() {
        return Err(Error::Config { field: "data", reason: "no calibration cases".into() });
    }
    if let Some(b) = budgets.iter().find(|b| !(**b > 0.0 && **b <= 1.0)) {
        return Err(Error::Config { field: "budget", reason: format!("{b} is not a fraction in (0, 1]") });
    }
    let mut per_budget: Vec<Vec<Vec<f64>>> = vec![Vec::new(); budgets.len()];
    for (i, case) in cases.iter().enumerate() {
        let req = Request { images: case.images.clone(), prompt: case.prompt.clone(), ..Default::default() };
        let prompt = engine.prepare(&req)?;
        let mut session = engine.session(&prompt, ctx, vec![StatRequest { rows: Rows::All, n: 0.0 }])?;
        session.prefill(&prompt, PrefillMode::Chunked, &mut |_| {})?;
        let stats = session.take_stats(&prompt)?;
        let scores = prefixkv::layer_scores(&stats[0]);
        for (k, &b) in budgets.iter().enumerate() {
            per_budget[k].push(prefixkv::calibrate_sample(&scores, b));
        }
        progress(i + 1);
    }
    let model = engine.config().model.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(Profile::from_samples(model, budgets, &per_budget))
}
