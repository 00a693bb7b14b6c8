//! `csp-llava eval`: how far each policy × budget moves the answers from the full cache's, and
//! how accurate they are, on a JSONL set of cases.
//!
//! Per case the prompt is evaluated and observed **once** (flash attention off when any policy
//! observes; statistics for every requested policy gathered in that pass), the sequence is
//! saved, and every policy × budget starts from that snapshot: evict, compact, then
//! * teacher forcing over the full cache's greedy answer `a_0 … a_{m−1}`: mean KL(full ‖ policy)
//!   and top-1 agreement of the next-token distributions at positions 1 … m−1 (position 0 comes
//!   from the prefill, before any eviction, and is identical by construction) — or at positions
//!   0 … m−1 with `question_after_pruning`, where the question is read from the pruned cache;
//! * a free greedy run: ROUGE-L F1 against the full cache's answer, and, where the case has an
//!   `answer`, exact match (SQuAD normalisation) and "answer contained".

pub mod calibrate;
pub mod metrics;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{ContextConfig, Request, SamplingConfig};
use crate::engine::{Engine, PrefillMode, Session};
use crate::error::Result;
use crate::stats::StatRequest;
use crate::policy::{Budget, PolicyConfig, PolicySpec};

/// One case of the input JSONL.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Case {
    /// Identifier (string or number in the file).
    #[serde(deserialize_with = "id_string")]
    pub id: String,
    /// Image paths, relative to the JSONL file.
    #[serde(default)]
    pub images: Vec<PathBuf>,
    /// The prompt.
    pub prompt: String,
    /// The expected answer, when known.
    #[serde(default)]
    pub answer: Option<String>,
}

fn id_string<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    Ok(match v {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    })
}

/// Reads a JSONL file of cases; each line parses to a case or an error (reported as a failed
/// case, the run goes on). Image paths become relative to the file's directory.
///
/// # Errors
/// The file cannot be read (not a regular file, over 256 MiB, not UTF-8).
pub fn load_cases(path: &Path) -> Result<Vec<std::result::Result<Case, (String, String)>>> {
    let text = crate::input::read_text(path, "data file", crate::input::limits::JSON)?;
    let base = path.parent().unwrap_or(Path::new("."));
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str::<Case>(line)
                .map(|mut c| {
                    c.images = c.images.iter().map(|p| if p.is_absolute() { p.clone() } else { base.join(p) }).collect();
                    c
                })
                .map_err(|e| (format!("line-{}", i + 1), format!("line {}: {e}", i + 1)))
        })
        .collect())
}

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct EvalConfig {
    /// Policies (`full` gives the full cache's own row).
    pub policies: Vec<PolicySpec>,
    /// Budgets for each pruning policy.
    pub budgets: Vec<Budget>,
    /// Answer length cap (greedy).
    pub n_predict: usize,
    /// Context settings.
    pub ctx: ContextConfig,
    /// Policy settings other than kind and budget.
    pub policy: PolicyConfig,
    /// Read and prune the images first, then ask the question of the pruned cache
    /// ([`crate::engine::Prompt::defer_question`]); otherwise the whole prompt is read before
    /// pruning, so the first answer token always comes from the full cache.
    pub question_after_pruning: bool,
}

/// One policy × budget on one case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyResult {
    /// Policy.
    pub policy: String,
    /// Budget as given (`null` for `full`).
    pub budget: Option<String>,
    /// Cells kept.
    pub kv_cells_after: usize,
    /// Mean KL(full ‖ policy) over teacher-forced positions (`null` when the full answer has
    /// fewer than two tokens).
    pub kl: Option<f64>,
    /// Share of teacher-forced positions whose argmax is the full cache's token.
    pub top1_agreement: Option<f64>,
    /// ROUGE-L F1 between the free-run answers.
    pub rouge_l: f64,
    /// Exact match with the case's answer (1/0; `null` without an answer).
    pub accuracy: Option<f64>,
    /// Answer contained (1/0; `null` without an answer).
    pub contains: Option<f64>,
    /// The policy's answer.
    pub prediction: String,
}

