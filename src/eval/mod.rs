//! `csp-llava eval`: how far each policy × budget moves the answers from the full cache's, and
//! how accurate they are, on a JSONL set of cases.
//!
//! Per case the prompt is evaluated and observed **once** (statistics for every requested policy
//! gathered in that pass, in llama.cpp's graph with flash attention on where the policies allow
//! it), the sequence is saved, and every policy × budget starts from that snapshot: evict,
//! compact, then
//! * teacher forcing over the full cache's greedy answer `a_0 … a_{m−1}`: mean KL(full ‖ policy)
//!   and top-1 agreement of the next-token distributions at positions 1 … m−1 (position 0 comes
//!   from the prefill, before any eviction, and is identical by construction) — or at positions
//!   0 … m−1 with `question_after_pruning`, where the question is read from the pruned cache;
//!   and the perplexity of the full cache's answer under the pruned cache (PrefixKV's measure);
//! * a free greedy run: ROUGE-L F1 against the full cache's answer, and, where the case has an
//!   `answer`, exact match (SQuAD normalisation), "answer contained" and, for enumerations
//!   ("Image 1: … Image 2: …"), per-image accuracy.
//!
//! The protocols ([`Protocol`]): (1) the question in the prompt (the papers' setting), (2) the
//! question asked after pruning, (3) several questions of one pruned cache (cases with
//! `questions`; each asked from the same pruned snapshot, kvpress's question-agnostic setting),
//! (4) under a cap (`kv_max_cells`: every policy reads the prompt within it). [`paired()`] compares
//! policies on the same cases.

pub mod calibrate;
pub mod metrics;
pub mod paired;

pub use paired::{paired, Paired};

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{ContextConfig, Request, SamplingConfig};
use crate::engine::{Engine, PrefillMode, Session};
use crate::error::{Error, Result};
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
    /// The prompt (the images' question); may be empty when `questions` are given.
    #[serde(default)]
    pub prompt: String,
    /// The expected answer, when known.
    #[serde(default)]
    pub answer: Option<String>,
    /// Several questions about the same images, each asked of the same pruned cache
    /// (protocol 3); replaces `prompt` and `answer`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub questions: Vec<Question>,
    /// What the case tests (`single`, `in-image`, `count`, `enum`, …), carried to the results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
}

/// One question of a multi-question case.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Question {
    /// The question.
    pub prompt: String,
    /// Its expected answer, when known.
    #[serde(default)]
    pub answer: Option<String>,
}

impl Case {
    /// The case's questions: `questions`, or the one `prompt` with its `answer`.
    #[must_use]
    pub fn all_questions(&self) -> Vec<Question> {
        if self.questions.is_empty() {
            vec![Question { prompt: self.prompt.clone(), answer: self.answer.clone() }]
        } else {
            self.questions.clone()
        }
    }
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
                .and_then(|c| {
                    if c.prompt.trim().is_empty() && c.questions.is_empty() {
                        Err((format!("line-{}", i + 1), format!("line {} (case {}): the case has neither a prompt nor questions", i + 1, c.id)))
                    } else if !c.prompt.trim().is_empty() && !c.questions.is_empty() {
                        Err((format!("line-{}", i + 1), format!("line {} (case {}): give a prompt or questions, not both", i + 1, c.id)))
                    } else {
                        Ok(c)
                    }
                })
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

/// How the cases are asked, named in the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// (1) The question is part of the prompt that is read and pruned.
    QuestionInPrompt,
    /// (2) The images are read and pruned first; the question is read from the pruned cache.
    QuestionAfterPruning,
    /// (3) Several questions, each read from the same pruned cache.
    MultiQuestion,
}

impl EvalConfig {
    /// The protocol for cases with `n_questions` questions; (4) is [`EvalConfig::capped`] on top.
    #[must_use]
    pub fn protocol(&self, n_questions: usize) -> Protocol {
        if n_questions > 1 {
            Protocol::MultiQuestion
        } else if self.question_after_pruning {
            Protocol::QuestionAfterPruning
        } else {
            Protocol::QuestionInPrompt
        }
    }

