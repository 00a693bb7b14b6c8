//! llama.cpp's sampler chain, applied to logits the engine hands over.

use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;

/// One step of a sampler chain (llama.cpp's samplers of the same names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Step {
    /// Repetition penalty over the last `last_n` tokens.
    Penalties {
        /// Vocabulary size.
        n_vocab: i32,
        /// Window (tokens).
        last_n: i32,
        /// Penalty (1.0 = off).
        repeat: f32,
    },
    /// The most likely token.
    Greedy,
    /// Keep the `k` most likely.
    TopK(i32),
    /// Keep the smallest set with probability ≥ p.
    TopP(f32),
    /// Drop tokens below `p` × the top probability.
    MinP(f32),
    /// Temperature.
    Temp(f32),
    /// Draw from the distribution with a seed.
    Dist(u32),
}

/// A sampler chain.
pub struct Sampler(LlamaSampler);

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler").finish_non_exhaustive()
    }
}

impl Sampler {
    /// The chain of `steps`, in order.
    #[must_use]
    pub fn chain(steps: &[Step]) -> Self {
        let chain = steps
            .iter()
            .map(|s| match *s {
                Step::Penalties { n_vocab, last_n, repeat } => LlamaSampler::penalties(n_vocab, last_n, repeat, 0.0, 0.0),
                Step::Greedy => LlamaSampler::greedy(),
                Step::TopK(k) => LlamaSampler::top_k(k),
                Step::TopP(p) => LlamaSampler::top_p(p, 1),
                Step::MinP(p) => LlamaSampler::min_p(p, 1),
                Step::Temp(t) => LlamaSampler::temp(t),
                Step::Dist(seed) => LlamaSampler::dist(seed),
            })
            .collect::<Vec<_>>();
        Self(LlamaSampler::chain_simple(chain))
    }

    /// Samples one token from `logits` (what `llama_sampler_sample` does with a context's
    /// logits) and accepts it.
    pub fn sample(&mut self, logits: &[f32]) -> Option<i32> {
        let mut arr = LlamaTokenDataArray::from_iter(logits.iter().enumerate().map(|(i, &l)| LlamaTokenData::new(LlamaToken(i as i32), l, 0.0)), false);
        self.0.apply(&mut arr);
        let tok = arr.selected_token()?;
        self.0.accept(tok);
        Some(tok.0)
    }
}
