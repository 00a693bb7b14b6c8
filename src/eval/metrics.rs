//! Fidelity and accuracy metrics: KL divergence and top-1 agreement of next-token distributions,
//! ROUGE-L F1, SQuAD-style exact match and "answer contained", and bootstrap intervals.

use crate::rng::Rng;

/// Log-softmax in f64.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let mx = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = logits.iter().map(|&x| f64::from(x - mx).exp()).sum::<f64>().ln() + f64::from(mx);
    logits.iter().map(|&x| f64::from(x) - lse).collect()
}

/// KL(p ‖ q) of the softmax distributions of two logit vectors, in nats.
#[must_use]
pub fn kl_divergence(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let lp = log_softmax(p_logits);
    let lq = log_softmax(q_logits);
    lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum::<f64>().max(0.0)
}

/// Index of the largest logit (first on ties).
#[must_use]
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best
}

/// SQuAD answer normalisation: lower case, no punctuation, no articles, single spaces.
#[must_use]
pub fn normalize(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower.chars().map(|c| if c.is_ascii_punctuation() { ' ' } else { c }).collect();
    no_punct.split_whitespace().filter(|w| !matches!(*w, "a" | "an" | "the")).collect::<Vec<_>>().join(" ")
}

/// Exact match after normalisation.
#[must_use]
pub fn exact_match(prediction: &str, answer: &str) -> bool {
    normalize(prediction) == normalize(answer)
}

/// The normalised answer appears in the normalised prediction as whole words.
#[must_use]
pub fn contains(prediction: &str, answer: &str) -> bool {
    let a = normalize(answer);
    !a.is_empty() && format!(" {} ", normalize(prediction)).contains(&format!(" {a} "))
}

fn words(s: &str) -> Vec<String> {
    s.to_lowercase().split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_owned).collect()
}

/// ROUGE-L F1 (longest common subsequence of lower-cased words). Two empty texts score 1.
#[must_use]
pub fn rouge_l(reference: &str, candidate: &str) -> f64 {
    let (r, c) = (words(reference), words(candidate));
    if r.is_empty() && c.is_empty() {
        return 1.0;
    }
    if r.is_empty() || c.is_empty() {
        return 0.0;
    }
    let mut prev = vec![0usize; c.len() + 1];
    for rw in &r {
        let mut cur = vec![0usize; c.len() + 1];
        for (j, cw) in c.iter().enumerate() {
            cur[j + 1] = if rw == cw { prev[j] + 1 } else { cur[j].max(prev[j + 1]) };
        }
        prev = cur;
    }
    let lcs = prev[c.len()] as f64;
    if lcs == 0.0 {
        return 0.0;
    }
    let (p, rec) = (lcs / c.len() as f64, lcs / r.len() as f64);
    2.0 * p * rec / (p + rec)
}

/// Mean and 95% percentile-bootstrap interval (1000 resamples, seeded).
#[must_use]
pub fn mean_ci(values: &[f64]) -> Option<(f64, [f64; 2])> {
    if values.is_empty() {
        return None;
    }
    let n = values.len();
    let mean = values.iter().sum::<f64>() / n as f64;
    let mut rng = Rng::new(0, "bootstrap");
    let mut means: Vec<f64> = (0..1000)
        .map(|_| (0..n).map(|_| values[rng.below(n as u64) as usize]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    Some((mean, [means[24], means[974]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squad_normalisation() {
        assert_eq!(normalize("The  Red, circle!"), "red circle");
        assert!(exact_match("A circle.", "circle"));
        assert!(!exact_match("red circle", "circle"));
        assert!(contains("It is a red circle.", "Circle"));
        assert!(!contains("circles", "circle"));
        assert!(!contains("anything", ""));
    }

    #[test]
    fn rouge() {
        assert_eq!(rouge_l("a b c d", "a b c d"), 1.0);
        assert_eq!(rouge_l("a b c d", "x y"), 0.0);
        // LCS("a b c d", "a c d e") = 3: P = R = 3/4
        assert!((rouge_l("a b c d", "a c d e") - 0.75).abs() < 1e-12);
        assert_eq!(rouge_l("", ""), 1.0);
    }

    #[test]
    fn kl_and_argmax() {
        let p = [1.0, 2.0, 3.0];
        assert!(kl_divergence(&p, &p).abs() < 1e-12);
        assert!(kl_divergence(&p, &[3.0, 2.0, 1.0]) > 0.5);
        // shifting logits does not change the distribution
        assert!(kl_divergence(&p, &[11.0, 12.0, 13.0]).abs() < 1e-12);
        assert_eq!(argmax(&[0.5, 2.0, 2.0, -1.0]), 1);
    }

    #[test]
    fn bootstrap() {
        let (m, [lo, hi]) = mean_ci(&[1.0, 1.0, 1.0]).unwrap();
        assert_eq!((m, lo, hi), (1.0, 1.0, 1.0));
        let v: Vec<f64> = (0..100).map(|i| f64::from(i % 2)).collect();
        let (m, [lo, hi]) = mean_ci(&v).unwrap();
        assert!((m - 0.5).abs() < 1e-12 && lo < 0.5 && hi > 0.5 && lo > 0.35 && hi < 0.65);
        assert!(mean_ci(&[]).is_none());
    }
}
