//! Beam search, as transformers 5.x `_beam_search` performs it.

use candle_core::{Result, Tensor};

use super::processors::{log_softmax, process};
use super::{EarlyStopping, Generated, GenerationOptions, PromptInput};
use crate::DecodeSession;

/// The score transformers adds to rule a candidate out.
const RULED_OUT: f32 = -1.0e9;

/// One candidate continuation of a beam.
#[derive(Debug, Clone)]
struct Candidate {
    score: f32,
    beam: usize,
    token: u32,
}

/// A finished hypothesis slot; slots start empty with score `RULED_OUT`.
#[derive(Debug, Clone)]
struct Finished {
    score: f32,
    tokens: Vec<u32>,
    is_finished: bool,
    ended_with_eos: bool,
}

/// The beam search state of one prompt.
struct ItemState {
    running: Vec<Vec<u32>>,
    running_scores: Vec<f32>,
    finished: Vec<Finished>,
    /// transformers' `is_early_stop_heuristic_unsatisfied`; once false it stays false.
    improvable: bool,
}

impl ItemState {
    fn new(num_beams: usize) -> Self {
        let mut running_scores = vec![RULED_OUT; num_beams];
        running_scores[0] = 0.0;
        Self {
            running: vec![Vec::new(); num_beams],
            running_scores,
            finished: vec![
                Finished {
                    score: RULED_OUT,
                    tokens: Vec::new(),
                    is_finished: false,
                    ended_with_eos: false
                };
                num_beams
            ],
            improvable: true,
        }
    }

    /// Whether new finished hypotheses can no longer enter this item's slots.
    fn is_frozen(&self, early_stopping: EarlyStopping) -> bool {
        !self.improvable
            || (early_stopping == EarlyStopping::Always
                && self.finished.iter().all(|f| f.is_finished))
    }
}

/// The `k` best of `scores` (already offset by the running beam scores), in
/// descending order; ties go to the lower flat index, so beams are visited in order.
fn top_candidates(scores: &[Vec<f32>], k: usize) -> Vec<Candidate> {
    let vocab = scores[0].len();
    let mut flat: Vec<(f32, usize)> = scores
        .iter()
        .enumerate()
        .flat_map(|(beam, row)| {
            row.iter()
                .enumerate()
                .map(move |(token, &s)| (s, beam * vocab + token))
        })
        .collect();
    let k = k.min(flat.len());
    let order = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    flat.select_nth_unstable_by(k - 1, order);
    flat.truncate(k);
    flat.sort_by(order);
    flat.into_iter()
        .map(|(score, index)| Candidate {
            score,
            beam: index / vocab,
            token: (index % vocab) as u32,
        })
        .collect()
}

/// Indices of the `k` largest values, descending, earlier index first on ties.
fn top_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

