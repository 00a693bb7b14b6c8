//! What a run reports: the `--json` object and the stderr timing line. Field names and meanings
//! are stable; later stages add fields.

use serde::Serialize;

use super::bounded::Eviction;
use super::event::StopReason;
use super::generate::Generated;
use super::session::{PrefillStats, Session};
use super::Prompt;
use crate::llama::KvInfo;
use crate::policy::{Retention, Split};
use crate::span::Modality;

/// What pruning did (default: nothing).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pruning {
    /// The resolved budget, when the policy applied to the prompt.
    pub split: Option<Split>,
    /// Whether cells were removed.
    pub pruned: bool,
    /// Milliseconds reducing attention + selecting.
    pub score_ms: f64,
    /// Milliseconds removing + compacting (+ shrinking), merging included.
    pub evict_ms: f64,
    /// (evicted, kept) pairs whose K/V were merged before the eviction (`lookm`), summed over
    /// layers and KV heads.
    pub merged: usize,
    /// The retention decided.
    pub retention: Option<Retention>,
}

/// Kept cells per modality.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct KeptPerModality {
    /// Text tokens kept.
    pub text: usize,
    /// Image (and audio) tokens kept.
    pub image: usize,
}

/// One prompt position in `--dump-retention`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetainedToken {
    /// Position.
    pub pos: i32,
    /// Modality.
    pub modality: Modality,
    /// Image index, for image tokens.
    pub image: Option<usize>,
    /// Kept after pruning?
    pub kept: bool,
    /// (layer, head) pairs that kept it.
    pub votes: u32,
    /// The policy's score summed over (layer, head) pairs.
    pub score: f32,
}

/// The outcome of one request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunReport {
    /// Generated text.
    pub text: String,
    /// All prompt tokens, image tokens included.
    pub n_prompt_tokens: usize,
    /// Number of images.
    pub n_images: usize,
    /// Tokens per image, in `--image` order.
    pub image_tokens: Vec<usize>,
    /// Generated tokens (a final end-of-generation token included).
    pub n_generated: usize,
    /// Milliseconds in the vision encoder.
    pub encode_ms: f64,
    /// Milliseconds evaluating the prompt in the language model (encoding excluded).
    pub prefill_ms: f64,
    /// Prompt tokens per second of `prefill_ms`.
    pub prefill_tok_s: f64,
    /// Milliseconds sampling and decoding generated tokens.
    pub decode_ms: f64,
    /// Generated tokens per second of `decode_ms`.
    pub decode_tok_s: f64,
    /// Flash attention as actually used: "on" or "off".
    pub flash_attn: &'static str,
    /// Whether flash attention ran while the prompt was read (the host observer pauses it).
    pub prefill_flash_attn: bool,
    /// How attention was observed during the prefill: `"graph"` (inside llama.cpp's graph),
    /// `"host"` (attention logits read on the host), `null` (not observed).
    pub observer: Option<&'static str>,
    /// Bytes of attention data the observer read out of llama.cpp during the prefill.
    pub observe_bytes: u64,
    /// How the pruned cache was compacted: `"device"` (K/V never left it), `"state"` (a round
    /// trip through host memory), `null` (never).
    pub compaction: Option<&'static str>,
    /// K+V bytes moved by compaction and shrinking.
    pub compact_bytes: u64,
    /// KV cells occupied when decoding starts.
    pub kv_cells: u32,
    /// K+V bytes of those cells.
    pub kv_bytes: u64,
    /// KV cells allocated (the context size).
    pub kv_cells_allocated: u32,
    /// K+V bytes llama.cpp allocated.
    pub kv_bytes_allocated: u64,
    /// KV policy.
    pub policy: &'static str,
    /// Budget in cells (min(B, L)); absent when the policy did not apply.
    pub kv_budget: Option<usize>,
    /// Whether cells were evicted.
    pub pruned: bool,
    /// Cells before pruning (= `n_prompt_tokens`).
    pub kv_cells_before: u32,
    /// Cells when decoding starts (= `kv_cells`).
    pub kv_cells_after: u32,
    /// K+V bytes before pruning.
    pub kv_bytes_before: u64,
    /// K+V bytes when decoding starts.
    pub kv_bytes_after: u64,
    /// Highest occupied cell + 1 when decoding starts: what attention spans (padded to 256).
    pub kv_attended: u32,
    /// Kept cells per modality.
    pub kept_per_modality: KeptPerModality,
    /// How per-layer/per-head choices were applied: "global", "layer" or "head".
    pub kv_granularity: &'static str,
    /// Prompt cells physically kept when decoding starts: the union over layers and heads
    /// (= `kv_cells_after` unless tokens were evaluated after pruning).
    pub kv_cells_physical: usize,
    /// Mean number of prompt cells a (layer, KV head) attends to (= physical at `global`).
    pub kv_cells_effective: f64,
    /// Cells masked in some layer by decode-time eviction (PrefixKV).
    pub decode_evicted: usize,
    /// Milliseconds observing attention and selecting.
    pub score_ms: f64,
    /// Milliseconds removing and compacting cells (merging included).
    pub evict_ms: f64,
    /// (evicted, kept) K/V row pairs merged at the prompt-end pass, over layers and KV heads
    /// (`lookm`; 0 for the others).
    pub kv_merged: usize,
    /// Context size.
    pub n_ctx: u32,
    /// `--kv-max-cells` in cells (absent without a cap).
    pub kv_max_cells: Option<u32>,
    /// The most cells the cache ever held (llama.cpp's high-water mark).
    pub kv_cells_peak: u32,
    /// Evictions while the prompt was read (bounded prefill) and at its end.
    pub evictions: Vec<Eviction>,
    /// The highest position written (prompt or generated).
    pub max_pos: i32,
    /// The model's trained context.
    pub n_ctx_train: u32,
    /// Whether positions passed the trained context (see `--kv-shift`).
    pub past_trained_ctx: bool,
    /// Milliseconds to the first token: image decoding, encoding, prefill, scoring and eviction
    /// (everything between the request and the first sampled token; model loading excluded).
    pub ttft_ms: f64,
    /// The largest K+V buffer allocated during the run (the prefill's, before `--kv-shrink`).
    pub kv_bytes_allocated_peak: u64,
    /// The process's peak resident memory, bytes (absent where the platform does not say).
    pub peak_rss_bytes: Option<u64>,
    /// ggml backend the model ran on ("CPU", "CUDA", "Metal", "Vulkan").
    pub backend: String,
    /// Its device ("NVIDIA GeForce RTX 4090", the CPU's name, …).
    pub device: String,
    /// Sampler seed.
    pub seed: u32,
    /// Why generation stopped: "eos", "length" or "context".
    pub stop: StopReason,
    /// Per prompt position (for `--dump-retention`).
    #[serde(skip)]
    pub retention: Vec<RetainedToken>,
}

