//! Agreement between two language models' next-token logits: the measure of what
//! quantization costs.

use candle_core::{Result, Tensor};

use super::{PromptInput, left_pad};
use crate::LanguageModel;

/// Logits of a candidate model compared with a reference's, position by position.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LogitAgreement {
    /// Positions compared.
    pub positions: usize,
    /// Positions where both models put the same token on top (the greedy choice).
    pub same_top_token: usize,
    /// The largest absolute difference of one logit.
    pub max_abs_error: f32,
    /// The sum, over positions, of the mean absolute difference across the vocabulary.
    pub sum_mean_abs_error: f64,
    /// The largest absolute reference logit, to put the errors in scale.
    pub max_abs_logit: f32,
    /// The sum, over positions, of the gap between the reference's two largest logits:
    /// an error larger than the gap can change the greedy token.
    pub sum_top_gap: f64,
}

impl LogitAgreement {
    /// Returns the share of positions with the same greedy token, in `[0, 1]`.
    pub fn greedy_agreement(&self) -> f64 {
        self.same_top_token as f64 / self.positions.max(1) as f64
    }

    /// Returns the mean absolute logit difference over every position and vocabulary entry.
    pub fn mean_abs_error(&self) -> f64 {
        self.sum_mean_abs_error / self.positions.max(1) as f64
    }

    /// Returns the mean gap between the reference's two largest logits.
    pub fn mean_top_gap(&self) -> f64 {
        self.sum_top_gap / self.positions.max(1) as f64
    }

    /// Adds the positions of `other`.
    pub fn merge(&mut self, other: &Self) {
        self.positions += other.positions;
        self.same_top_token += other.same_top_token;
        self.max_abs_error = self.max_abs_error.max(other.max_abs_error);
        self.sum_mean_abs_error += other.sum_mean_abs_error;
        self.max_abs_logit = self.max_abs_logit.max(other.max_abs_logit);
        self.sum_top_gap += other.sum_top_gap;
    }

    fn add_position(&mut self, reference: &[f32], candidate: &[f32]) {
        let mut sum = 0f64;
        for (&r, &c) in reference.iter().zip(candidate) {
            let error = (r - c).abs();
            sum += f64::from(error);
            self.max_abs_error = self.max_abs_error.max(error);
            self.max_abs_logit = self.max_abs_logit.max(r.abs());
        }
        self.sum_mean_abs_error += sum / reference.len().max(1) as f64;
        self.same_top_token += usize::from(argmax(reference) == argmax(candidate));
        self.sum_top_gap += f64::from(top_gap(reference));
        self.positions += 1;
    }
}

fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// Returns the largest value minus the second largest (0 with fewer than two values).
fn top_gap(values: &[f32]) -> f32 {
    let (mut first, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &v in values {
        if v > first {
            second = first;
            first = v;
        } else if v > second {
            second = v;
        }
    }
    if second.is_finite() {
        first - second
    } else {
        0.0
    }
}

fn row(logits: &Tensor) -> Result<Vec<f32>> {
    logits.flatten_all()?.to_vec1::<f32>()
}

/// Runs each model's prompt through it: the same text, with the image queries of each
/// model's own image side. Then feeds both the reference's greedy token `positions - 1`
/// times, comparing the next-token logits at each of the `positions` steps. Both models
/// see the same tokens, so one early disagreement does not make every later position
/// differ.
pub fn compare_greedy(
    reference: &dyn LanguageModel,
    candidate: &dyn LanguageModel,
    reference_prompt: &PromptInput,
    candidate_prompt: &PromptInput,
    positions: usize,
) -> Result<LogitAgreement> {
    let (embeds, mask) = left_pad(std::slice::from_ref(reference_prompt), reference.dtype())?;
    let (mut reference_session, reference_logits) = reference.start(&embeds, &mask, positions)?;
    let (embeds, mask) = left_pad(std::slice::from_ref(candidate_prompt), candidate.dtype())?;
    let (mut candidate_session, candidate_logits) = candidate.start(&embeds, &mask, positions)?;
    let mut logits = (row(&reference_logits)?, row(&candidate_logits)?);
    let mut agreement = LogitAgreement::default();
    for step in 0..positions {
        agreement.add_position(&logits.0, &logits.1);
        if step + 1 < positions {
            let token = [argmax(&logits.0) as u32];
            logits = (
                row(&reference_session.step(&token)?)?,
                row(&candidate_session.step(&token)?)?,
            );
        }
    }
    Ok(agreement)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_counted_and_merged() {
        let mut a = LogitAgreement::default();
        a.add_position(&[1.0, 3.0, -2.0], &[1.5, 2.5, -2.0]);
        a.add_position(&[0.0, 1.0], &[2.0, 1.0]);
        assert_eq!((a.positions, a.same_top_token), (2, 1));
        assert_eq!(a.max_abs_error, 2.0);
        assert_eq!(a.max_abs_logit, 3.0);
        assert!((a.mean_abs_error() - (1.0 / 3.0 + 1.0) / 2.0).abs() < 1e-12);
        let mut b = LogitAgreement::default();
        b.add_position(&[5.0], &[5.0]);
        a.merge(&b);
        assert_eq!((a.positions, a.same_top_token), (3, 2));
        assert_eq!(a.max_abs_logit, 5.0);
        assert!((a.greedy_agreement() - 2.0 / 3.0).abs() < 1e-12);
        // Gaps: 3 - 1, 1 - 0, and none for a single value.
        assert!((a.mean_top_gap() - 1.0).abs() < 1e-12);
    }
}
