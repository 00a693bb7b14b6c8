//! The budget and how it is resolved for one prompt.
//!
//! `B` has one meaning for every policy: it counts everything kept — sinks, the recent window
//! and selected tokens. A [`Budget`] is what the user asks for; a policy resolves it for a
//! prompt of `L` tokens into a [`Split`] (`B = r + k`) with [`Policy::split`](super::Policy::split),
//! the one place a budget becomes cells — for the prompt-end pass and for every view of a
//! bounded cache ([`Target`]).

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use serde::Serialize;

use crate::error::{Error, Result};

/// A budget: a fraction of the prompt or a number of cells.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Budget {
    /// `0 < b ≤ 1`: keep floor(b·L) of the L prompt tokens (written with a decimal point).
    Fraction(f64),
    /// Keep this many cells (a bare integer).
    Cells(usize),
}

impl Default for Budget {
    fn default() -> Self {
        Budget::Fraction(0.2)
    }
}

impl FromStr for Budget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.contains('.') || s.contains(['e', 'E']) {
            let b: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
            if !(b > 0.0 && b <= 1.0) {
                return Err(format!("fraction {s} is outside (0, 1]; write a cell count without a decimal point"));
            }
            Ok(Budget::Fraction(b))
        } else {
            let n: usize = s.parse().map_err(|_| format!("'{s}' is neither a fraction (0.2) nor a cell count (512)"))?;
            if n == 0 {
                return Err("a budget of 0 cells keeps nothing".into());
            }
            Ok(Budget::Cells(n))
        }
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // keep the decimal point: "1" would read back as one cell
            Budget::Fraction(b) if b.fract() == 0.0 => write!(f, "{b:.1}"),
            Budget::Fraction(b) => write!(f, "{b}"),
            Budget::Cells(n) => write!(f, "{n}"),
        }
    }
}

/// What a selection must keep: the user's [`Budget`], which each policy reads its own way
/// (AirCache: of the image tokens), or exactly this many cells — the room a bounded cache
/// leaves, the same for every policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// The configured budget, for the whole prompt.
    Budget(Budget),
    /// A physical number of cells.
    Cells(usize),
}

impl Target {
    /// The target as a budget of cells (the default reading).
    #[must_use]
    pub fn budget(self) -> Budget {
        match self {
            Target::Budget(b) => b,
            Target::Cells(n) => Budget::Cells(n),
        }
    }
}

/// How per-layer / per-head choices become a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    /// One keep-set for the whole model (physical budget B).
    Global,
    /// One keep-set per layer (B per layer; physical cells = the union).
    Layer,
    /// One keep-set per (layer, KV head), as the references (B per head; physical = union).
    Head,
}

impl Granularity {
    /// CLI / JSON name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Granularity::Global => "global",
            Granularity::Layer => "layer",
            Granularity::Head => "head",
        }
    }
}

impl fmt::Display for Granularity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Granularity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [Granularity::Global, Granularity::Layer, Granularity::Head]
            .into_iter()
            .find(|g| g.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown granularity '{s}' (one of global, layer, head)"))
    }
}

/// The budget resolved for one prompt: `b = r + k`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Split {
    /// Prompt tokens.
    pub l: usize,
    /// Cells kept in all (min(B, L)).
    pub b: usize,
    /// B/2: the paper's recent share, and CSP's default observation window.
    pub recent: usize,
    /// Most recent tokens always kept (recent·recent_bias, at least 1, at most B); 0 for the
    /// policies that protect tokens of their own instead ([`Split::without_recent`]).
    pub r: usize,
    /// Tokens selected by score: b − r.
    pub k: usize,
}

