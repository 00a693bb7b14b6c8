//! The registry: one line per policy in the table below gives its [`PolicyKind`] variant, its
//! name on the command line and in JSON, its type (which implements [`Build`]), and — for a
//! policy with parameters — the field of [`Params`] that holds them (its `Build::Params`).
//! Here too: the settings every policy shares ([`PolicyConfig`]) and a policy with a
//! granularity ([`PolicySpec`]).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{aircache, csp, expected, full, h2o, keydiff, knorm, lookm, prefixkv, random, snapkv, streaming, vnorm};
use super::{Budget, Build, Granularity, Policy, PolicyParams};
use crate::error::{Error, Result};

/// The parameters a policy is built from: its field of [`Params`], or none.
macro_rules! params_of {
    ($cfg:ident) => {
        &()
    };
    ($cfg:ident $field:ident) => {
        &$cfg.params.$field
    };
}

/// Generates [`PolicyKind`] (with `ALL`, `name`, `build`) and [`Params`] from the table.
macro_rules! registry {
    ($( $(#[doc = $doc:literal])* $kind:ident $name:literal => $ty:ty $({ $field:ident: $params:ty })? ;)+) => {
        /// The registry of policies.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
        #[serde(rename_all = "lowercase")]
        pub enum PolicyKind {
            $( $(#[doc = $doc])* $kind, )+
        }

        impl PolicyKind {
            /// All policies, in CLI order.
            pub const ALL: [PolicyKind; [$($name),+].len()] = [$(PolicyKind::$kind),+];

            /// CLI / JSON name.
            #[must_use]
            pub fn name(self) -> &'static str {
                match self {
                    $(PolicyKind::$kind => $name,)+
                }
            }

            /// Builds the policy from `cfg`: its parameters, and the budget where they depend on
            /// it (a PrefixKV profile).
            ///
            /// # Errors
            /// Parameters that do not fit the budget.
            pub fn build(self, cfg: &PolicyConfig) -> Result<Box<dyn Policy>> {
                Ok(match self {
                    $(PolicyKind::$kind => Box::new(<$ty as Build>::build(params_of!(cfg $($field)?), cfg.budget)?),)+
                })
            }
        }

        /// Every policy's parameters, one field per policy that has any (named as the policy).
        #[derive(Debug, Clone, Default, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct Params {
            $($(
                #[doc = concat!("`", $name, "`'s parameters.")]
                pub $field: $params,
            )?)+
        }

        impl Params {
            /// Every policy's range checks.
            fn validate(&self) -> Result<()> {
                $($( PolicyParams::validate(&self.$field)?; )?)+
                Ok(())
            }
        }
    };
}

registry! {
    /// No pruning.
    Full "full" => full::Full;
    /// Cross-Self Pruning.
    Csp "csp" => csp::Csp { csp: csp::Csp };
    /// Heavy-Hitter Oracle (prefill-only).
    H2o "h2o" => h2o::H2o;
    /// SnapKV.
    SnapKv "snapkv" => snapkv::SnapKv { snapkv: snapkv::SnapKv };
    /// LOOK-M: text-prior selection, evicted entries merged into the most similar kept ones.
    LookM "lookm" => lookm::LookM { lookm: lookm::LookM };
    /// PrefixKV: per-layer budgets from an offline profile, fixed-point eviction at decode.
    PrefixKv "prefixkv" => prefixkv::PrefixKv { prefixkv: prefixkv::PrefixKvParams };
    /// AirCache: elite observation window, visual tokens only, per-layer budgets.
    AirCache "aircache" => aircache::AirCache { aircache: aircache::AirCache };
    /// StreamingLLM: attention sinks + recent window.
    Streaming "streaming" => streaming::Streaming { streaming: streaming::Streaming };
    /// Seeded random selection + recent window.
    Random "random" => random::Random { random: random::Random };
    /// KNorm: smallest key norms (no attention).
    KNorm "knorm" => knorm::KNorm { knorm: knorm::KNorm };
    /// Value-norm ranking (InfiniPot-V): largest value norms (no attention).
    VNorm "vnorm" => vnorm::VNorm { vnorm: vnorm::VNorm };
    /// KeyDiff: keys least similar to the mean key (no attention).
    KeyDiff "keydiff" => keydiff::KeyDiff { keydiff: keydiff::KeyDiff };
    /// Expected Attention: attention expected from the statistics of future queries.
    Expected "expected" => expected::Expected { expected: expected::Expected };
}

/// Pruning settings. Errors name fields by their path here (`budget`, `recent_bias`,
/// `csp.cross_ratio`, …), not by a command-line flag.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyConfig {
    /// The policy.
    pub kind: PolicyKind,
    /// Budget (default 0.2 of the prompt).
    pub budget: Budget,
    /// Recent window = recent·recent_bias, recent = B/2 (default 1).
    pub recent_bias: f64,
    /// Observation window (query rows); policy default when `None`; `Some(usize::MAX)`: every
    /// prompt row (`--obs-window all`).
    pub obs_window: Option<usize>,
    /// `None` = the policy's own (global, or layer for PrefixKV/AirCache).
    pub granularity: Option<Granularity>,
    /// CSP: n-softmax at decode too (a sink logit ln n per head in every layer; paper Eq. 7),
    /// with CSP's `n`.
    pub decode_sink: bool,
    /// Protected sink tokens of the window-based policies (CSP, SnapKV, AirCache, PrefixKV): the
    /// prompt's first tokens and each image's first tokens, counted in the budget. Default: none (the methods
    /// as released).
    pub protect: super::Protect,
    /// Each policy's parameters.
    pub params: Params,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            kind: PolicyKind::Full,
            budget: Budget::default(),
            recent_bias: 1.0,
            obs_window: None,
            granularity: None,
            decode_sink: false,
            protect: super::Protect::default(),
            params: Params::default(),
        }
    }
}

