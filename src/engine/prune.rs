//! Pruning a prefilled session: the [`Plan`] a policy makes for a prompt (budget, the
//! statistics it needs) and [`Plan::apply`] — score, evict, compact, shrink, masks, decode-time
//! eviction.

use super::event::ms;
use super::{stream, Bounded, Engine, Prompt, Pruning, Session};
use crate::error::{Error, Result};
use crate::policy::{self, PolicyConfig, Target};
use crate::stats::{KvRequest, StatRequest};

impl Engine {
    /// What a policy will do with a prompt: its budget and the statistics it needs. The plan
    /// does not shrink the pruned cache; [`Engine::run_prompt`] sets [`Plan::shrink`] from
    /// [`crate::config::ContextConfig::kv_shrink`].
    ///
    /// # Errors
    /// A policy that cannot be built for the budget (a PrefixKV profile without it); a budget
    /// that keeps nothing; models the policy cannot prune.
    pub fn plan(&self, prompt: &Prompt, policy_cfg: &PolicyConfig) -> Result<Plan> {
        let modality = prompt.token_modalities();
        let policy = policy_cfg.kind.build(policy_cfg)?;
        let (target, bias) = (Target::Budget(policy_cfg.budget), policy_cfg.recent_bias);
        let split = if policy.applies(&modality) { Some(policy.split(target, &modality, bias)?) } else { None };
        let prunes = split.is_some_and(|s| s.prunes());
        let request = split.filter(|_| prunes).and_then(|s| policy.request(&s, policy_cfg.obs_window));
        let mut granularity = policy_cfg.granularity;
        if prunes && policy_cfg.kind == policy::PolicyKind::PrefixKv && policy_cfg.params.prefixkv.profile.is_none() {
            // once per process (eval plans every case); here, not at argument parsing, so that
            // bad input still fails with its one line
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    "--kv-policy prefixkv without --prefixkv-profile keeps the same share in every layer, not the calibrated profile the method needs (on the policy table it did worse than random at every budget): run `csp-llava calibrate` first"
                );
            });
        }
        // every model prunes: M-RoPE by cell key (patch 0014); images that attend both ways are
        // observed in the graph with the layer's own mask (patch 0015; the host observer is
        // refused when the session starts)
        if prunes {
            if policy.kv_request().is_some() && self.caps.sliding_window {
                // known before the prompt is read (patch 0009 scans plain caches only)
                return Err(Error::Unsupported {
                    what: "KV statistics",
                    reason: format!("{} ranks the cached keys and values, and llama.cpp cannot scan this cache (the sliding-window model's iSWA memory)", policy.name()),
                });
            }
            // per-layer/per-head masks do not cover a sliding-window model's second cache: asked
            // for, refused; a policy's own default falls back to one set for all
            match granularity {
                Some(g) if g != policy::Granularity::Global && self.caps.sliding_window => {
                    return Err(Error::Unsupported {
                        what: "per-layer/per-head retention",
                        reason: format!("masks per {} do not cover this model's sliding-window cache; use --kv-granularity global", g.name()),
                    });
                }
                None if policy.granularity() != policy::Granularity::Global && self.caps.sliding_window => {
                    tracing::warn!("{} keeps tokens per {} through masks, which do not cover this model's sliding-window cache: one set for all layers and heads instead", policy.name(), policy.granularity().name());
                    granularity = Some(policy::Granularity::Global);
                }
                _ => {}
            }
        }
        // a bounded prefill evicts even where the prompt-end pass would not (text-only CSP)
        let stream_request = split.or_else(|| policy.split(target, &modality, bias).ok()).and_then(|s| policy.request(&s, policy_cfg.obs_window));
        let kv_request = policy.kv_request();
        Ok(Plan {
            kv_request,
            policy,
            split,
            prunes,
            request,
            stream_request,
            recent_bias: bias,
            shrink: false,
            granularity,
            decode_sink: policy_cfg.decode_sink_n(),
            protect: policy_cfg.protect,
        })
    }
}

/// A policy applied to one prompt: see [`Engine::plan`].
#[derive(Debug)]
pub struct Plan {
    /// The policy.
    pub policy: Box<dyn policy::Policy>,
    /// Its budget, when it applies to the prompt.
    pub split: Option<policy::Split>,
    /// Whether anything will be evicted.
    pub prunes: bool,
    /// The attention statistics it needs.
    pub request: Option<StatRequest>,
    /// The statistics a bounded prefill's evictions need (also where the prompt-end pass does
    /// not prune).
    pub stream_request: Option<StatRequest>,
    /// The statistics of the cached keys and values it needs (computed before each selection).
    pub kv_request: Option<KvRequest>,
    /// `recent_bias`, for budgets resolved on what a bounded cache holds.
    pub recent_bias: f64,
    /// Move the pruned cache into a smaller context ([`crate::config::ContextConfig::kv_shrink`]; `false` from
    /// [`Engine::plan`]).
    pub shrink: bool,
    /// `--kv-granularity` (the policy's own when `None`).
    pub granularity: Option<policy::Granularity>,
    /// n of the n-softmax applied at decode (`--csp-decode-sink`).
    pub decode_sink: Option<f32>,
    /// Protected sink tokens (`--kv-protect-first`, `--kv-protect-image`).
    pub protect: policy::Protect,
}