    /// (4): every policy reads the prompt under a cap (`kv_max_cells`).
    #[must_use]
    pub fn capped(&self) -> bool {
        self.ctx.kv_max_cells.is_some()
    }

    /// The protocol's name for a report: e.g. `question-after-pruning`, `multi-question, capped`.
    #[must_use]
    pub fn protocol_name(&self, cases: &[CaseResult]) -> String {
        let multi = cases.iter().any(|c| c.results.iter().any(|r| r.question > 0));
        let p = self.protocol(if multi { 2 } else { 1 });
        let name = serde_json::to_value(p).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        if self.capped() { format!("{name}, capped") } else { name }
    }
}

/// One policy × budget on one case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyResult {
    /// Policy.
    pub policy: String,
    /// Budget as given (`null` for `full`).
    pub budget: Option<String>,
    /// Which of the case's questions (0 for single-question cases).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub question: usize,
    /// Cells kept.
    pub kv_cells_after: usize,
    /// K+V bytes of the cells kept (all layers; 0 in results written before it existed).
    #[serde(default)]
    pub kv_bytes_after: u64,
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
    /// Share of an enumeration's images described right (`null` when the expected answer is no
    /// `Image k: …` enumeration).
    #[serde(default)]
    pub per_image_accuracy: Option<f64>,
    /// Perplexity of the full cache's answer under this cache (teacher forced, same positions
    /// as `kl`).
    #[serde(default)]
    pub perplexity: Option<f64>,
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
    /// The full cache's greedy answer (to the first question).
    #[serde(default)]
    pub full_answer: String,
    /// The full cache's answers to every question of a multi-question case.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub full_answers: Vec<String>,
    /// Per policy × budget.
    #[serde(default)]
    pub results: Vec<PolicyResult>,
}