fn per_s(n: usize, ms: f64) -> f64 {
    if ms > 0.0 {
        n as f64 * 1e3 / ms
    } else {
        0.0
    }
}

impl RunReport {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        prompt: &Prompt,
        session: &Session<'_>,
        prefill: &PrefillStats,
        kv_before: KvInfo,
        kv: KvInfo,
        policy: &'static str,
        pruning: Pruning,
        generated: Generated,
    ) -> Self {
        let n_generated = generated.tokens.len();
        let modality = prompt.token_modalities();
        let media = prompt.token_media();
        let positions = prompt.positions().unwrap_or_else(|| (0..prompt.n_tokens() as i32).collect());
        let keep = pruning.retention.as_ref().map(|r| r.keep.clone()).unwrap_or_else(|| vec![true; modality.len()]);
        let mut kept = KeptPerModality::default();
        for (m, k) in modality.iter().zip(&keep) {
            if *k {
                if *m == Modality::Text {
                    kept.text += 1;
                } else {
                    kept.image += 1;
                }
            }
        }
        let retention = (0..modality.len())
            .map(|t| RetainedToken {
                pos: positions[t],
                modality: modality[t],
                image: media[t],
                kept: keep[t],
                votes: pruning.retention.as_ref().map_or(0, |r| r.votes[t]),
                score: pruning.retention.as_ref().map_or(0.0, |r| r.score[t]),
            })
            .collect();
        Self {
            text: generated.text,
            n_prompt_tokens: prompt.n_tokens() + prompt.deferred.iter().map(crate::span::Span::n_tokens).sum::<usize>(),
            n_images: prompt.n_images(),
            image_tokens: prompt.image_tokens.clone(),
            n_generated,
            encode_ms: prefill.encode_ms,
            prefill_ms: prefill.prefill_ms,
            prefill_tok_s: per_s(prompt.n_tokens(), prefill.prefill_ms),
            decode_ms: generated.decode_ms,
            decode_tok_s: per_s(n_generated, generated.decode_ms),
            flash_attn: if session.flash_attn() { "on" } else { "off" },
            prefill_flash_attn: session.prefill_flash_attn(),
            observer: session.observer_mode(),
            observe_bytes: prefill.observe_bytes,
            compaction: session.compaction(),
            compact_bytes: session.compact_bytes(),
            kv_cells: kv.n_used,
            kv_bytes: kv.bytes_used(),
            kv_cells_allocated: kv.n_cells,
            kv_bytes_allocated: kv.bytes_allocated(),
            policy,
            kv_budget: pruning.split.map(|s| s.b),
            pruned: pruning.pruned,
            kv_cells_before: kv_before.n_used,
            kv_cells_after: kv.n_used,
            kv_bytes_before: kv_before.bytes_used(),
            kv_bytes_after: kv.bytes_used(),
            kv_attended: kv.used_max_p1,
            kept_per_modality: kept,
            kv_granularity: pruning.retention.as_ref().map_or("global", |r| r.granularity.name()),
            kv_cells_physical: keep.iter().filter(|k| **k).count(),
            kv_cells_effective: pruning.retention.as_ref().map_or(keep.len() as f64, Retention::effective),
            decode_evicted: session.decode_evicted(),
            score_ms: pruning.score_ms,
            evict_ms: pruning.evict_ms,
            kv_merged: pruning.merged,
            n_ctx: session.n_ctx(),
            kv_max_cells: session.bounded.as_ref().map(|b| b.cap),
            kv_cells_peak: session.kv_cells_peak(),
            evictions: session.evictions().to_vec(),
            max_pos: session.max_pos(),
            n_ctx_train: session.n_ctx_train(),
            past_trained_ctx: session.max_pos() >= session.n_ctx_train() as i32,
            ttft_ms: 0.0,
            kv_bytes_allocated_peak: session.kv_bytes_allocated_peak(),
            peak_rss_bytes: crate::llama::peak_rss_bytes(),
            backend: session.engine.device().backend.clone(),
            device: session.engine.device().name.clone(),
            seed: generated.seed,
            stop: generated.stop,
            retention,
        }
    }

    /// The human timing line printed on stderr (the README explains each field):
    ///
    /// ```text
    /// TTFT 52.1 ms (encode 9.8 ms, 4 images; prefill 268 tok, 8001.2 tok/s; score 2.1 ms; evict 1.0 ms) | gen 8 tok, 120.5 tok/s, eos | KV 268 → 134 cells, 5.9 MiB → 2.9 MiB, buffer 3.3 MiB (peak 5.9 MiB) | RSS 210.3 MiB | csp, flash-attn on, CPU
    /// ```
    #[must_use]
    pub fn timing_line(&self) -> String {
        let mut ttft = format!(
            "TTFT {:.1} ms (encode {:.1} ms, {} image{}; prefill {} tok, {:.1} tok/s",
            self.ttft_ms,
            self.encode_ms,
            self.n_images,
            if self.n_images == 1 { "" } else { "s" },
            self.n_prompt_tokens,
            self.prefill_tok_s,
        );
        if self.policy != "full" {
            ttft += &format!("; score {:.1} ms; evict {:.1} ms", self.score_ms, self.evict_ms);
        }
        ttft.push(')');
        let stop = match self.stop {
            StopReason::Eos => "eos",
            StopReason::Length => "length",
            StopReason::Context => "context full",
            StopReason::Cancelled => "interrupted",
        };
        let mut kv = format!(
            "KV {} → {} cells, {} → {}, buffer {}",
            self.kv_cells_before,
            self.kv_cells_after,
            human_bytes(self.kv_bytes_before),
            human_bytes(self.kv_bytes_after),
            human_bytes(self.kv_bytes_allocated),
        );
        if self.kv_bytes_allocated_peak > self.kv_bytes_allocated {
            kv += &format!(" (peak {})", human_bytes(self.kv_bytes_allocated_peak));
        }
        if let Some(cap) = self.kv_max_cells {
            kv += &format!(", cap {cap} cells, peak {} cells, {} eviction(s), max pos {}", self.kv_cells_peak, self.evictions.len(), self.max_pos);
        }
        let rss = self.peak_rss_bytes.map_or(String::new(), |b| format!(" | RSS {}", human_bytes(b)));
        format!(
            "{ttft} | gen {} tok, {:.1} tok/s, {stop} | {kv}{rss} | {}{}, flash-attn {}, {}",
            self.n_generated,
            self.decode_tok_s,
            self.policy,
            if self.policy != "full" && !self.pruned { " (not pruned)" } else { "" },
            self.flash_attn,
            self.backend,
        )
    }
}

/// 1536 → "1.5 KiB".
#[must_use]
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
