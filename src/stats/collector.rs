//! The engine's handle on the statistics a prefill collects: the [`Reducer`] is shared with the
//! observer in `llama/` (as a [`SharedSink`], locked for each callback), and the engine reads and
//! steers it between evaluations through these methods — never through the observer.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::{AttentionStats, Reducer, SharedSink};

/// A [`Reducer`] shared with the observer that feeds it.
#[derive(Debug)]
pub struct Collector(Arc<Mutex<Reducer>>);

impl Collector {
    /// Wraps `reducer`; hand [`sink`](Self::sink) to the observer.
    #[must_use]
    pub fn new(reducer: Reducer) -> Self {
        Self(Arc::new(Mutex::new(reducer)))
    }

    /// The same reducer, as the observer holds it.
    #[must_use]
    pub fn sink(&self) -> SharedSink {
        self.0.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Reducer> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bounded prefill: windows of the following ubatches end before token `horizon`.
    pub fn set_horizon(&self, horizon: usize) {
        self.lock().set_horizon(horizon);
    }

    /// After an eviction packed the survivors (`kept(token)`) into the first cells.
    pub fn on_compact(&self, kept: &dyn Fn(usize) -> bool) {
        self.lock().on_compact(kept);
    }

    /// The first request's statistics so far, for the prompt tokens `tokens` in that order
    /// (what a bounded prefill's policy ranks); `None` without requests.
    #[must_use]
    pub fn gather(&self, tokens: &[usize]) -> Option<AttentionStats> {
        self.lock().stats().first().map(|s| s.gather(tokens))
    }

    /// The in-graph plan for the tokens from `n_read` on (see [`Reducer::graph_plan`]).
    #[must_use]
    pub fn graph_plan(&self, n_read: usize, token_pos: &[i32], next_pos: i32) -> Option<super::GraphPlan> {
        self.lock().graph_plan(n_read, token_pos, next_pos)
    }

    /// Whether the requests can be computed in the graph.
    #[must_use]
    pub fn graph_capable(&self) -> bool {
        self.lock().graph_capable()
    }

    /// Milliseconds spent reducing so far.
    #[must_use]
    pub fn ms(&self) -> f64 {
        self.lock().ms
    }

    /// Prompt tokens seen so far.
    #[must_use]
    pub fn tokens_seen(&self) -> usize {
        self.lock().tokens_seen()
    }

    /// Takes the statistics, one per request.
    #[must_use]
    pub fn take_stats(&self) -> Vec<AttentionStats> {
        self.lock().take_stats()
    }
}
