//! Paired comparisons: every policy × budget against the full cache and against every other
//! policy at the same budget, on the same cases (and questions), metric by metric — the mean
//! difference with a paired-bootstrap 95% interval (cases resampled together, so what two
//! policies share cancels) and the count of cases where each side wins.

use serde::Serialize;

use super::metrics::mean_ci;
use std::collections::HashMap;

use super::{result_keys, CaseResult, PolicyResult};

/// A metric the comparison covers, and which way is better.
struct Metric {
    name: &'static str,
    higher_is_better: bool,
    get: fn(&PolicyResult) -> Option<f64>,
}

const METRICS: &[Metric] = &[
    Metric { name: "accuracy", higher_is_better: true, get: |r| r.accuracy },
    Metric { name: "contains", higher_is_better: true, get: |r| r.contains },
    Metric { name: "per_image_accuracy", higher_is_better: true, get: |r| r.per_image_accuracy },
    Metric { name: "kl", higher_is_better: false, get: |r| r.kl },
    Metric { name: "top1_agreement", higher_is_better: true, get: |r| r.top1_agreement },
    Metric { name: "rouge_l", higher_is_better: true, get: |r| Some(r.rouge_l) },
    Metric { name: "perplexity", higher_is_better: false, get: |r| r.perplexity },
];

/// One paired comparison (`a − b` over the units both have).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Paired {
    /// Policy on the left (`policy` or `policy@budget`).
    pub a: String,
    /// Policy on the right (`full`, or another policy at the same budget).
    pub b: String,
    /// The budget of the comparison (`null`: none of the two prunes).
    pub budget: Option<String>,
    /// `accuracy`, `contains`, `per_image_accuracy`, `kl`, `top1_agreement`, `rouge_l`,
    /// `perplexity`.
    pub metric: &'static str,
    /// Units (case × question) both sides have a value for.
    pub n: usize,
    /// Mean of `a − b`.
    pub mean_diff: f64,
    /// Paired-bootstrap 95% interval of `mean_diff`.
    pub ci: [f64; 2],
    /// Units where `a` is better (higher, or lower for `kl` and `perplexity`).
    pub wins_a: usize,
    /// Units where `b` is better.
    pub wins_b: usize,
    /// Units with equal values.
    pub ties: usize,
}

/// A unit's identity: case id and question index.
type Unit = (String, usize);

/// The results of one policy × budget, by unit.
fn column<'a>(cases: &'a [CaseResult], policy: &str, budget: Option<&str>) -> Vec<(Unit, &'a PolicyResult)> {
    cases
        .iter()
        .filter(|c| c.ok)
        .flat_map(|c| c.results.iter().map(move |r| ((c.id.clone(), r.question), r)))
        .filter(|(_, r)| r.policy == policy && r.budget.as_deref() == budget)
        .collect()
}

/// Every comparison the results allow: per budget, each pruning policy against `full` (when
/// it ran) and against each other policy at that budget, in first-seen order.
#[must_use]
pub fn paired(cases: &[CaseResult]) -> Vec<Paired> {
    let keys = result_keys(cases);
    let full = keys.iter().find(|(p, b)| p == "full" && b.is_none()).cloned();
    let mut budgets: Vec<Option<String>> = Vec::new();
    for (_, b) in &keys {
        if b.is_some() && !budgets.contains(b) {
            budgets.push(b.clone());
        }
    }
    let mut out = Vec::new();
    for budget in &budgets {
        let at: Vec<&(String, Option<String>)> = keys.iter().filter(|(_, b)| b == budget).collect();
        for (i, (pa, _)) in at.iter().enumerate() {
            let left = column(cases, pa, budget.as_deref());
            if let Some((pf, _)) = &full {
                out.extend(compare(&left, &column(cases, pf, None), pa, pf, budget));
            }
            for (pb, _) in &at[i + 1..] {
                out.extend(compare(&left, &column(cases, pb, budget.as_deref()), pa, pb, budget));
            }
        }
    }
    out
}

fn compare(a: &[(Unit, &PolicyResult)], b: &[(Unit, &PolicyResult)], name_a: &str, name_b: &str, budget: &Option<String>) -> Vec<Paired> {
    let by_unit: HashMap<&Unit, &PolicyResult> = b.iter().map(|(u, r)| (u, *r)).collect();
    METRICS
        .iter()
        .filter_map(|m| {
            let pairs: Vec<(f64, f64)> = a
                .iter()
                .filter_map(|(u, ra)| {
                    let rb = by_unit.get(u)?;
                    Some(((m.get)(ra)?, (m.get)(rb)?))
                })
                .collect();
            let diffs: Vec<f64> = pairs.iter().map(|(x, y)| x - y).collect();
            let (mean_diff, ci) = mean_ci(&diffs)?;
            let better = |x: f64, y: f64| if m.higher_is_better { x > y } else { x < y };
            Some(Paired {
                a: name_a.to_owned(),
                b: name_b.to_owned(),
                budget: budget.clone(),
                metric: m.name,
                n: pairs.len(),
                mean_diff,
                ci,
                wins_a: pairs.iter().filter(|(x, y)| better(*x, *y)).count(),
                wins_b: pairs.iter().filter(|(x, y)| better(*y, *x)).count(),
                ties: pairs.iter().filter(|(x, y)| x == y).count(),
            })
        })
        .collect()
}

