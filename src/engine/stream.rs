//! Bounded prefill (`--kv-max-cells M`): the cache never holds more than `M` cells while the
//! prompt is read, so a prompt of any number of images fits a fixed KV buffer.
//!
//! ```text
//! pieces:   [text][img 0][text][img 1][text][img 2] … [question]
//! cache:    ──fill──────────────┤evict├──fill──────┤evict├── … ──┤prompt-end pass├─ generate
//!                                  ▲ the policy on what is cached, window = last O tokens read
//! ```
//!
//! * The prompt is cut into [`Piece`]s: each image chunk whole (an image cannot be read in
//!   parts), text chunks in slices of at most `min(n_batch, M/4)` tokens.
//! * Before a piece that would not fit (`cached + piece > M`) the current policy runs on what
//!   the cache holds — its observation window being the most recent tokens read (CSP: the last
//!   O, split by query modality as usual) — and keeps `M − piece − reserve` cells, at
//!   `global` granularity (a physical cap cannot be met by masks); survivors are compacted to
//!   the front. `reserve` (`--kv-reserve`) leaves room for the text that follows and for
//!   generation, and is halved where it would leave less room than itself.
//! * Evictions are planned before the prefill ([`schedule`]): the cache's occupancy depends
//!   only on the piece sizes, so the observer knows where each window ends. Window sums restart
//!   after each eviction, so when evictions come closer than O tokens the window is what was
//!   read since the previous one (one set of sums per request; `Rows::All` accumulates).
//! * The prompt-end pass applies the policy's normal budget `B` (of the whole prompt) to what is
//!   cached, at the policy's granularity, and never keeps more than leaves room for the deferred
//!   question and the reserve.
//! * Positions keep growing (as the references do); `--kv-shift` renumbers the survivors
//!   `0..n` after every eviction (`llama_memory_seq_add`, RoPE re-applied to the cached keys).
//!
//! Every eviction is reported ([`Eviction`]); `n_prompt_tokens = kv_cells_after + Σ removed`.

use std::time::Instant;


pub use super::bounded::{pieces, schedule, Bounded, Eviction, Piece, Step};
use super::event::{ms, Event};
use super::session::{PrefillStats, Session};
use super::{Plan, Prompt};
use crate::error::{Error, Result};
use crate::llama::Logits;
use crate::policy::{self, Granularity, Retention, Split, Target};
use crate::span::Modality;

/// Keeps the last cached token (llama.cpp needs a sequence's positions to continue from its
/// last cell): when a selection dropped it, it replaces the weakest kept token (fewest votes,
/// then lowest score).
fn keep_last(r: &mut Retention) {
    let Some(last) = r.keep.len().checked_sub(1) else { return };
    if r.keep[last] {
        return;
    }
    let weakest = (0..last)
        .filter(|&t| r.keep[t])
        .min_by(|&a, &b| r.votes[a].cmp(&r.votes[b]).then(r.score[a].total_cmp(&r.score[b])));
    if let Some(w) = weakest {
        r.keep[w] = false;
    }
    r.keep[last] = true;
    if let Some(h) = r.per_head.as_mut() {
        h.keep_everywhere(last);
    }
}