impl Plan {
    /// Scores, evicts and compacts (and shrinks) a prefilled session; `stats` must answer
    /// `self.request`. `n_predict` sizes the room kept by `--kv-shrink`. On a bounded session the
    /// budget `B` (of the whole prompt) is applied to what the cache holds, within the room the
    /// cap leaves for the deferred question and the reserve.
    ///
    /// # Errors
    /// Missing statistics; llama.cpp refusals.
    pub fn apply(&self, session: &mut Session<'_>, prompt: &Prompt, stats: Option<&crate::stats::AttentionStats>, n_predict: i32) -> Result<Pruning> {
        let mut pruning = Pruning { split: self.split, ..Pruning::default() };
        let cached = session.cached_tokens();
        let limit = session.bounded.as_ref().map(Bounded::final_limit);
        let over = limit.is_some_and(|m| cached.len() > m);
        let split = self.split.filter(|_| self.prunes);
        if split.is_none() && !over {
            return Ok(pruning);
        }
        let t = std::time::Instant::now();
        let whole = cached.len() == prompt.n_tokens() && !over;
        let (retention, decode_eviction) = if let (true, Some(split)) = (whole, split) {
            let modality = prompt.token_modalities();
            let kv = self.kv_request.map(|r| session.kv_stats(r, &cached, stats.and_then(|s| s.moments.as_ref()))).transpose()?;
            let input = policy::Input { modality: &modality, split, stats, protect: self.protect, kv: kv.as_ref() };
            let retention = policy::retain(self.policy.as_ref(), &input, self.granularity)?;
            let de = self.policy.decode_eviction(&input, &retention)?;
            (retention, de.map(|de| (de, None)))
        } else {
            // what a bounded cache holds, ranked as a prompt of its own
            let b = split.map_or(cached.len(), |s| s.b).min(cached.len()).min(limit.unwrap_or(usize::MAX));
            let granularity = if split.is_some() { self.granularity } else { Some(policy::Granularity::Global) };
            let gathered = stats.map(|s| s.gather(&cached));
            let kv = self.kv_request.map(|r| session.kv_stats(r, &cached, stats.and_then(|s| s.moments.as_ref()))).transpose()?;
            let view = stream::View::new(prompt, cached, gathered, kv);
            let sel = view.retain(self, b, granularity)?;
            let de = self.policy.decode_eviction(&view.input(sel.split, self.protect), &sel.sub)?;
            (sel.full, de.map(|de| (de, Some(view.tokens))))
        };
        pruning.score_ms = session.observe_ms() + ms(t);
        let n_read = session.n_read;
        if let Some(merge) = self.policy.merge() {
            let t = std::time::Instant::now();
            pruning.merged = session.merge(&retention, merge)?;
            pruning.evict_ms += ms(t);
        }
        let ev = session.evict(&retention.keep)?;
        pruning.evict_ms += ev.ms;
        pruning.pruned = ev.removed > 0;
        if session.bounded.is_some() && ev.removed > 0 {
            let kept = session.cached_tokens().len();
            session.evictions.push(stream::Eviction { at_token: n_read, removed: ev.removed, kept, ms: ms(t) });
        }
        if self.shrink {
            let kept = retention.kept() as u32;
            let room = session.shrink_room.unwrap_or_else(|| if n_predict >= 0 { n_predict as u32 } else { session.n_ctx().saturating_sub(prompt.n_tokens() as u32) });
            pruning.evict_ms += session.shrink(kept + room.max(1))?;
        }
        let t = std::time::Instant::now();
        if let Some(heads) = &retention.per_head {
            session.apply_masks(heads)?;
        }
        if let Some(n) = self.decode_sink {
            session.set_decode_sinks(n)?;
        }
        session.decode_eviction = decode_eviction.map(|(mut fp, view)| {
            // entries are prompt (or view) indices; the cache knows keys (positions, or ranks)
            let pos = session.token_pos.clone();
            match view {
                Some(tokens) => fp.remap(&|i| pos[tokens[i]] as usize),
                None => fp.remap(&|t| pos[t] as usize),
            }
            fp
        });
        pruning.evict_ms += ms(t);
        pruning.retention = Some(retention);
        Ok(pruning)
    }
}
