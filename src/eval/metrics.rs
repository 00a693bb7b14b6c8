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

/// Negative log-likelihood of `target` under the softmax of `logits`, in nats.
#[must_use]
pub fn nll(logits: &[f32], target: usize) -> f64 {
    let mx = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = logits.iter().map(|&x| f64::from(x - mx).exp()).sum::<f64>().ln() + f64::from(mx);
    logits.get(target).map_or(f64::INFINITY, |&x| lse - f64::from(x))
}

/// The `Image k: …` items of an enumeration answer ("Image 1: red circle. Image 2: …"), by k:
/// each item's text up to the next item, normalised (the label in any case). Empty when the text has none.
#[must_use]
pub fn enumeration_items(text: &str) -> Vec<(usize, String)> {
    let mut starts: Vec<(usize, usize, usize)> = Vec::new(); // (label start, text start, k)
    let lower = text.to_ascii_lowercase(); // same byte offsets
    let mut from = 0;
    while let Some(i) = lower[from..].find("image ").map(|i| i + from) {
        let rest = &text[i + 6..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 && rest[digits..].starts_with(':') {
            if let Ok(k) = rest[..digits].parse() {
                starts.push((i, i + 6 + digits + 1, k));
            }
        }
        from = i + 6;
    }
    starts
        .iter()
        .enumerate()
        .map(|(n, &(_, a, k))| {
            let end = starts.get(n + 1).map_or(text.len(), |s| s.0);
            (k, normalize(&text[a..end]))
        })
        .collect()
}

/// Per-image accuracy of an enumeration answer: the share of the expected items
/// (`Image k: …`) the prediction states the same for the same k (normalised; the first item a
/// prediction gives for k counts). `None` when the expected answer is no enumeration.
#[must_use]
pub fn per_image_accuracy(prediction: &str, answer: &str) -> Option<f64> {
    let expected = enumeration_items(answer);
    if expected.is_empty() {
        return None;
    }
    let got = enumeration_items(prediction);
    let right = expected.iter().filter(|(k, want)| got.iter().find(|(j, _)| j == k).is_some_and(|(_, g)| g == want)).count();
    Some(right as f64 / expected.len() as f64)
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
    fn enumerations_are_scored_per_image() {
        let want = "Image 1: red circle. Image 2: blue triangle. Image 3: gray rectangle.";
        assert_eq!(per_image_accuracy(want, want), Some(1.0));
        assert_eq!(per_image_accuracy("Image 1: red circle. Image 2: blue circle. Image 3: gray rectangle.", want), Some(2.0 / 3.0));
        // order, spacing and case do not matter; a missing image counts as wrong
        assert_eq!(per_image_accuracy("image 3: Gray rectangle; Image 1:red circle", want), Some(2.0 / 3.0));
        assert_eq!(per_image_accuracy("a red circle", want), Some(0.0));
        assert_eq!(per_image_accuracy("anything", "circle"), None);
        assert_eq!(enumeration_items("Image 12: x. Image : y"), vec![(12, "x image y".to_owned())]);
    }

    #[test]
    fn nll_of_a_target() {
        let l = [0.0f32, 0.0];
        assert!((nll(&l, 1) - std::f64::consts::LN_2).abs() < 1e-12);
        assert!(nll(&[10.0, -10.0], 0) < 1e-6);
        assert_eq!(nll(&l, 5), f64::INFINITY);
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