impl PolicyConfig {
    /// Range checks that need no prompt, every policy's parameters included, and that the
    /// policy can be built (a PrefixKV profile calibrated for the budget).
    ///
    /// # Errors
    /// [`Error::Config`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let err = |field, reason: String| Err(Error::Config { field, reason });
        if !(self.recent_bias > 0.0 && self.recent_bias.is_finite()) {
            return err("recent_bias", format!("{} must be positive (the last prompt token is always kept)", self.recent_bias));
        }
        if self.obs_window == Some(0) {
            return err("obs_window", "must be at least 1 query".into());
        }
        self.params.validate()?;
        if self.decode_sink && self.kind != PolicyKind::Csp {
            return err("decode_sink", format!("applies to the csp policy, not {}", self.kind));
        }
        self.kind.build(self).map(drop)
    }

    /// n of the n-softmax applied at decode, when [`PolicyConfig::decode_sink`] asks for it.
    #[must_use]
    pub fn decode_sink_n(&self) -> Option<f32> {
        let n = self.params.csp.n;
        (self.decode_sink && n > 0.0).then_some(n)
    }
}

impl Default for PolicyKind {
    fn default() -> Self {
        PolicyKind::Full
    }
}

impl PolicyKind {
    /// Whether the policy ever evicts ([`Policy::prunes`]; `full` does not).
    #[must_use]
    pub fn prunes(self) -> bool {
        self.build(&PolicyConfig::default()).map_or(true, |p| p.prunes())
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        PolicyKind::ALL.into_iter().find(|p| p.name().eq_ignore_ascii_case(s)).ok_or_else(|| {
            let names: Vec<_> = PolicyKind::ALL.iter().map(|p| p.name()).collect();
            format!("unknown policy '{s}' (one of {})", names.join(", "))
        })
    }
}

/// A policy with an optional granularity: `csp`, `csp@head`, `h2o@layer` (bench and eval
/// lists compare granularities side by side).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PolicySpec {
    /// The policy.
    pub kind: PolicyKind,
    /// Its granularity; `None` = the configured one, or the policy's own.
    pub granularity: Option<Granularity>,
}

