//! Decoding settings from form fields, in the terms of the public BLIP-2 demos: beam
//! search or nucleus sampling, with their knobs.

use axum::http::StatusCode;
use blip2_pipeline::GenerationOptions;
use serde::Serialize;

use crate::error::ApiError;
use crate::form::Form;
use crate::limits::Limits;

/// The form fields that set decoding.
pub(crate) const DECODING_FIELDS: &[&str] = &[
    "decoding",
    "num_beams",
    "max_new_tokens",
    "min_new_tokens",
    "length_penalty",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "temperature",
    "top_p",
    "top_k",
    "seed",
];

/// Fields that only apply to nucleus sampling.
const SAMPLING_FIELDS: &[&str] = &["temperature", "top_p", "top_k", "seed"];

/// The decoding settings a result was generated with, echoed in responses so that a
/// sampled text can be repeated with its seed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Settings {
    /// `beam` (beam search; one beam is greedy search) or `nucleus` (sampling).
    pub decoding: &'static str,
    pub num_beams: usize,
    pub max_new_tokens: usize,
    pub min_new_tokens: usize,
    pub length_penalty: f32,
    pub repetition_penalty: f32,
    pub no_repeat_ngram_size: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl Settings {
    pub fn of(options: &GenerationOptions) -> Self {
        let sampling = options.do_sample;
        Self {
            decoding: if sampling { "nucleus" } else { "beam" },
            num_beams: options.num_beams,
            max_new_tokens: options.max_new_tokens,
            min_new_tokens: options.min_new_tokens,
            length_penalty: options.length_penalty,
            repetition_penalty: options.repetition_penalty,
            no_repeat_ngram_size: options.no_repeat_ngram_size,
            temperature: sampling.then_some(options.temperature),
            top_p: sampling.then_some(options.top_p),
            top_k: sampling.then_some(options.top_k),
            seed: sampling.then_some(options.seed),
        }
    }
}

/// The checkpoint's decoding defaults as this server applies them: one returned text, and
/// `max_new_tokens` lowered to the server's ceiling.
pub(crate) fn server_defaults(checkpoint: GenerationOptions, limits: &Limits) -> GenerationOptions {
    GenerationOptions {
        max_new_tokens: checkpoint.max_new_tokens.min(limits.max_new_tokens_limit),
        min_new_tokens: checkpoint.min_new_tokens.min(limits.max_new_tokens_limit),
        num_beams: checkpoint.num_beams.min(limits.max_num_beams),
        num_return_sequences: 1,
        ..checkpoint
    }
}

