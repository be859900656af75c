use serde::Deserialize;

/// `early_stopping` of a generation config: `true`, `false` or `"never"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EarlyStopping {
    /// Stop a beam search item as soon as `num_beams` hypotheses are finished.
    Always,
    /// Stop when the best running hypothesis, at its current length, cannot beat the
    /// worst finished one (transformers' default heuristic).
    #[default]
    Heuristic,
    /// Stop only when no running hypothesis can beat the finished ones at any length.
    Never,
}

impl<'de> Deserialize<'de> for EarlyStopping {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Flag(bool),
            Word(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Flag(true) => Ok(Self::Always),
            Raw::Flag(false) => Ok(Self::Heuristic),
            Raw::Word(word) if word == "never" => Ok(Self::Never),
            Raw::Word(word) => Err(serde::de::Error::custom(format!(
                "invalid early_stopping {word:?}: expected true, false or \"never\""
            ))),
        }
    }
}

/// A token id or a list of them, as `eos_token_id` may be written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// One id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

/// A mirror of `generation_config.json`, with transformers' `GenerationConfig` defaults.
///
/// Only the fields this crate acts on are read; [`GenerationConfig::unsupported_fields`]
/// lists the ones that are set but ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct GenerationConfig {
    /// Longest total sequence (prompt included); used only when `max_new_tokens` is unset.
    pub max_length: usize,
    /// Most tokens to generate.
    pub max_new_tokens: Option<usize>,
    /// Shortest total sequence (prompt included) before end-of-sequence is allowed.
    pub min_length: usize,
    /// Fewest tokens to generate before end-of-sequence is allowed.
    pub min_new_tokens: Option<usize>,
    /// Beam search stopping rule.
    pub early_stopping: EarlyStopping,
    /// Sample instead of searching.
    pub do_sample: bool,
    /// Number of beams; 1 is greedy search (or plain sampling).
    pub num_beams: usize,
    /// Softmax temperature when sampling.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens when sampling (0 disables).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` when sampling.
    pub top_p: f32,
    /// Penalty on tokens already in the sequence (1.0 disables).
    pub repetition_penalty: f32,
    /// Exponent of the length normalisation of beam scores.
    pub length_penalty: f32,
    /// Forbid repeating any n-gram of this size (0 disables).
    pub no_repeat_ngram_size: usize,
    /// Number of sequences returned per input (at most `num_beams` with beam search).
    pub num_return_sequences: usize,
    /// Token ids that end a sequence.
    pub eos_token_id: Option<TokenIds>,
    /// Padding token id.
    pub pad_token_id: Option<u32>,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u32>,
    /// First decoder token of encoder-decoder models.
    pub decoder_start_token_id: Option<u32>,
    /// Everything else in the file, kept to warn about settings that are ignored.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_length: 20,
            max_new_tokens: None,
            min_length: 0,
            min_new_tokens: None,
            early_stopping: EarlyStopping::Heuristic,
            do_sample: false,
            num_beams: 1,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            repetition_penalty: 1.0,
            length_penalty: 1.0,
            no_repeat_ngram_size: 0,
            num_return_sequences: 1,
            eos_token_id: None,
            pad_token_id: None,
            bos_token_id: None,
            decoder_start_token_id: None,
            other: serde_json::Map::new(),
        }
    }
}

/// Keys of `generation_config.json` that are metadata or have no effect on this
/// crate's decoding, so they are not reported as ignored.
const HARMLESS_KEYS: &[&str] = &[
    "_from_model_config",
    "transformers_version",
    "use_cache",
    "output_scores",
    "output_attentions",
    "output_hidden_states",
    "return_dict_in_generate",
    "output_logits",
    "cache_implementation",
];

impl GenerationConfig {
    /// Keys that would change decoding in transformers but are not implemented here,
    /// with a non-default value; callers should warn about them.
    pub fn unsupported_fields(&self) -> Vec<String> {
        self.other
            .iter()
            .filter(|(key, value)| !HARMLESS_KEYS.contains(&key.as_str()) && !value.is_null())
            .map(|(key, _)| key.clone())
            .collect()
    }
}

/// The settings of one generation call, after defaults and overrides are applied.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationOptions {
    /// Most tokens to generate per sequence.
    pub max_new_tokens: usize,
    /// Fewest tokens to generate before an end-of-sequence token is allowed.
    pub min_new_tokens: usize,
    /// Shortest processor-visible sequence (prompt included) before end-of-sequence.
    pub min_length: usize,
    /// Number of beams; 1 means greedy search or plain sampling.
    pub num_beams: usize,
    /// Exponent of the length normalisation of beam scores.
    pub length_penalty: f32,
    /// Beam search stopping rule.
    pub early_stopping: EarlyStopping,
    /// Penalty on tokens already in the sequence (1.0 disables).
    pub repetition_penalty: f32,
    /// Forbid repeating any n-gram of this size (0 disables).
    pub no_repeat_ngram_size: usize,
    /// Sequences returned per input.
    pub num_return_sequences: usize,
    /// Sample instead of searching.
    pub do_sample: bool,
    /// Softmax temperature when sampling.
    pub temperature: f32,
    /// Top-k filter when sampling (0 disables).
    pub top_k: usize,
    /// Nucleus filter when sampling (1.0 disables).
    pub top_p: f32,
    /// Seed of the sampler's random number generator.
    pub seed: u64,
    /// Token ids that end a sequence.
    pub eos_token_ids: Vec<u32>,
}

