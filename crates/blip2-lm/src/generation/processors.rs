//! Logits processors, applied in the order transformers' `generate` applies them:
//! repetition penalty, no-repeat n-grams, minimum length, minimum new tokens, then
//! (sampling only) temperature, top-k and top-p.

use super::GenerationOptions;

/// Rewrites `scores` (one row of the vocabulary) before a token is chosen.
///
/// `sequence` is everything the reference's `input_ids` holds at this step: the
/// prompt as the model sees it (image placeholder tokens included for decoder-only
/// models, the decoder start token for encoder-decoders) followed by the tokens
/// generated so far. `generated` is how many of those were generated.
pub(crate) fn process(
    options: &GenerationOptions,
    sequence: &[u32],
    generated: usize,
    scores: &mut [f32],
) {
    if options.repetition_penalty != 1.0 {
        apply_repetition_penalty(options.repetition_penalty, sequence, scores);
    }
    if options.no_repeat_ngram_size > 0 {
        ban_repeated_ngrams(options.no_repeat_ngram_size, sequence, scores);
    }
    if sequence.len() < options.min_length || generated < options.min_new_tokens {
        for &eos in &options.eos_token_ids {
            if let Some(score) = scores.get_mut(eos as usize) {
                *score = f32::NEG_INFINITY;
            }
        }
    }
}

/// The sampling warpers: temperature, then top-k, then top-p.
///
/// `min_tokens_to_keep` is 1 for plain sampling; beam sampling keeps one more than the
/// number of end-of-sequence ids, as transformers does.
pub(crate) fn warp_for_sampling(
    options: &GenerationOptions,
    min_tokens_to_keep: usize,
    scores: &mut [f32],
) {
    if options.temperature != 1.0 {
        for score in scores.iter_mut() {
            *score /= options.temperature;
        }
    }
    if options.top_k > 0 {
        keep_top_k(options.top_k.max(min_tokens_to_keep), scores);
    }
    if options.top_p < 1.0 {
        keep_top_p(options.top_p, min_tokens_to_keep, scores);
    }
}

/// Divides positive scores and multiplies negative ones by `penalty`, once per
/// distinct token of the sequence.
fn apply_repetition_penalty(penalty: f32, sequence: &[u32], scores: &mut [f32]) {
    let mut seen = std::collections::HashSet::with_capacity(sequence.len());
    for &token in sequence {
        if !seen.insert(token) {
            continue;
        }
        if let Some(score) = scores.get_mut(token as usize) {
            *score = if *score < 0.0 {
                *score * penalty
            } else {
                *score / penalty
            };
        }
    }
}

/// Bans every token that would complete an n-gram already present in the sequence.
fn ban_repeated_ngrams(n: usize, sequence: &[u32], scores: &mut [f32]) {
    if sequence.len() < n {
        return;
    }
    let prefix = &sequence[sequence.len() + 1 - n..];
    for window in sequence.windows(n) {
        if &window[..n - 1] == prefix
            && let Some(score) = scores.get_mut(window[n - 1] as usize)
        {
            *score = f32::NEG_INFINITY;
        }
    }
}

/// Keeps the `k` highest scores (and any ties with the k-th), setting the rest to -inf.
fn keep_top_k(k: usize, scores: &mut [f32]) {
    if k >= scores.len() {
        return;
    }
    let mut sorted: Vec<f32> = scores.to_vec();
    sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let threshold = sorted[k - 1];
    for score in scores.iter_mut() {
        if *score < threshold {
            *score = f32::NEG_INFINITY;
        }
    }
}

/// Keeps the most likely tokens whose probabilities sum to at least `top_p`.
///
/// Like transformers: sort ascending, drop tokens while the cumulative probability of
/// the dropped ones stays at or below `1 - top_p`, and always keep the
/// `min_tokens_to_keep` most likely.
fn keep_top_p(top_p: f32, min_tokens_to_keep: usize, scores: &mut [f32]) {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let probabilities = softmax(&order.iter().map(|&i| scores[i]).collect::<Vec<_>>());
    let keep_from = scores.len().saturating_sub(min_tokens_to_keep);
    let mut cumulative = 0f32;
    for (rank, &index) in order.iter().enumerate() {
        cumulative += probabilities[rank];
        if rank < keep_from && cumulative <= 1.0 - top_p {
            scores[index] = f32::NEG_INFINITY;
        }
    }
}

/// Softmax in `f32` with the maximum subtracted first.
pub(crate) fn softmax(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return vec![0.0; scores.len()];
    }
    let exps: Vec<f32> = scores.iter().map(|&s| (s - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// `log_softmax` in `f32`, as transformers computes beam scores.
pub(crate) fn log_softmax(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = scores.iter().map(|&s| (s - max).exp()).sum();
    let log_sum = sum.ln();
    for score in scores.iter_mut() {
        *score = *score - max - log_sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> GenerationOptions {
        GenerationOptions::from_config(&Default::default(), 10)
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let mut scores = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(2.0, &[0, 1, 1], &mut scores);
        assert_eq!(scores, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn ngram_ban_blocks_completion_of_seen_bigram() {
        let mut scores = vec![0.0; 5];
        // Sequence 1 2 3 1: the bigram (1, 2) was seen, so 2 is banned after the last 1.
        ban_repeated_ngrams(2, &[1, 2, 3, 1], &mut scores);
        assert_eq!(scores[2], f32::NEG_INFINITY);
        assert_eq!(scores.iter().filter(|s| s.is_infinite()).count(), 1);
    }

    #[test]
    fn min_new_tokens_bans_every_eos_id() {
        let mut opts = options();
        opts.min_new_tokens = 2;
        opts.eos_token_ids = vec![1, 3];
        let mut scores = vec![0.0; 4];
        process(&opts, &[0], 1, &mut scores);
        assert_eq!(scores, vec![0.0, f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY]);
        let mut scores = vec![0.0; 4];
        process(&opts, &[0, 2], 2, &mut scores);
        assert_eq!(scores, vec![0.0; 4]);
    }

    #[test]
    fn top_k_keeps_ties_with_kth() {
        let mut scores = vec![1.0, 3.0, 2.0, 2.0, 0.5];
        keep_top_k(2, &mut scores);
        assert_eq!(
            scores,
            vec![f32::NEG_INFINITY, 3.0, 2.0, 2.0, f32::NEG_INFINITY]
        );
    }

    #[test]
    fn top_p_keeps_smallest_covering_set() {
        // Probabilities ~ [0.643, 0.237, 0.087, 0.032]; top_p 0.7 keeps the first two.
        let mut scores = vec![3.0, 2.0, 1.0, 0.0];
        keep_top_p(0.7, 1, &mut scores);
        assert_eq!(&scores[..2], &[3.0, 2.0]);
        assert!(
            scores[2].is_infinite() && scores[3].is_infinite(),
            "{scores:?}"
        );
    }

    #[test]
    fn top_p_always_keeps_min_tokens() {
        let mut scores = vec![10.0, 0.0, 0.0];
        keep_top_p(0.1, 2, &mut scores);
        assert_eq!(
            scores.iter().filter(|s| s.is_finite()).count(),
            2,
            "{scores:?}"
        );
    }
}