/// One case's outcome (one line of `--cases-out`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseResult {
    /// Case id.
    pub id: String,
    /// Whether it ran.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Prompt tokens.
    #[serde(default)]
    pub n_prompt_tokens: usize,
    /// The full cache's greedy answer.
    #[serde(default)]
    pub full_answer: String,
    /// Per policy × budget.
    #[serde(default)]
    pub results: Vec<PolicyResult>,
}

impl CaseResult {
    /// A failed case.
    #[must_use]
    pub fn failed(id: String, error: String) -> Self {
        Self { id, ok: false, error: Some(error), n_prompt_tokens: 0, full_answer: String::new(), results: Vec::new() }
    }
}

/// The grid: (policy, budget) pairs, `full` once.
fn grid(cfg: &EvalConfig) -> Vec<(PolicySpec, Option<Budget>)> {
    let mut out = Vec::new();
    for &k in &cfg.policies {
        if !k.kind.prunes() {
            out.push((k, None));
        } else {
            out.extend(cfg.budgets.iter().map(|&b| (k, Some(b))));
        }
    }
    out
}

fn greedy(n: usize) -> SamplingConfig {
    SamplingConfig { n_predict: n as i32, temp: 0.0, seed: Some(0), ..SamplingConfig::default() }
}

/// Evaluates one case.
///
/// # Errors
/// Anything that stops the case (bad images, a prompt longer than the context, …).
pub fn eval_case(engine: &Engine, case: &Case, cfg: &EvalConfig) -> Result<CaseResult> {
    let req = Request { images: case.images.clone(), prompt: case.prompt.clone(), ..Default::default() };
    // the full-cache reference reads the whole prompt: refuse one that cannot fit before decoding
    let uncapped = ContextConfig { kv_max_cells: None, kv_reserve: None, kv_shift: false, ..cfg.ctx.clone() };
    let mut prompt = engine.prepare_for(&req, &uncapped)?;
    if cfg.question_after_pruning {
        prompt.defer_question();
    }
    let grid = grid(cfg);
    let plans = grid
        .iter()
        .map(|&(kind, budget)| engine.plan(&prompt, &kind.config(&cfg.policy, budget.unwrap_or_default())))
        .collect::<Result<Vec<_>>>()?;
    // one observed prefill serves every plan
    let mut requests: Vec<StatRequest> = Vec::new();
    let mut which: Vec<Option<usize>> = Vec::new();
    for p in &plans {
        which.push(p.request.map(|r| {
            requests.iter().position(|x| *x == r).unwrap_or_else(|| {
                requests.push(r);
                requests.len() - 1
            })
        }));
    }
    // the full cache's reference (`uncapped`, above): never capped
    let bounded = cfg.ctx.kv_max_cells.is_some();
    let (observe, ctx) = if bounded || requests.is_empty() {
        (Vec::new(), uncapped)
    } else {
        // flash attention as configured: the session observes in the graph with it on, and
        // turns it off only for what must be observed on the host (AirCache's elite window)
        (requests, uncapped)
    };
    let mut session = engine.session(&prompt, &ctx, observe)?;
    session.prefill(&prompt, PrefillMode::Chunked, &mut |_| {})?;
    let stats = session.take_stats(&prompt)?;
    let start = session.snapshot()?;

    session.eval_deferred(&prompt)?;
    let deferred = !prompt.deferred.is_empty();
    let full_first = session.last_logits().map(<[f32]>::to_vec).unwrap_or_default();
    let asked = session.snapshot()?;
    let full = session.generate(&greedy(cfg.n_predict), &mut |_| {})?;
    let forced = &full.tokens[..full.tokens.len().saturating_sub(1)];
    session.restore(&asked)?;
    let full_logits = session.teacher_forced(forced)?;

    // a pruned session, its question read: fidelity to the full cache and the free-run answer
    let score = |s: &mut Session<'_>, kind: PolicySpec, budget: Option<Budget>, kept: usize, capped: bool| -> Result<PolicyResult> {
        let q_first = s.last_logits().map(<[f32]>::to_vec);
        let pruned = s.snapshot()?;
        let q = s.teacher_forced(forced)?;
        let (kl, top1) = if deferred || capped {
            // the question was read from the pruned (or capped) cache: position 0 counts too
            let p: Vec<&[f32]> = std::iter::once(full_first.as_slice()).chain(full_logits.iter().map(Vec::as_slice)).collect();
            let q0 = q_first.unwrap_or_default();
            let qs: Vec<&[f32]> = std::iter::once(q0.as_slice()).chain(q.iter().map(Vec::as_slice)).collect();
            fidelity(&p, &qs, &full.tokens)
        } else {
            let p: Vec<&[f32]> = full_logits.iter().map(Vec::as_slice).collect();
            let qs: Vec<&[f32]> = q.iter().map(Vec::as_slice).collect();
            fidelity(&p, &qs, &full.tokens[1.min(full.tokens.len())..])
        };
        s.restore(&pruned)?;
        let answer = s.generate(&greedy(cfg.n_predict), &mut |_| {})?;
        Ok(PolicyResult {
            policy: kind.to_string(),
            budget: budget.map(|b| b.to_string()),
            kv_cells_after: kept,
            kl,
            top1_agreement: top1,
            rouge_l: metrics::rouge_l(&full.text, &answer.text),
            accuracy: case.answer.as_deref().map(|a| f64::from(u8::from(metrics::exact_match(&answer.text, a)))),
            contains: case.answer.as_deref().map(|a| f64::from(u8::from(metrics::contains(&answer.text, a)))),
            prediction: answer.text,
        })
    };

    let mut results = Vec::with_capacity(plans.len());
    for ((plan, &(kind, budget)), idx) in plans.iter().zip(&grid).zip(&which) {
        if bounded && plan.policy.prunes() {
            // every policy reads the prompt under the cap itself: one bounded prefill each
            // (`full` stays the uncapped reference)
            let n_deferred: usize = prompt.deferred.iter().map(crate::span::Span::n_tokens).sum();
            let mut p = engine.prefill_pruned(&prompt, &cfg.ctx, plan, cfg.n_predict as i32, PrefillMode::Chunked, &mut |_| {})?;
            let kept = (p.session.kv_info().n_used as usize).saturating_sub(n_deferred);
            results.push(score(&mut p.session, kind, budget, kept, true)?);
            continue;
        }
        session.restore(&start)?;
        plan.apply(&mut session, &prompt, idx.and_then(|i| stats.get(i)), cfg.n_predict as i32)?;
        let kept = session.kv_info().n_used as usize;
        session.eval_deferred(&prompt)?;
        results.push(score(&mut session, kind, budget, kept, false)?);
    }
    Ok(CaseResult { id: case.id.clone(), ok: true, error: None, n_prompt_tokens: prompt.n_tokens(), full_answer: full.text, results })
}

