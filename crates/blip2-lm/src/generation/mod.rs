//! Decoding strategies over a [`LanguageModel`]: greedy search, sampling and beam search.
//!
//! The algorithms follow transformers' `generate` (5.x) step for step, so that with the
//! same logits they choose the same tokens: the same logits processors in the same
//! order, beam search over `log_softmax` scores with the same candidate count,
//! length normalisation and stopping heuristics. Each item of a batch is decoded
//! independently of the others; padding never changes a result.

mod agreement;
mod beam;
mod config;
mod processors;
mod search;

pub use agreement::{LogitAgreement, compare_greedy};
pub use config::{EarlyStopping, GenerationConfig, GenerationOptions, TokenIds};

use candle_core::{DType, Result, Tensor};

use crate::LanguageModel;

/// One input to generate from.
#[derive(Debug, Clone)]
pub struct PromptInput {
    /// Input embeddings `[tokens, embedding_size]`: the projected image queries
    /// followed by the prompt's token embeddings (decoder-only models), or the
    /// encoder input (encoder-decoder models).
    pub embeds: Tensor,
    /// What the reference's logits processors see as `input_ids` before the first
    /// generated token: the prompt ids with one placeholder id per image query for
    /// decoder-only models, the decoder start token for encoder-decoder models.
    pub sequence: Vec<u32>,
}

/// A generated continuation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// The new token ids, ending with the end-of-sequence token if one was produced.
    pub tokens: Vec<u32>,
    /// Whether generation stopped on an end-of-sequence token (rather than the length limit).
    pub ended_with_eos: bool,
    /// The length-normalised log-probability (beam search only).
    pub score: Option<f32>,
}

/// Called with `(item index, token id)` for every token chosen by greedy search or
/// sampling, as soon as it is chosen; the batch's rows are reported in order.
pub type TokenCallback<'a> = dyn FnMut(usize, u32) + 'a;

/// Generates continuations for each prompt; returns, for each prompt,
/// `num_return_sequences` results (best first for beam search).
pub fn generate(
    model: &dyn LanguageModel,
    prompts: &[PromptInput],
    options: &GenerationOptions,
    on_token: Option<&mut TokenCallback<'_>>,
) -> Result<Vec<Vec<Generated>>> {
    options.validate().map_err(candle_core::Error::Msg)?;
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let (embeds, mask) = left_pad(prompts, model.dtype())?;
    let _span = tracing::debug_span!("generate", batch = prompts.len(), beams = options.num_beams)
        .entered();
    let (session, first_logits) = model.start(&embeds, &mask, options.max_new_tokens)?;
    if options.num_beams > 1 {
        beam::beam_search(session, first_logits, prompts, options)
    } else {
        search::greedy_or_sample(session, first_logits, prompts, options, on_token)
    }
}

/// The probability of each next token when sampling: the logits processors and the
/// sampling warpers (temperature, top-k, top-p) applied to `logits`, then softmax.
///
/// `sequence` and `generated` are as for the processors: the tokens the reference's
/// `input_ids` holds at this step and how many of them were generated. Tokens the
/// filters remove have probability 0.
pub fn next_token_distribution(
    options: &GenerationOptions,
    sequence: &[u32],
    generated: usize,
    logits: &[f32],
) -> Vec<f32> {
    let mut scores = logits.to_vec();
    processors::process(options, sequence, generated, &mut scores);
    processors::warp_for_sampling(options, 1, &mut scores);
    processors::softmax(&scores)
}

/// Runs the prompts through the model and returns the `f32` logits `[batch, vocab]` of
/// the first token to generate.
pub fn first_logits(model: &dyn LanguageModel, prompts: &[PromptInput]) -> Result<Tensor> {
    if prompts.is_empty() {
        candle_core::bail!("no prompts given");
    }
    let (embeds, mask) = left_pad(prompts, model.dtype())?;
    let (_, logits) = model.start(&embeds, &mask, 1)?;
    Ok(logits)
}

/// Stacks the prompts into `[batch, longest, width]`, padding on the left with zeros,
/// and returns the `[batch, longest]` mask (1 for real positions).
fn left_pad(prompts: &[PromptInput], dtype: DType) -> Result<(Tensor, Tensor)> {
    let width = prompts[0].embeds.dim(1)?;
    let longest = prompts
        .iter()
        .map(|p| p.embeds.dim(0))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .max()
        .unwrap_or(0);
    let device = prompts[0].embeds.device().clone();
    let mut rows = Vec::with_capacity(prompts.len());
    let mut mask = Vec::with_capacity(prompts.len() * longest);
    for prompt in prompts {
        let (tokens, prompt_width) = prompt.embeds.dims2()?;
        if prompt_width != width {
            candle_core::bail!("prompt embeddings have width {prompt_width}, expected {width}");
        }
        if tokens == 0 {
            candle_core::bail!("a prompt has no input embeddings");
        }
        let embeds = prompt.embeds.to_dtype(dtype)?;
        let padded = if tokens < longest {
            let padding = Tensor::zeros((longest - tokens, width), dtype, &device)?;
            Tensor::cat(&[&padding, &embeds], 0)?
        } else {
            embeds
        };
        rows.push(padded);
        mask.extend(std::iter::repeat_n(0u32, longest - tokens));
        mask.extend(std::iter::repeat_n(1u32, tokens));
    }
    let embeds = Tensor::stack(&rows, 0)?;
    let mask = Tensor::from_vec(mask, (prompts.len(), longest), &device)?;
    Ok((embeds, mask))
}
