//! The chat's figures (docs/BENCHMARKS.md, issue 18): on multi-question cases (a JSONL of
//! `make_eval_set.py`'s `questions-K*.jsonl`: K images, three questions), each case is one chat
//! per setting — the full cache, and each pruning policy at its budget, optionally under a cap —
//! asking the three questions in turn (answers stay in the conversation). Per setting: exact
//! match per question, agreement with the full-cache chat's answers, time to the first token
//! of a follow-up question (2nd and 3rd), and the cache the chat holds; and, for the follow-ups,
//! the one-shot path that re-reads the images for each question (`Engine::run`, same policy;
//! timed on the first 5 cases).
//!
//!     cargo run --release --example chat_figures -- MODEL_DIR questions-K16.jsonl N [POLICY:BUDGET[:CAP] ...]
//!
//! e.g. `… models/cache/smolvlm-dino /tmp/evs5/questions-K16.jsonl 30 csp:0.2 csp:0.2:0.25`.

use std::sync::Arc;

use csp_llava::config::KvCap;
use csp_llava::eval::metrics::exact_match;
use csp_llava::{Budget, Chat, ChatConfig, ContextConfig, Engine, Flow, ModelConfig, PolicyConfig, PolicyKind, Request, SamplingConfig};

#[derive(Default)]
struct Tally {
    correct: [usize; 3],
    agree: [usize; 3],
    ttft_follow: Vec<f64>,
    ttft_reread: Vec<f64>,
    kv_bytes: Vec<f64>,
    n: usize,
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: chat_figures MODEL_DIR CASES.jsonl N [POLICY:BUDGET[:CAP] ...]";
    let dir = std::path::PathBuf::from(args.first().ok_or(usage)?);
    let cases_path = std::path::PathBuf::from(args.get(1).ok_or(usage)?);
    let n: usize = args.get(2).ok_or(usage)?.parse()?;
    let mut settings: Vec<(String, PolicyConfig, Option<f64>)> = vec![("full".into(), PolicyConfig { kind: PolicyKind::Full, budget: Budget::Fraction(1.0), ..Default::default() }, None)];
    for s in &args[3..] {
        let parts: Vec<&str> = s.split(':').collect();
        let kind: PolicyKind = parts[0].parse()?;
        let budget: f64 = parts.get(1).ok_or(usage)?.parse()?;
        let cap = parts.get(2).map(|c| c.parse::<f64>()).transpose()?;
        settings.push((s.clone(), PolicyConfig { kind, budget: Budget::Fraction(budget), ..Default::default() }, cap));
    }
    let mut mcfg = ModelConfig::new(dir.join("text.gguf"), dir.join("mmproj.gguf"));
    mcfg.threads = std::env::var("THREADS").ok().and_then(|t| t.parse().ok()).unwrap_or(mcfg.threads);
    let engine = Arc::new(Engine::load(&mcfg)?);
    let base = cases_path.parent().unwrap_or(std::path::Path::new("."));
    let sampling = SamplingConfig { n_predict: 8, temp: 0.0, seed: Some(0), ..Default::default() };
    let mut tallies: Vec<Tally> = settings.iter().map(|_| Tally::default()).collect();
    for line in std::fs::read_to_string(&cases_path)?.lines().take(n) {
        let case: serde_json::Value = serde_json::from_str(line)?;
        let images: Vec<std::path::PathBuf> = case["images"].as_array().ok_or("images")?.iter().map(|p| base.join(p.as_str().unwrap_or_default())).collect();
        let qs: Vec<(String, String)> = case["questions"].as_array().ok_or("questions")?.iter().map(|q| (q["prompt"].as_str().unwrap_or_default().to_owned(), q["answer"].as_str().unwrap_or_default().to_owned())).collect();
        let mut full_answers: Vec<String> = Vec::new();
        for ((_, policy, cap), t) in settings.iter().zip(tallies.iter_mut()) {
            let ctx = ContextConfig { n_ctx: 4096, kv_max_cells: cap.map(KvCap::Fraction), ..Default::default() };
            let mut chat = Chat::new(Arc::clone(&engine), ChatConfig { ctx: ctx.clone(), policy: policy.clone(), sampling: sampling.clone(), request: Request::default() });
            for i in &images {
                chat.add_image(i);
            }
            chat.read_images(&mut |_| Flow::Continue)?;
            for (k, (q, want)) in qs.iter().enumerate().take(3) {
                let a = chat.ask(q, &mut |_| Flow::Continue)?;
                t.correct[k] += usize::from(exact_match(&a.text, want));
                if full_answers.len() < 3 {
                    full_answers.push(a.text.clone());
                }
                t.agree[k] += usize::from(a.text.trim() == full_answers[k].trim());
                if k > 0 {
                    t.ttft_follow.push(a.ttft_ms);
                }
                if k > 0 && t.n < 5 {
                    // the one-shot path: the images read again for this question
                    let req = Request { images: images.clone(), prompt: q.clone(), ..Default::default() };
                    let r = engine.run(&req, &ContextConfig { kv_shrink: true, ..ctx.clone() }, &sampling, policy, &mut |_| {})?;
                    t.ttft_reread.push(r.ttft_ms);
                }
            }
            t.kv_bytes.push(chat.stats().kv_bytes as f64);
            t.n += 1;
        }
        eprint!(".");
    }
    eprintln!();
    println!("| setting | cases | exact match q1 / q2 / q3 | agreement with the full-cache chat q1 / q2 / q3 | follow-up TTFT, chat (median ms) | re-reading the images (median ms) | KV held by the chat (median) |");
    println!("|---|---|---|---|---|---|---|");
    for ((name, _, _), t) in settings.iter().zip(tallies.iter_mut()) {
        let f = |x: usize| format!("{:.3}", x as f64 / t.n.max(1) as f64);
        println!(
            "| {name} | {} | {} / {} / {} | {} / {} / {} | {:.0} | {:.0} | {:.2} MiB |",
            t.n,
            f(t.correct[0]),
            f(t.correct[1]),
            f(t.correct[2]),
            f(t.agree[0]),
            f(t.agree[1]),
            f(t.agree[2]),
            median(&mut t.ttft_follow),
            median(&mut t.ttft_reread),
            median(&mut t.kv_bytes) / 1048576.0
        );
    }
    Ok(())
}