/// Mean KL(p ‖ q) and top-1 agreement, where `p[i]` and `q[i]` predict `targets[i]`.
fn fidelity(p: &[&[f32]], q: &[&[f32]], targets: &[i32]) -> (Option<f64>, Option<f64>) {
    let n = p.len().min(q.len()).min(targets.len());
    if n == 0 {
        return (None, None);
    }
    let kl = (0..n).map(|i| metrics::kl_divergence(p[i], q[i])).sum::<f64>() / n as f64;
    let agree = (0..n).filter(|&i| metrics::argmax(q[i]) == targets[i] as usize).count() as f64 / n as f64;
    (Some(kl), Some(agree))
}

/// Summary of one policy × budget over the cases that ran.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SummaryRow {
    /// Policy.
    pub policy: String,
    /// Budget (`null` for `full`).
    pub budget: Option<String>,
    /// Cases that ran.
    pub n_cases: usize,
    /// Mean KL(full ‖ policy).
    pub kl: Option<f64>,
    /// 95% bootstrap interval of `kl`.
    pub kl_ci: Option<[f64; 2]>,
    /// Mean top-1 agreement.
    pub top1_agreement: Option<f64>,
    /// Its interval.
    pub top1_agreement_ci: Option<[f64; 2]>,
    /// Mean ROUGE-L F1 against the full cache's answers.
    pub rouge_l: Option<f64>,
    /// Its interval.
    pub rouge_l_ci: Option<[f64; 2]>,
    /// Exact-match accuracy over cases with an answer.
    pub accuracy: Option<f64>,
    /// Its interval.
    pub accuracy_ci: Option<[f64; 2]>,
    /// "Answer contained" rate.
    pub contains: Option<f64>,
    /// Its interval.
    pub contains_ci: Option<[f64; 2]>,
    /// Mean cells kept.
    pub kv_cells_after: f64,
}

