//! Cancelling a running request from another thread (Ctrl-C in the CLI, a button in an app).
//!
//! An [`Engine`](crate::Engine) owns one [`CancelHandle`]; clones share the flag. Once cancelled,
//! the engine's runs stop at the next check — between prompt chunks, between generated tokens,
//! and inside llama.cpp's graph evaluation (its abort callback) — until [`CancelHandle::reset`].
//! A cancelled prefill returns [`Error::Cancelled`](crate::Error::Cancelled); a cancelled
//! generation returns what it generated so far, with the stop reason `cancelled`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A shared cancellation flag.
#[derive(Debug, Clone, Default)]
pub struct CancelHandle(Arc<AtomicBool>);

impl CancelHandle {
    /// A new, not cancelled, handle.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every run of the engine holding this handle to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether [`CancelHandle::cancel`] was called since the last reset.
    #[must_use]
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Clears the flag, so the engine can run again.
    pub fn reset(&self) {
        self.0.store(false, Ordering::Relaxed);
    }

    /// The flag itself (for llama.cpp's abort callback).
    pub(crate) fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_flag() {
        let a = CancelHandle::new();
        let b = a.clone();
        assert!(!b.is_cancelled());
        a.cancel();
        assert!(b.is_cancelled());
        b.reset();
        assert!(!a.is_cancelled());
    }
}