/// The comparisons of the answer-level metrics (accuracy, contains, per-image accuracy, KL) as a
/// Markdown table; `-o json` has every metric.
#[must_use]
pub fn markdown(rows: &[Paired]) -> String {
    let shown: Vec<&Paired> = rows.iter().filter(|r| matches!(r.metric, "accuracy" | "contains" | "per_image_accuracy" | "kl")).collect();
    if shown.is_empty() {
        return String::new();
    }
    let mut out = String::from("\n| a | b | budget | metric | n | mean a − b [95% CI] | a wins | b wins | ties |\n|---|---|---|---|---|---|---|---|---|\n");
    for r in shown {
        let d = if r.metric == "kl" { 4 } else { 3 };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:+.d$} [{:+.d$}, {:+.d$}] | {} | {} | {} |\n",
            r.a,
            r.b,
            r.budget.as_deref().unwrap_or("–"),
            r.metric,
            r.n,
            r.mean_diff,
            r.ci[0],
            r.ci[1],
            r.wins_a,
            r.wins_b,
            r.ties
        ));
    }
    out.push_str("\nPaired differences on the same cases; intervals from a paired bootstrap (1000 resamples of the cases). Lower is better for KL.\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(policy: &str, budget: Option<&str>, acc: f64, kl: f64) -> PolicyResult {
        PolicyResult {
            policy: policy.into(),
            budget: budget.map(Into::into),
            question: 0,
            kv_cells_after: 0,
            kv_bytes_after: 0,
            kl: Some(kl),
            top1_agreement: None,
            rouge_l: 1.0,
            accuracy: Some(acc),
            contains: Some(acc),
            per_image_accuracy: None,
            perplexity: None,
            prediction: String::new(),
        }
    }

    fn case(id: usize, full: f64, a: f64, b: f64, kl_a: f64, kl_b: f64) -> CaseResult {
        CaseResult {
            id: id.to_string(),
            ok: true,
            error: None,
            n_prompt_tokens: 10,
            full_answer: String::new(),
            full_answers: Vec::new(),
            results: vec![result("full", None, full, 0.0), result("csp", Some("0.2"), a, kl_a), result("h2o", Some("0.2"), b, kl_b)],
        }
    }

    #[test]
    fn pairs_every_policy_with_full_and_each_other() {
        // csp right on 8 of 10 cases, h2o on 4; full on all
        let cases: Vec<CaseResult> = (0..10).map(|i| case(i, 1.0, f64::from(u8::from(i < 8)), f64::from(u8::from(i % 2 == 0 && i < 8)), 0.1, 0.3)).collect();
        let p = paired(&cases);
        let get = |a: &str, b: &str, m: &str| p.iter().find(|r| r.a == a && r.b == b && r.metric == m).unwrap().clone();
        let csp_full = get("csp", "full", "accuracy");
        assert_eq!((csp_full.n, csp_full.wins_a, csp_full.wins_b, csp_full.ties), (10, 0, 2, 8));
        assert!((csp_full.mean_diff + 0.2).abs() < 1e-12);
        assert!(csp_full.ci[0] < -0.2 + 1e-12 && csp_full.ci[1] <= 0.0);
        let csp_h2o = get("csp", "h2o", "accuracy");
        assert_eq!((csp_h2o.wins_a, csp_h2o.wins_b, csp_h2o.ties), (4, 0, 6));
        assert!((csp_h2o.mean_diff - 0.4).abs() < 1e-12);
        assert!(csp_h2o.ci[0] > 0.0, "a lead on 4 of 10 with no losses is real: {:?}", csp_h2o.ci);
        // KL: lower wins
        let kl = get("csp", "h2o", "kl");
        assert_eq!((kl.wins_a, kl.wins_b), (10, 0));
        assert!(kl.mean_diff < 0.0);
        // no pair of a policy with itself, h2o–csp only once, none for metrics without values
        assert!(p.iter().all(|r| r.a != r.b));
        assert!(!p.iter().any(|r| r.a == "h2o" && r.b == "csp"));
        assert!(!p.iter().any(|r| r.metric == "perplexity"));
        assert!(markdown(&p).contains("| csp | h2o | 0.2 | accuracy | 10 | +0.400"));
    }

    #[test]
    fn pairs_only_units_both_sides_have() {
        let mut cases: Vec<CaseResult> = (0..4).map(|i| case(i, 1.0, 1.0, 0.0, 0.1, 0.2)).collect();
        cases[3].results.retain(|r| r.policy != "h2o");
        cases[2].ok = false;
        let p = paired(&cases);
        let r = p.iter().find(|r| r.a == "csp" && r.b == "h2o" && r.metric == "accuracy").unwrap();
        assert_eq!(r.n, 2);
    }
}