impl From<PolicyKind> for PolicySpec {
    fn from(kind: PolicyKind) -> Self {
        Self { kind, granularity: None }
    }
}

impl fmt::Display for PolicySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.granularity {
            Some(g) => write!(f, "{}@{g}", self.kind),
            None => write!(f, "{}", self.kind),
        }
    }
}

impl FromStr for PolicySpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('@') {
            Some((k, g)) => Ok(Self { kind: k.parse()?, granularity: Some(g.parse()?) }),
            None => Ok(Self { kind: s.parse()?, granularity: None }),
        }
    }
}

impl PolicySpec {
    /// `base` with this policy (and granularity, when given).
    #[must_use]
    pub fn config(&self, base: &PolicyConfig, budget: Budget) -> PolicyConfig {
        PolicyConfig { kind: self.kind, budget, granularity: self.granularity.or(base.granularity), ..base.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{AirCache, Csp};

    #[test]
    fn config_ranges() {
        let csp = |c: Csp| PolicyConfig { params: Params { csp: c, ..Default::default() }, ..Default::default() };
        assert!(PolicyConfig::default().validate().is_ok());
        assert!(csp(Csp { cross_ratio: 1.2, ..Default::default() }).validate().is_err());
        assert!(PolicyConfig { recent_bias: 0.0, ..Default::default() }.validate().is_err());
        assert!(csp(Csp { n: -1.0, ..Default::default() }).validate().is_err());
        assert!(PolicyConfig { obs_window: Some(0), ..Default::default() }.validate().is_err());
        let air = |a: AirCache| PolicyConfig { params: Params { aircache: a, ..Default::default() }, ..Default::default() };
        assert!(air(AirCache { alpha: 0.0, ..Default::default() }).validate().is_err());
        assert!(air(AirCache { r_min: 1.5, ..Default::default() }).validate().is_err());
        assert!(PolicyConfig { decode_sink: true, ..Default::default() }.validate().is_err());
        assert!(PolicyConfig { kind: PolicyKind::Csp, decode_sink: true, ..Default::default() }.validate().is_ok());
    }

    #[test]
    fn errors_name_fields_not_flags() {
        let e = PolicyConfig { recent_bias: -1.0, ..Default::default() }.validate().unwrap_err();
        assert!(matches!(e, Error::Config { field: "recent_bias", .. }), "{e}");
        let bad = PolicyConfig { params: Params { csp: Csp { cross_ratio: 2.0, n: 1.0 }, ..Default::default() }, ..Default::default() };
        assert!(matches!(bad.validate().unwrap_err(), Error::Config { field: "csp.cross_ratio", .. }));
    }

    #[test]
    fn params_deserialize_with_defaults() {
        let p: Params = serde_json::from_str(r#"{"csp": {"cross_ratio": 0.3}, "random": {"seed": 7}}"#).unwrap();
        assert_eq!((p.csp.cross_ratio, p.csp.n, p.random.seed), (0.3, 1.0, 7));
        assert_eq!(p.aircache.alpha, 0.9);
        assert!(serde_json::from_str::<Params>(r#"{"csp": {"ratio": 0.3}}"#).is_err(), "unknown fields are refused");
    }

    #[test]
    fn names_round_trip_and_every_policy_builds() {
        for kind in PolicyKind::ALL {
            assert_eq!(kind.name().parse::<PolicyKind>().unwrap(), kind);
            let p = kind.build(&PolicyConfig { kind, ..Default::default() }).unwrap();
            assert_eq!(p.name(), kind.name());
            assert_eq!(kind.prunes(), kind != PolicyKind::Full);
        }
        assert_eq!("csp@head".parse::<PolicySpec>().unwrap().to_string(), "csp@head");
        assert!("pyramid".parse::<PolicyKind>().unwrap_err().contains("unknown policy"));
    }
}