/// Aggregates case results per policy × budget (in first-seen order).
#[must_use]
pub fn summarize(cases: &[CaseResult]) -> Vec<SummaryRow> {
    let mut keys: Vec<(String, Option<String>)> = Vec::new();
    for c in cases.iter().filter(|c| c.ok) {
        for r in &c.results {
            let k = (r.policy.clone(), r.budget.clone());
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
    }
    keys.into_iter()
        .map(|(policy, budget)| {
            let rs: Vec<&PolicyResult> = cases.iter().filter(|c| c.ok).flat_map(|c| &c.results).filter(|r| r.policy == policy && r.budget == budget).collect();
            let col = |f: &dyn Fn(&PolicyResult) -> Option<f64>| metrics::mean_ci(&rs.iter().filter_map(|r| f(r)).collect::<Vec<_>>());
            let kl = col(&|r| r.kl);
            let top1 = col(&|r| r.top1_agreement);
            let rouge = col(&|r| Some(r.rouge_l));
            let acc = col(&|r| r.accuracy);
            let cont = col(&|r| r.contains);
            SummaryRow {
                policy,
                budget,
                n_cases: rs.len(),
                kl: kl.map(|x| x.0),
                kl_ci: kl.map(|x| x.1),
                top1_agreement: top1.map(|x| x.0),
                top1_agreement_ci: top1.map(|x| x.1),
                rouge_l: rouge.map(|x| x.0),
                rouge_l_ci: rouge.map(|x| x.1),
                accuracy: acc.map(|x| x.0),
                accuracy_ci: acc.map(|x| x.1),
                contains: cont.map(|x| x.0),
                contains_ci: cont.map(|x| x.1),
                kv_cells_after: rs.iter().map(|r| r.kv_cells_after as f64).sum::<f64>() / rs.len().max(1) as f64,
            }
        })
        .collect()
}

/// The summary as a Markdown table.
#[must_use]
pub fn markdown(rows: &[SummaryRow], failed: usize) -> String {
    let f = |v: Option<f64>, ci: Option<[f64; 2]>, d: usize| match (v, ci) {
        (Some(v), Some([lo, hi])) => format!("{v:.d$} [{lo:.d$}, {hi:.d$}]"),
        _ => "–".into(),
    };
    let mut out = String::from("| policy | budget | cases | KV cells | KL(full‖policy) | top-1 agreement | ROUGE-L | accuracy | contains |\n|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {:.1} | {} | {} | {} | {} | {} |\n",
            r.policy,
            r.budget.as_deref().unwrap_or("–"),
            r.n_cases,
            r.kv_cells_after,
            f(r.kl, r.kl_ci, 4),
            f(r.top1_agreement, r.top1_agreement_ci, 3),
            f(r.rouge_l, r.rouge_l_ci, 3),
            f(r.accuracy, r.accuracy_ci, 3),
            f(r.contains, r.contains_ci, 3),
        ));
    }
    out.push_str(&format!("\n{failed} case(s) failed. Means with 95% bootstrap intervals.\n"));
    out
}