impl Split {
    /// Resolves `budget` for `l` prompt tokens.
    ///
    /// # Errors
    /// [`Error::Config`] (`budget`) when the budget rounds to zero cells.
    pub fn new(budget: Budget, l: usize, recent_bias: f64) -> Result<Self> {
        let b = match budget {
            Budget::Fraction(f) => (f * l as f64).floor() as usize,
            Budget::Cells(n) => n,
        }
        .min(l);
        if b == 0 && l > 0 {
            return Err(Error::Config { field: "budget", reason: format!("{budget} of {l} prompt tokens keeps no cell; raise it") });
        }
        let recent = b / 2;
        let r = ((recent as f64 * recent_bias).floor() as usize).clamp(1.min(b), b);
        Ok(Self { l, b, recent, r, k: b - r })
    }

    /// [`Split::new`] without a recent window: every cell is selected by the policy, which
    /// protects its own tokens (PrefixKV: the first and the last; AirCache: all text).
    ///
    /// # Errors
    /// As [`Split::new`].
    pub fn without_recent(budget: Budget, l: usize) -> Result<Self> {
        let s = Self::new(budget, l, 1.0)?;
        Ok(Self { r: 0, k: s.b, ..s })
    }

    /// [`Split::new`] with only the last token as its recent window (`r = 1`): the kvpress
    /// scorers rank every other token (llama.cpp continues from the last cached position, so
    /// that one stays).
    ///
    /// # Errors
    /// As [`Split::new`].
    pub fn last_only(budget: Budget, l: usize) -> Result<Self> {
        let s = Self::new(budget, l, 1.0)?;
        let r = 1.min(s.b);
        Ok(Self { r, k: s.b - r, ..s })
    }

    /// Whether anything is evicted.
    #[must_use]
    pub fn prunes(&self) -> bool {
        self.b < self.l
    }

    /// Candidates for selection: every token before the recent window.
    #[must_use]
    pub fn candidates(&self) -> Range<usize> {
        0..self.l - self.r
    }

    /// The recent window.
    #[must_use]
    pub fn recent_window(&self) -> Range<usize> {
        self.l - self.r..self.l
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_parsing() {
        assert_eq!("0.2".parse::<Budget>().unwrap(), Budget::Fraction(0.2));
        assert_eq!("1.0".parse::<Budget>().unwrap(), Budget::Fraction(1.0));
        assert_eq!("512".parse::<Budget>().unwrap(), Budget::Cells(512));
        for b in ["0.2", "1.0", "0.05", "512"] {
            assert_eq!(b.parse::<Budget>().unwrap().to_string(), b, "display round-trips");
        }
        for bad in ["0", "0.0", "1.5", "-0.1", "x", "-3"] {
            assert!(bad.parse::<Budget>().is_err(), "{bad}");
        }
    }

    #[test]
    fn split_follows_the_paper() {
        let s = Split::new(Budget::Fraction(0.2), 1000, 1.0).unwrap();
        assert_eq!((s.b, s.recent, s.r, s.k), (200, 100, 100, 100));
        let s = Split::new(Budget::Fraction(0.2), 1000, 1.5).unwrap();
        assert_eq!((s.b, s.r, s.k), (200, 150, 50));
        let s = Split::new(Budget::Cells(10), 1000, 5.0).unwrap();
        assert_eq!((s.b, s.r, s.k), (10, 10, 0), "R is capped at B");
        let s = Split::new(Budget::Cells(1), 1000, 1.0).unwrap();
        assert_eq!((s.b, s.r, s.k), (1, 1, 0), "the last token is always kept");
        let s = Split::new(Budget::Cells(5000), 1000, 1.0).unwrap();
        assert!(!s.prunes());
        assert!(Split::new(Budget::Fraction(0.001), 100, 1.0).is_err());
    }

    #[test]
    fn without_recent_selects_everything() {
        let s = Split::without_recent(Budget::Fraction(0.2), 1000).unwrap();
        assert_eq!((s.b, s.recent, s.r, s.k), (200, 100, 0, 200));
        assert_eq!(s.candidates(), 0..1000);
        assert!(s.recent_window().is_empty());
        assert!(Split::without_recent(Budget::Fraction(0.001), 100).is_err());
    }
}