/// Applies the form's decoding fields to `defaults` and checks the result.
///
/// A sampling field with beam search, or `num_beams` with nucleus sampling, is an error
/// rather than silently ignored. Without a `seed`, sampling draws a random one.
pub(crate) fn generation_options(
    form: &Form,
    defaults: &GenerationOptions,
    limits: &Limits,
) -> Result<GenerationOptions, ApiError> {
    let mut options = defaults.clone();
    match form.text("decoding").map(str::trim) {
        None => {}
        Some("beam") => options.do_sample = false,
        Some("nucleus") => {
            options.do_sample = true;
            options.num_beams = 1;
        }
        Some(other) => {
            return Err(ApiError::invalid_request(format!(
                "the `decoding` field must be `beam` (beam search) or `nucleus` (nucleus sampling), \
                 got {:?}",
                other.chars().take(40).collect::<String>()
            )));
        }
    }
    if options.do_sample {
        if form.has("num_beams") {
            return Err(ApiError::invalid_request(
                "`num_beams` applies to beam search; nucleus sampling draws one text, so leave it out \
                 or send decoding=beam",
            ));
        }
    } else if let Some(field) = SAMPLING_FIELDS.iter().find(|field| form.has(field)) {
        return Err(ApiError::invalid_request(format!(
            "`{field}` applies to nucleus sampling; send decoding=nucleus with it"
        )));
    }

    if let Some(value) = form.usize("num_beams")? {
        options.num_beams = value;
    }
    if let Some(value) = form.usize("max_new_tokens")? {
        options.max_new_tokens = value;
    }
    if let Some(value) = form.usize("min_new_tokens")? {
        options.min_new_tokens = value;
    }
    if let Some(value) = form.f32("length_penalty")? {
        options.length_penalty = value;
    }
    if let Some(value) = form.f32("repetition_penalty")? {
        options.repetition_penalty = value;
    }
    if let Some(value) = form.usize("no_repeat_ngram_size")? {
        options.no_repeat_ngram_size = value;
    }
    if let Some(value) = form.f32("temperature")? {
        options.temperature = value;
    }
    if let Some(value) = form.f32("top_p")? {
        options.top_p = value;
    }
    if let Some(value) = form.usize("top_k")? {
        options.top_k = value;
    }
    if options.do_sample {
        options.seed = match form.u64("seed")? {
            Some(seed) => seed,
            None => getrandom::u64()
                .map_err(|e| ApiError::internal(format!("cannot draw a random seed: {e}")))?,
        };
    }

    if options.max_new_tokens > limits.max_new_tokens_limit {
        return Err(ApiError::over_limit(
            StatusCode::BAD_REQUEST,
            "too_many_new_tokens",
            "max_new_tokens_limit",
            limits.max_new_tokens_limit,
            format!(
                "max_new_tokens is {}, more than this server's limit of {} (set by \
                 --max-new-tokens-limit)",
                options.max_new_tokens, limits.max_new_tokens_limit
            ),
        ));
    }
    if options.num_beams > limits.max_num_beams {
        return Err(ApiError::over_limit(
            StatusCode::BAD_REQUEST,
            "too_many_beams",
            "max_num_beams",
            limits.max_num_beams,
            format!(
                "num_beams is {}, more than this server's limit of {} (set by --max-num-beams)",
                options.num_beams, limits.max_num_beams
            ),
        ));
    }
    options.validate().map_err(|message| {
        ApiError::invalid_request(format!("invalid decoding settings: {message}"))
    })?;
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> GenerationOptions {
        let config: blip2_pipeline::GenerationConfig = serde_json::from_str("{}").unwrap();
        GenerationOptions::from_config(&config, 30)
    }

    fn options(fields: &[(&str, &str)]) -> Result<GenerationOptions, ApiError> {
        generation_options(&Form::with_fields(fields), &defaults(), &Limits::default())
    }

    #[test]
    fn beam_settings_apply() {
        let options = options(&[
            ("decoding", "beam"),
            ("num_beams", "5"),
            ("max_new_tokens", "20"),
            ("min_new_tokens", "2"),
            ("length_penalty", "-0.5"),
            ("repetition_penalty", "1.5"),
        ])
        .unwrap();
        assert!(!options.do_sample);
        assert_eq!(options.num_beams, 5);
        assert_eq!(options.max_new_tokens, 20);
        assert_eq!(options.min_new_tokens, 2);
        assert_eq!(options.length_penalty, -0.5);
        assert_eq!(options.repetition_penalty, 1.5);
    }

    #[test]
    fn nucleus_draws_seed_unless_given() {
        let given = options(&[("decoding", "nucleus"), ("top_p", "0.8"), ("seed", "7")]).unwrap();
        assert!(given.do_sample);
        assert_eq!(given.num_beams, 1);
        assert_eq!(given.top_p, 0.8);
        assert_eq!(given.seed, 7);
        let first = options(&[("decoding", "nucleus")]).unwrap().seed;
        let second = options(&[("decoding", "nucleus")]).unwrap().seed;
        assert_ne!(first, second, "two drawn seeds were equal");
    }

    #[test]
    fn mixed_modes_are_rejected() {
        let error = options(&[("temperature", "0.7")]).unwrap_err();
        assert!(
            error.message.contains("decoding=nucleus"),
            "{}",
            error.message
        );
        let error = options(&[("decoding", "nucleus"), ("num_beams", "3")]).unwrap_err();
        assert!(error.message.contains("num_beams"), "{}", error.message);
        let error = options(&[("decoding", "greedy")]).unwrap_err();
        assert!(error.message.contains("`decoding`"), "{}", error.message);
    }

    #[test]
    fn ceilings_name_their_limits() {
        let error = options(&[("max_new_tokens", "129")]).unwrap_err();
        assert_eq!(error.code, "too_many_new_tokens");
        assert_eq!(error.limit, Some(("max_new_tokens_limit", 128.into())));
        let error = options(&[("num_beams", "11")]).unwrap_err();
        assert_eq!(error.code, "too_many_beams");
        assert_eq!(error.limit, Some(("max_num_beams", 10.into())));
    }

    #[test]
    fn invalid_combination_is_400() {
        let error = options(&[("max_new_tokens", "3"), ("min_new_tokens", "5")]).unwrap_err();
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        assert!(
            error.message.contains("min_new_tokens"),
            "{}",
            error.message
        );
        let error = options(&[("max_new_tokens", "0")]).unwrap_err();
        assert!(error.message.contains("at least 1"), "{}", error.message);
    }

    #[test]
    fn defaults_are_capped() {
        let checkpoint = GenerationOptions {
            max_new_tokens: 500,
            num_beams: 20,
            num_return_sequences: 3,
            ..defaults()
        };
        let capped = server_defaults(checkpoint, &Limits::default());
        assert_eq!(capped.max_new_tokens, 128);
        assert_eq!(capped.num_beams, 10);
        assert_eq!(capped.num_return_sequences, 1);
    }
}