impl Session<'_> {
    /// The prompt tokens the cache holds, in cell order.
    #[must_use]
    pub fn cached_tokens(&self) -> Vec<usize> {
        (0..self.n_read.min(self.token_pos.len())).filter(|&t| self.token_pos[t] >= 0).collect()
    }

    /// Evictions so far (bounded prefill, then the prompt-end pass).
    #[must_use]
    pub fn evictions(&self) -> &[Eviction] {
        &self.evictions
    }

    /// Reads the prompt under the session's cap, evicting with `plan`'s policy before every
    /// piece that would not fit.
    ///
    /// # Errors
    /// A session without a cap; llama.cpp evaluation failures; policy and observer failures.
    pub fn prefill_bounded(&mut self, prompt: &Prompt, plan: &Plan, on_event: &mut dyn FnMut(Event<'_>)) -> Result<PrefillStats> {
        let bounded = self.bounded.clone().ok_or(Error::Config { field: "kv_max_cells", reason: "the session has no cap".into() })?;
        let res = self.prefill_bounded_inner(prompt, plan, &bounded, on_event);
        self.finish_prefill(res)
    }

    fn prefill_bounded_inner(&mut self, prompt: &Prompt, plan: &Plan, b: &Bounded, on_event: &mut dyn FnMut(Event<'_>)) -> Result<PrefillStats> {
        self.first_logits = None;
        let l = prompt.n_tokens();
        let mut stats = PrefillStats { n_tokens: l, ..Default::default() };
        self.token_pos = vec![-1; l];
        self.n_read = 0;
        let mut steps = b.steps.iter().peekable();
        self.set_horizon(steps.peek().map_or(l, |s| s.at_token))?;
        let n_chunks = prompt.spans.len();
        for (i, piece) in b.pieces.iter().enumerate() {
            self.engine.check_cancel()?;
            if let Some(step) = steps.next_if(|s| s.piece == i) {
                let t = Instant::now();
                let cached = self.cached_tokens();
                let keep = self.select(prompt, plan, &cached, step.keep)?;
                let removed = self.evict(&keep)?.removed;
                self.set_horizon(steps.peek().map_or(l, |s| s.at_token))?;
                let kept = cached.len() - removed;
                self.evictions.push(Eviction { at_token: step.at_token, removed, kept, ms: ms(t) });
                tracing::debug!(at_token = step.at_token, removed, kept, "bounded prefill: evicted");
            }
            let last = i + 1 == b.pieces.len();
            let chunk = prompt.chunks.get(piece.span).expect("one span per chunk");
            let key = self.next_key();
            if piece.text {
                let start = prompt.spans[piece.span].tokens.start;
                let tokens = chunk.text_tokens().ok_or(Error::Llama { op: "read text chunk", code: -1 })?;
                let slice = tokens[piece.tokens.start - start..piece.tokens.end - start].to_vec();
                let t = Instant::now();
                self.eval_tokens(&slice, last)?;
                stats.prefill_ms += ms(t);
            } else {
                self.read_media(&chunk, &mut stats)?;
            }
            for (k, tok) in piece.tokens.clone().enumerate() {
                self.token_pos[tok] = key + k as i32;
            }
            self.n_read = piece.tokens.end;
            self.note_pos();
            on_event(Event::Prefill { chunk: piece.span + 1, n_chunks, tokens: piece.tokens.end, n_tokens: l });
        }
        Ok(stats)
    }

    /// Evaluates text tokens after the cache, in batches of `n_batch`; the last token's logits
    /// are kept when `logits_last`.
    fn eval_tokens(&mut self, tokens: &[i32], logits_last: bool) -> Result<()> {
        let n_batch = self.n_batch as usize;
        for (c, part) in tokens.chunks(n_batch).enumerate() {
            let final_part = (c + 1) * n_batch >= tokens.len();
            let logits = if logits_last && final_part { Logits::Last } else { Logits::None };
            self.lctx.decode(part, self.n_past, logits).map_err(|e| match e {
                Error::Llama { code, .. } => Error::Llama { op: "decode text chunk", code },
                e => e,
            })?;
            self.n_past += part.len() as i32;
        }
        Ok(())
    }

    fn set_horizon(&mut self, horizon: usize) -> Result<()> {
        if let Some(c) = self.collector() {
            c.set_horizon(horizon);
        }
        self.install_graph_plan()
    }

    /// Runs `plan`'s policy on the cached tokens to keep `keep` of them, at global granularity
    /// (a physical cap); returns the keep flags over the whole prompt.
    fn select(&mut self, prompt: &Prompt, plan: &Plan, cached: &[usize], keep: usize) -> Result<Vec<bool>> {
        let stats = self.collector().and_then(|c| c.gather(cached));
        let kv = plan.kv_request.map(|r| self.kv_stats(r, cached, stats.as_ref().and_then(|s| s.moments.as_ref()))).transpose()?;
        let view = View::new(prompt, cached.to_vec(), stats, kv);
        let retention = view.retain(plan, keep, Some(Granularity::Global))?.full;
        if let Some(merge) = plan.policy.merge() {
            // LOOK-M: what leaves the bounded cache is folded into what stays, at each eviction
            self.merge(&retention, merge)?;
        }
        Ok(retention.keep)
    }
}

/// What the cache holds of a prompt, as a prompt of its own: the policy ranks only these tokens.
#[derive(Debug)]
pub(super) struct View {
    /// Prompt indices of the cached tokens, in cell order.
    pub tokens: Vec<usize>,
    /// Their modalities.
    pub modality: Vec<Modality>,
    /// Their attention statistics (gathered columns).
    pub stats: Option<crate::stats::AttentionStats>,
    /// Their cache statistics.
    pub kv: Option<crate::stats::KvStats>,
    l: usize,
}

/// A policy's decision on a [`View`].
#[derive(Debug)]
pub(super) struct Selection {
    /// Over the whole prompt.
    pub full: Retention,
    /// Over the view's tokens.
    pub sub: Retention,
    /// The budget used on the view.
    pub split: Split,
}

impl View {
    pub(super) fn new(prompt: &Prompt, tokens: Vec<usize>, stats: Option<crate::stats::AttentionStats>, kv: Option<crate::stats::KvStats>) -> Self {
        let all = prompt.token_modalities();
        let modality = tokens.iter().map(|&t| all[t]).collect();
        Self { tokens, modality, stats, kv, l: prompt.n_tokens() }
    }

    /// The policy's input for a budget of `keep` cells on the view.
    pub(super) fn input(&self, split: Split, protect: policy::Protect) -> policy::Input<'_> {
        policy::Input { modality: &self.modality, split, stats: self.stats.as_ref(), protect, kv: self.kv.as_ref() }
    }

    /// Runs `plan`'s policy to keep `keep` of the view's tokens (the last one always), the
    /// budget resolved by the policy ([`policy::Policy::split`]).
    pub(super) fn retain(&self, plan: &Plan, keep: usize, granularity: Option<Granularity>) -> Result<Selection> {
        let split = plan.policy.split(Target::Cells(keep), &self.modality, plan.recent_bias)?;
        let mut sub = policy::retain(plan.policy.as_ref(), &self.input(split, plan.protect), granularity)?;
        keep_last(&mut sub);
        Ok(Selection { full: sub.expand(&self.tokens, self.l), sub, split })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_token_survives() {
        let mut r = Retention {
            keep: vec![true, true, false, true, false],
            votes: vec![3, 1, 0, 2, 0],
            score: vec![0.0; 5],
            granularity: Granularity::Global,
            per_head: None,
        };
        keep_last(&mut r);
        assert_eq!(r.keep, vec![true, false, false, true, true]);
    }
}
