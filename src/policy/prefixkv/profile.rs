//! A PrefixKV profile: per-layer retention calibrated on one model, one entry per budget
//! (the file `csp-llava calibrate` writes and `PrefixKvParams::profile` holds).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::policy::Budget;

/// Per-layer retention profiles for one model, one entry per calibrated budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// The model file it was calibrated on (informational).
    pub model: String,
    /// Calibration samples.
    pub samples: usize,
    /// One entry per budget.
    pub budgets: Vec<ProfileEntry>,
}

/// The per-layer fractions for one budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileEntry {
    /// The retained budget (`--kv-budget`).
    pub budget: f64,
    /// Retained fraction per layer (mean ≈ `budget`).
    pub retain: Vec<f64>,
    /// Forget fraction per layer (the reference's `confs/*.json` values): `1 − retain`.
    pub forget: Vec<f64>,
}

impl Profile {
    /// Averages per-sample forget fractions, one list of samples per budget.
    #[must_use]
    pub fn from_samples(model: String, budgets: &[f64], per_budget: &[Vec<Vec<f64>>]) -> Self {
        let samples = per_budget.first().map_or(0, Vec::len);
        let budgets = budgets
            .iter()
            .zip(per_budget)
            .map(|(&budget, rs)| {
                let n_layer = rs.first().map_or(0, Vec::len);
                let forget: Vec<f64> = (0..n_layer).map(|l| rs.iter().map(|r| r[l]).sum::<f64>() / rs.len() as f64).collect();
                ProfileEntry { budget, retain: forget.iter().map(|f| 1.0 - f).collect(), forget }
            })
            .collect();
        Self { model, samples, budgets }
    }

    /// Reads a profile.
    ///
    /// # Errors
    /// Unreadable or malformed files.
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Config { field: "prefixkv.profile", reason: format!("{}: {reason}", path.display()) };
        let text = crate::input::read_text(path, "PrefixKV profile", crate::input::limits::JSON)?;
        let p: Profile = serde_json::from_str(&text).map_err(|e| bad(format!("not a PrefixKV profile ({e})")))?;
        if p.budgets.is_empty() || p.budgets.iter().any(|b| b.forget.iter().any(|f| !(0.0..=1.0).contains(f))) {
            return Err(bad("no budgets, or forget fractions outside [0, 1]".into()));
        }
        Ok(p)
    }

    /// The forget fractions calibrated for `budget`.
    ///
    /// # Errors
    /// A budget the profile was not calibrated for.
    pub fn layers_for(&self, budget: Budget) -> Result<&[f64]> {
        let have = || self.budgets.iter().map(|b| b.budget.to_string()).collect::<Vec<_>>().join(", ");
        let Budget::Fraction(b) = budget else {
            return Err(Error::Config { field: "budget", reason: format!("prefixkv profiles are per fraction ({}); a cell count has none", have()) });
        };
        self.budgets.iter().find(|e| (e.budget - b).abs() < 1e-9).map(|e| e.forget.as_slice()).ok_or_else(|| Error::Config {
            field: "budget",
            reason: format!("the PrefixKV profile has budgets {}, not {b}; run csp-llava calibrate --kv-budget {b}", have()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_lookup() {
        let p = Profile::from_samples("m".into(), &[0.2, 0.5], &[vec![vec![0.7, 0.9], vec![0.9, 0.7]], vec![vec![0.5, 0.5]]]);
        assert_eq!(p.layers_for(Budget::Fraction(0.2)).unwrap(), &[0.8, 0.8]);
        assert!((p.budgets[0].retain[0] - 0.2).abs() < 1e-12);
        assert!(p.layers_for(Budget::Fraction(0.3)).is_err());
        assert!(p.layers_for(Budget::Cells(10)).is_err());
    }
}