impl GenerationOptions {
    /// Options from a checkpoint's generation config; `default_max_new_tokens`
    /// applies when the file sets no `max_new_tokens`.
    pub fn from_config(config: &GenerationConfig, default_max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens: config.max_new_tokens.unwrap_or(default_max_new_tokens),
            min_new_tokens: config.min_new_tokens.unwrap_or(0),
            min_length: config.min_length,
            num_beams: config.num_beams.max(1),
            length_penalty: config.length_penalty,
            early_stopping: config.early_stopping,
            repetition_penalty: config.repetition_penalty,
            no_repeat_ngram_size: config.no_repeat_ngram_size,
            num_return_sequences: config.num_return_sequences.max(1),
            do_sample: config.do_sample,
            temperature: config.temperature,
            top_k: config.top_k,
            top_p: config.top_p,
            seed: 0,
            eos_token_ids: config
                .eos_token_id
                .as_ref()
                .map(TokenIds::to_vec)
                .unwrap_or_default(),
        }
    }

    /// Checks the values, naming the first invalid one.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_new_tokens == 0 {
            return Err("max_new_tokens must be at least 1".into());
        }
        if self.min_new_tokens > self.max_new_tokens {
            return Err(format!(
                "min_new_tokens ({}) is larger than max_new_tokens ({})",
                self.min_new_tokens, self.max_new_tokens
            ));
        }
        if self.num_beams == 0 {
            return Err("num_beams must be at least 1".into());
        }
        if self.num_return_sequences == 0 {
            return Err("num_return_sequences must be at least 1".into());
        }
        if self.num_beams > 1 && self.num_return_sequences > self.num_beams {
            return Err(format!(
                "num_return_sequences ({}) cannot exceed num_beams ({})",
                self.num_return_sequences, self.num_beams
            ));
        }
        if self.num_beams == 1 && !self.do_sample && self.num_return_sequences > 1 {
            return Err(
                "greedy search returns one sequence; use beams or sampling for more".into(),
            );
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return Err(format!(
                "repetition_penalty must be a positive number, got {}",
                self.repetition_penalty
            ));
        }
        if self.num_beams > 1 && self.do_sample {
            return Err(format!(
                "sampling runs with one beam, got num_beams {}; use beam search or sampling, \
                 not both",
                self.num_beams
            ));
        }
        if !self.length_penalty.is_finite() {
            return Err(format!(
                "length_penalty must be finite, got {}",
                self.length_penalty
            ));
        }
        if self.do_sample {
            if !self.temperature.is_finite() || self.temperature <= 0.0 {
                return Err(format!(
                    "temperature must be a positive number, got {}",
                    self.temperature
                ));
            }
            if self.top_p.is_nan() || self.top_p <= 0.0 || self.top_p > 1.0 {
                return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_published_blip2_opt_generation_config() {
        let json = r#"{"_from_model_config": true, "bos_token_id": 2, "eos_token_id": 50118,
                       "pad_token_id": 1, "transformers_version": "4.47.0.dev0"}"#;
        let config: GenerationConfig = serde_json::from_str(json).unwrap();
        assert_eq!(config.eos_token_id, Some(TokenIds::One(50118)));
        assert!(
            config.unsupported_fields().is_empty(),
            "{:?}",
            config.unsupported_fields()
        );
        let options = GenerationOptions::from_config(&config, 30);
        assert_eq!(options.max_new_tokens, 30);
        assert_eq!(options.eos_token_ids, vec![50118]);
    }

    #[test]
    fn early_stopping_accepts_bool_and_never() {
        let parse = |s: &str| serde_json::from_str::<GenerationConfig>(s).map(|c| c.early_stopping);
        assert_eq!(
            parse(r#"{"early_stopping": true}"#).unwrap(),
            EarlyStopping::Always
        );
        assert_eq!(
            parse(r#"{"early_stopping": false}"#).unwrap(),
            EarlyStopping::Heuristic
        );
        assert_eq!(
            parse(r#"{"early_stopping": "never"}"#).unwrap(),
            EarlyStopping::Never
        );
        assert!(parse(r#"{"early_stopping": "sometimes"}"#).is_err());
    }

    #[test]
    fn beams_with_sampling_are_rejected() {
        let mut options = GenerationOptions::from_config(&GenerationConfig::default(), 30);
        options.num_beams = 3;
        options.do_sample = true;
        let message = options.validate().unwrap_err();
        assert!(message.contains("num_beams 3"), "{message}");
        options.num_beams = 1;
        assert_eq!(options.validate(), Ok(()));
    }

    #[test]
    fn unsupported_settings_are_listed() {
        let config: GenerationConfig =
            serde_json::from_str(r#"{"bad_words_ids": [[5]], "use_cache": true}"#).unwrap();
        assert_eq!(
            config.unsupported_fields(),
            vec!["bad_words_ids".to_string()]
        );
    }
}