pub(super) fn beam_search(
    mut session: Box<dyn DecodeSession + '_>,
    first_logits: Tensor,
    prompts: &[PromptInput],
    options: &GenerationOptions,
) -> Result<Vec<Vec<Generated>>> {
    let num_beams = options.num_beams;
    let batch = prompts.len();
    let eos = &options.eos_token_ids;
    let candidates_per_item = 2.max(1 + eos.len()) * num_beams;

    // Every beam starts as a copy of its prompt; only beam 0 has a usable score.
    let expand: Vec<usize> = (0..batch)
        .flat_map(|i| std::iter::repeat_n(i, num_beams))
        .collect();
    session.select_rows(&expand)?;
    let index = Tensor::from_vec(
        expand.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        expand.len(),
        first_logits.device(),
    )?;
    let mut logits = first_logits.index_select(&index, 0)?;

    let mut items: Vec<ItemState> = (0..batch).map(|_| ItemState::new(num_beams)).collect();
    let mut generated_len = 0usize;

    loop {
        let all_logits = logits.to_vec2::<f32>()?;
        let mut any_candidate_continues = false;
        let mut parents = Vec::with_capacity(batch * num_beams);
        let mut next_tokens = Vec::with_capacity(batch * num_beams);

        for (item_index, item) in items.iter_mut().enumerate() {
            let prompt = &prompts[item_index].sequence;
            let scores: Vec<Vec<f32>> = (0..num_beams)
                .map(|beam| {
                    let mut row = all_logits[item_index * num_beams + beam].clone();
                    log_softmax(&mut row);
                    let mut sequence = prompt.clone();
                    sequence.extend_from_slice(&item.running[beam]);
                    process(options, &sequence, generated_len, &mut row);
                    let offset = item.running_scores[beam];
                    row.iter_mut().for_each(|s| *s += offset);
                    row
                })
                .collect();
            let candidates = top_candidates(&scores, candidates_per_item);

            // A candidate stops on an end-of-sequence token, or when it reaches the length limit.
            let at_length_limit = generated_len + 1 >= options.max_new_tokens;
            let hits: Vec<bool> = candidates
                .iter()
                .map(|c| at_length_limit || eos.contains(&c.token))
                .collect();
            any_candidate_continues |= hits.iter().any(|&h| !h);

            // Running beams for the next step: the best candidates that did not stop.
            let penalised: Vec<f32> = candidates
                .iter()
                .zip(&hits)
                .map(|(c, &hit)| c.score + if hit { RULED_OUT } else { 0.0 })
                .collect();
            let chosen = top_indices(&penalised, num_beams);

            // Finished slots: only the first `num_beams` candidates may enter, and only if
            // they stopped; scores are normalised by the generated length.
            let frozen = item.is_frozen(options.early_stopping);
            let normaliser =
                ((generated_len + 1) as f64).powf(options.length_penalty as f64) as f32;
            let mut merged: Vec<Finished> = item.finished.clone();
            for (rank, (candidate, &hit)) in candidates.iter().zip(&hits).enumerate() {
                let just_finished = hit && rank < num_beams;
                let mut score = candidate.score / normaliser;
                if frozen {
                    score += RULED_OUT;
                }
                if !just_finished {
                    score += RULED_OUT;
                }
                let mut tokens = item.running[candidate.beam].clone();
                tokens.push(candidate.token);
                merged.push(Finished {
                    score,
                    tokens,
                    is_finished: just_finished,
                    ended_with_eos: eos.contains(&candidate.token),
                });
            }
            let merged_scores: Vec<f32> = merged.iter().map(|f| f.score).collect();
            item.finished = top_indices(&merged_scores, num_beams)
                .into_iter()
                .map(|i| merged[i].clone())
                .collect();

            let mut new_running = Vec::with_capacity(num_beams);
            let mut new_scores = Vec::with_capacity(num_beams);
            for &choice in &chosen {
                let candidate = &candidates[choice];
                let mut tokens = item.running[candidate.beam].clone();
                tokens.push(candidate.token);
                new_running.push(tokens);
                new_scores.push(penalised[choice]);
                parents.push(item_index * num_beams + candidate.beam);
                next_tokens.push(candidate.token);
            }
            item.running = new_running;
            item.running_scores = new_scores;
        }

        generated_len += 1;
        for item in &mut items {
            if !item.improvable {
                continue;
            }
            let hypothetical_len =
                if options.early_stopping == EarlyStopping::Never && options.length_penalty > 0.0 {
                    options.max_new_tokens
                } else {
                    generated_len
                };
            let best_possible = item.running_scores[0]
                / (hypothetical_len as f64).powf(options.length_penalty as f64) as f32;
            let worst_finished = item
                .finished
                .iter()
                .map(|f| f.score)
                .fold(f32::INFINITY, f32::min);
            item.improvable = item.finished.iter().any(|f| {
                best_possible
                    > if f.is_finished {
                        worst_finished
                    } else {
                        RULED_OUT
                    }
            });
        }

        let all_frozen = items
            .iter()
            .all(|item| item.is_frozen(options.early_stopping));
        if all_frozen || !any_candidate_continues || generated_len >= options.max_new_tokens {
            break;
        }
        session.select_rows(&parents)?;
        logits = session.step(&next_tokens)?;
    }

    Ok(items
        .into_iter()
        .map(|item| {
            item.finished
                .into_iter()
                .take(options.num_return_sequences)
                .map(|f| Generated {
                    tokens: f.tokens,
                    ended_with_eos: f.ended_with_eos,
                    score: Some(f.score),
                })
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_sorted_with_beam_and_token() {
        let scores = vec![vec![0.1, 0.9, 0.3], vec![0.95, 0.2, 0.0]];
        let top = top_candidates(&scores, 3);
        let picked: Vec<(usize, u32)> = top.iter().map(|c| (c.beam, c.token)).collect();
        assert_eq!(picked, vec![(1, 0), (0, 1), (0, 2)]);
    }

    #[test]
    fn top_indices_break_ties_by_position() {
        assert_eq!(top_indices(&[1.0, 2.0, 2.0, 0.5], 2), vec![1, 2]);
    }
}