impl CaseResult {
    /// A failed case.
    #[must_use]
    pub fn failed(id: String, error: String) -> Self {
        Self { id, ok: false, error: Some(error), n_prompt_tokens: 0, full_answer: String::new(), full_answers: Vec::new(), results: Vec::new() }
    }
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if signature
fn is_zero(v: &usize) -> bool {
    *v == 0
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

/// The full cache's answer to one question, the reference every policy is scored against.
struct Reference {
    /// Logits after the question was read (they predict the answer's first token).
    first: Vec<f32>,
    /// The greedy answer.
    text: String,
    tokens: Vec<i32>,
    /// Teacher-forced logits over the answer (position i predicts token i + 1).
    logits: Vec<Vec<f32>>,
}

/// Evaluates one case.
///
/// # Errors
/// Anything that stops the case (bad images, a prompt longer than the context, questions that
/// do not share the images' prefix, …).
pub fn eval_case(engine: &Engine, case: &Case, cfg: &EvalConfig) -> Result<CaseResult> {
    let questions = case.all_questions();
    let multi = questions.len() > 1;
    // the full-cache reference reads the whole prompt: refuse one that cannot fit before decoding
    let uncapped = ContextConfig { kv_max_cells: None, kv_reserve: None, kv_shift: false, ..cfg.ctx.clone() };
    let mut prompts = Vec::with_capacity(questions.len());
    for q in &questions {
        let req = Request { images: case.images.clone(), prompt: q.prompt.clone(), ..Default::default() };
        let mut p = engine.prepare_for(&req, &uncapped)?;
        if multi && !p.defer_question() {
            return Err(Error::Prompt("a multi-question case needs its images before each question".into()));
        }
        prompts.push(p);
    }
    if prompts.iter().any(|p| !same_prefix(p, &prompts[0])) {
        return Err(Error::Prompt("the questions of a multi-question case must share everything before them (images, labels)".into()));
    }
    let prompt = &prompts[0];
    let grid = grid(cfg);
    let plans = grid
        .iter()
        .map(|&(kind, budget)| engine.plan(prompt, &kind.config(&cfg.policy, budget.unwrap_or_default())))
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
    // flash attention as configured: the session observes in the graph with it on, and turns
    // it off only for what must be observed on the host (AirCache's elite window)
    let observe = if bounded { Vec::new() } else { requests };
    let mut session = engine.session(prompt, &uncapped, observe)?;
    session.prefill(prompt, PrefillMode::Chunked, &mut |_| {})?;
    let stats = session.take_stats(prompt)?;
    let start = session.snapshot()?;

    let deferred = !prompt.deferred.is_empty();
    let mut refs = Vec::with_capacity(prompts.len());
    for (i, p) in prompts.iter().enumerate() {
        if i > 0 {
            session.restore(&start)?;
        }
        session.eval_deferred(p)?;
        let first = session.last_logits().map(<[f32]>::to_vec).unwrap_or_default();
        let asked = session.snapshot()?;
        let full = session.generate(&greedy(cfg.n_predict), &mut |_| {})?;
        let forced = &full.tokens[..full.tokens.len().saturating_sub(1)];
        session.restore(&asked)?;
        let logits = session.teacher_forced(forced)?;
        refs.push(Reference { first, text: full.text, tokens: full.tokens, logits });
    }

    // a pruned session, its question read: fidelity to the full cache and the free-run answer
    let score = |s: &mut Session<'_>, kind: PolicySpec, budget: Option<Budget>, kept: usize, capped: bool, qi: usize| -> Result<PolicyResult> {
        let reference = &refs[qi];
        let forced = &reference.tokens[..reference.tokens.len().saturating_sub(1)];
        let q_first = s.last_logits().map(<[f32]>::to_vec);
        let pruned = s.snapshot()?;
        let q = s.teacher_forced(forced)?;
        let fid = if deferred || capped {
            // the question was read from the pruned (or capped) cache: position 0 counts too
            let p: Vec<&[f32]> = std::iter::once(reference.first.as_slice()).chain(reference.logits.iter().map(Vec::as_slice)).collect();
            let q0 = q_first.unwrap_or_default();
            let qs: Vec<&[f32]> = std::iter::once(q0.as_slice()).chain(q.iter().map(Vec::as_slice)).collect();
            fidelity(&p, &qs, &reference.tokens)
        } else {
            let p: Vec<&[f32]> = reference.logits.iter().map(Vec::as_slice).collect();
            let qs: Vec<&[f32]> = q.iter().map(Vec::as_slice).collect();
            fidelity(&p, &qs, &reference.tokens[1.min(reference.tokens.len())..])
        };
        s.restore(&pruned)?;
        let answer = s.generate(&greedy(cfg.n_predict), &mut |_| {})?;
        let expected = questions[qi].answer.as_deref();
        Ok(PolicyResult {
            policy: kind.to_string(),
            budget: budget.map(|b| b.to_string()),
            question: qi,
            kv_cells_after: kept,
            kv_bytes_after: kept as u64 * s.kv_info().bytes_per_cell(),
            kl: fid.kl,
            top1_agreement: fid.top1,
            rouge_l: metrics::rouge_l(&reference.text, &answer.text),
            accuracy: expected.map(|a| f64::from(u8::from(metrics::exact_match(&answer.text, a)))),
            contains: expected.map(|a| f64::from(u8::from(metrics::contains(&answer.text, a)))),
            per_image_accuracy: expected.and_then(|a| metrics::per_image_accuracy(&answer.text, a)),
            perplexity: fid.perplexity,
            prediction: answer.text,
        })
    };

    let mut results = Vec::with_capacity(plans.len() * prompts.len());
    for ((plan, &(kind, budget)), idx) in plans.iter().zip(&grid).zip(&which) {
        if bounded && plan.policy.prunes() {
            // every policy reads the prompt under the cap itself: one bounded prefill each (and
            // each question; `refs` stay the uncapped reference)
            for (qi, p) in prompts.iter().enumerate() {
                let n_deferred: usize = p.deferred.iter().map(crate::span::Span::n_tokens).sum();
                let mut pre = engine.prefill_pruned(p, &cfg.ctx, plan, cfg.n_predict as i32, PrefillMode::Chunked, &mut |_| {})?;
                let kept = (pre.session.kv_info().n_used as usize).saturating_sub(n_deferred);
                results.push(score(&mut pre.session, kind, budget, kept, true, qi)?);
            }
            continue;
        }
        session.restore(&start)?;
        plan.apply(&mut session, prompt, idx.and_then(|i| stats.get(i)), cfg.n_predict as i32)?;
        let kept = session.kv_info().n_used as usize;
        let pruned = if multi { Some(session.snapshot()?) } else { None };
        for (qi, p) in prompts.iter().enumerate() {
            if qi > 0 {
                session.restore(pruned.as_ref().expect("multi-question"))?;
            }
            session.eval_deferred(p)?;
            results.push(score(&mut session, kind, budget, kept, false, qi)?);
        }
    }
    let full_answers = if multi { refs.iter().map(|r| r.text.clone()).collect() } else { Vec::new() };
    let full_answer = refs.into_iter().next().map(|r| r.text).unwrap_or_default();
    Ok(CaseResult { id: case.id.clone(), ok: true, error: None, n_prompt_tokens: prompt.n_tokens(), full_answer, full_answers, results })
}

/// Whether two prompts are the same before their deferred questions: the same spans, the same
/// text token ids, the same images.
fn same_prefix(a: &crate::engine::Prompt, b: &crate::engine::Prompt) -> bool {
    a.spans.len() == b.spans.len()
        && a.spans.iter().zip(&b.spans).enumerate().all(|(i, (x, y))| {
            x.tokens == y.tokens
                && x.media == y.media
                && x.modality == y.modality
                && match (a.chunks.get(i), b.chunks.get(i)) {
                    (Some(cx), Some(cy)) => cx.text_tokens() == cy.text_tokens(),
                    _ => false,
                }
        })
}

/// Fidelity of a pruned cache's teacher-forced distributions to the full cache's.
struct Fidelity {
    kl: Option<f64>,
    top1: Option<f64>,
    perplexity: Option<f64>,
}

/// Mean KL(p ‖ q), top-1 agreement and the perplexity of `targets` under q, where `p[i]` and
/// `q[i]` predict `targets[i]`.
fn fidelity(p: &[&[f32]], q: &[&[f32]], targets: &[i32]) -> Fidelity {
    let n = p.len().min(q.len()).min(targets.len());
    if n == 0 {
        return Fidelity { kl: None, top1: None, perplexity: None };
    }
    let kl = (0..n).map(|i| metrics::kl_divergence(p[i], q[i])).sum::<f64>() / n as f64;
    let agree = (0..n).filter(|&i| metrics::argmax(q[i]) == targets[i] as usize).count() as f64 / n as f64;
    let nll = (0..n).map(|i| metrics::nll(q[i], usize::try_from(targets[i]).unwrap_or(usize::MAX))).sum::<f64>() / n as f64;
    Fidelity { kl: Some(kl), top1: Some(agree), perplexity: Some(nll.exp()) }
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
    /// Mean per-image accuracy over enumeration cases.
    pub per_image_accuracy: Option<f64>,
    /// Its interval.
    pub per_image_accuracy_ci: Option<[f64; 2]>,
    /// Mean perplexity of the full cache's answers under this cache.
    pub perplexity: Option<f64>,
    /// Its interval.
    pub perplexity_ci: Option<[f64; 2]>,
    /// Mean cells kept.
    pub kv_cells_after: f64,
    /// Mean K+V bytes kept (what `csp-llava plot` puts on its x axis).
    pub kv_bytes_after: f64,
}

/// The policy × budget pairs of the cases that ran, in first-seen order.
fn result_keys(cases: &[CaseResult]) -> Vec<(String, Option<String>)> {
    let mut keys: Vec<(String, Option<String>)> = Vec::new();
    for c in cases.iter().filter(|c| c.ok) {
        for r in &c.results {
            let k = (r.policy.clone(), r.budget.clone());
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
    }
    keys
}

/// Aggregates case results per policy × budget (in first-seen order).
#[must_use]
pub fn summarize(cases: &[CaseResult]) -> Vec<SummaryRow> {
    result_keys(cases)
        .into_iter()
        .map(|(policy, budget)| {
            let rs: Vec<&PolicyResult> = cases.iter().filter(|c| c.ok).flat_map(|c| &c.results).filter(|r| r.policy == policy && r.budget == budget).collect();
            let col = |f: &dyn Fn(&PolicyResult) -> Option<f64>| metrics::mean_ci(&rs.iter().filter_map(|r| f(r)).collect::<Vec<_>>());
            let kl = col(&|r| r.kl);
            let top1 = col(&|r| r.top1_agreement);
            let rouge = col(&|r| Some(r.rouge_l));
            let acc = col(&|r| r.accuracy);
            let cont = col(&|r| r.contains);
            let per_image = col(&|r| r.per_image_accuracy);
            let ppl = col(&|r| r.perplexity);
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
                per_image_accuracy: per_image.map(|x| x.0),
                per_image_accuracy_ci: per_image.map(|x| x.1),
                perplexity: ppl.map(|x| x.0),
                perplexity_ci: ppl.map(|x| x.1),
                kv_cells_after: rs.iter().map(|r| r.kv_cells_after as f64).sum::<f64>() / rs.len().max(1) as f64,
                kv_bytes_after: rs.iter().map(|r| r.kv_bytes_after as f64).sum::<f64>() / rs.len().max(1) as f64,
            }
        })
        .collect()
}

/// The summary as a Markdown table (per-image accuracy and perplexity only when a case has
/// them), then the paired comparisons.
#[must_use]
pub fn markdown(rows: &[SummaryRow], paired: &[Paired], protocol: &str, failed: usize) -> String {
    let f = |v: Option<f64>, ci: Option<[f64; 2]>, d: usize| match (v, ci) {
        (Some(v), Some([lo, hi])) => format!("{v:.d$} [{lo:.d$}, {hi:.d$}]"),
        _ => "–".into(),
    };
    let enums = rows.iter().any(|r| r.per_image_accuracy.is_some());
    let ppl = rows.iter().any(|r| r.perplexity.is_some());
    let mut out = format!("Protocol: {protocol}\n\n| policy | budget | cases | KV cells | KL(full‖policy) | top-1 agreement | ROUGE-L | accuracy | contains |");
    let mut rule = String::from("|---|---|---|---|---|---|---|---|---|");
    if enums {
        out.push_str(" per-image accuracy |");
        rule.push_str("---|");
    }
    if ppl {
        out.push_str(" perplexity |");
        rule.push_str("---|");
    }
    out.push('\n');
    out.push_str(&rule);
    out.push('\n');
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {:.1} | {} | {} | {} | {} | {} |",
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
        if enums {
            out.push_str(&format!(" {} |", f(r.per_image_accuracy, r.per_image_accuracy_ci, 3)));
        }
        if ppl {
            out.push_str(&format!(" {} |", f(r.perplexity, r.perplexity_ci, 3)));
        }
        out.push('\n');
    }
    out.push_str(&format!("\n{failed} case(s) failed. Means with 95% bootstrap intervals.\n"));
    out.push_str(&paired::markdown(paired));
    out
}
