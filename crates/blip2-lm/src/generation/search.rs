//! Greedy search and multinomial sampling.

use candle_core::{Result, Tensor};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

use super::processors::{process, softmax, warp_for_sampling};
use super::{Generated, GenerationOptions, PromptInput, TokenCallback};
use crate::DecodeSession;

/// Index of the largest score; the first one on ties, like `torch.argmax`.
fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &score) in scores.iter().enumerate() {
        if score > scores[best] {
            best = i;
        }
    }
    best as u32
}

/// Draws an index with probability proportional to `probabilities`.
fn sample(probabilities: &[f32], rng: &mut ChaCha8Rng) -> u32 {
    // 53 random bits make a uniform double in [0, 1).
    let uniform = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let total: f64 = probabilities.iter().map(|&p| p as f64).sum();
    let target = uniform * total;
    let mut cumulative = 0f64;
    let mut last_possible = 0;
    for (i, &p) in probabilities.iter().enumerate() {
        if p > 0.0 {
            cumulative += p as f64;
            last_possible = i;
            if target < cumulative {
                return i as u32;
            }
        }
    }
    last_possible as u32
}

/// Greedy search, or sampling when `options.do_sample`; sampling draws
/// `num_return_sequences` independent continuations per prompt.
pub(super) fn greedy_or_sample(
    mut session: Box<dyn DecodeSession + '_>,
    first_logits: Tensor,
    prompts: &[PromptInput],
    options: &GenerationOptions,
    mut on_token: Option<&mut TokenCallback<'_>>,
) -> Result<Vec<Vec<Generated>>> {
    let copies = if options.do_sample {
        options.num_return_sequences
    } else {
        1
    };
    let row_prompt: Vec<usize> = (0..prompts.len())
        .flat_map(|p| std::iter::repeat_n(p, copies))
        .collect();
    if copies > 1 {
        session.select_rows(&row_prompt)?;
    }
    let rows = row_prompt.len();
    let mut logits = if copies > 1 {
        let index = Tensor::from_vec(
            row_prompt.iter().map(|&p| p as u32).collect::<Vec<_>>(),
            rows,
            first_logits.device(),
        )?;
        first_logits.index_select(&index, 0)?
    } else {
        first_logits
    };

    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    let mut sequences: Vec<Vec<u32>> = row_prompt
        .iter()
        .map(|&p| prompts[p].sequence.clone())
        .collect();
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); rows];
    let mut ended = vec![false; rows];

    for step in 0..options.max_new_tokens {
        let all_logits = logits.to_vec2::<f32>()?;
        let mut next = vec![0u32; rows];
        for row in 0..rows {
            if ended[row] {
                // Finished rows keep being fed a token; it is never returned.
                next[row] = generated[row].last().copied().unwrap_or(0);
                continue;
            }
            let mut scores = all_logits[row].clone();
            process(options, &sequences[row], step, &mut scores);
            let token = if options.do_sample {
                warp_for_sampling(options, 1, &mut scores);
                sample(&softmax(&scores), &mut rng)
            } else {
                argmax(&scores)
            };
            next[row] = token;
            sequences[row].push(token);
            generated[row].push(token);
            if let Some(callback) = on_token.as_deref_mut() {
                callback(row_prompt[row], token);
            }
            if options.eos_token_ids.contains(&token) {
                ended[row] = true;
            }
        }
        if ended.iter().all(|&e| e) || step + 1 == options.max_new_tokens {
            break;
        }
        logits = session.step(&next)?;
    }

    let mut results: Vec<Vec<Generated>> = vec![Vec::new(); prompts.len()];
    for (row, tokens) in generated.into_iter().enumerate() {
        results[row_prompt[row]].push(Generated {
            tokens,
            ended_with_eos: ended[row],
            score: None,
        });
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_prefers_first_of_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
    }

    #[test]
    fn sampling_never_picks_zero_probability() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..1000 {
            let token = sample(&[0.0, 0.5, 0.0, 0.5], &mut rng);
            assert!(token == 1 || token == 3, "picked {token}");
        }
    }

    #[test]
    fn sampling_frequencies_follow_probabilities() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut counts = [0usize; 3];
        let draws = 30_000;
        for _ in 0..draws {
            counts[sample(&[0.2, 0.3, 0.5], &mut rng) as usize] += 1;
        }
        for (i, expected) in [0.2, 0.3, 0.5].iter().enumerate() {
            let observed = counts[i] as f64 / draws as f64;
            assert!(
                (observed - expected).abs() < 0.015,
                "token {i}: frequency {observed}, expected {expected}"
            );
        }
    }
}
