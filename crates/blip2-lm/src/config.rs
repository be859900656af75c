use blip2_nn::{Activation, ConfigError};
use serde::Deserialize;

/// The `text_config` of a BLIP-2 `config.json`, selected by its `model_type`.
///
/// An unknown `model_type` is a parse error that names it.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "model_type")]
pub enum TextConfig {
    /// Meta's OPT (`model_type: "opt"`), a decoder-only model.
    #[serde(rename = "opt")]
    Opt(OptConfig),
    /// Google's T5 and Flan-T5 (`model_type: "t5"`), encoder-decoder models.
    #[serde(rename = "t5")]
    T5(T5Config),
}

impl Default for TextConfig {
    /// transformers builds an OPT config when `text_config` is missing.
    fn default() -> Self {
        Self::Opt(OptConfig::default())
    }
}

impl TextConfig {
    /// Width of the language model's hidden states, which the BLIP-2 language
    /// projection outputs.
    pub fn hidden_size(&self) -> usize {
        match self {
            Self::Opt(config) => config.hidden_size,
            Self::T5(config) => config.d_model,
        }
    }

    /// The beginning-of-sequence token id.
    pub fn bos_token_id(&self) -> Option<u32> {
        match self {
            Self::Opt(config) => config.bos_token_id,
            Self::T5(config) => config.bos_token_id,
        }
    }

    /// The end-of-sequence token id of the language model's own config.
    pub fn eos_token_id(&self) -> Option<u32> {
        match self {
            Self::Opt(config) => config.eos_token_id,
            Self::T5(config) => config.eos_token_id,
        }
    }

    /// Whether the model is an encoder-decoder.
    pub fn is_encoder_decoder(&self) -> bool {
        matches!(self, Self::T5(_))
    }

    /// The `model_type` string.
    pub fn model_type(&self) -> &'static str {
        match self {
            Self::Opt(_) => "opt",
            Self::T5(_) => "t5",
        }
    }
}

/// A mirror of transformers' `OPTConfig`, with its defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct OptConfig {
    /// Vocabulary size (rows of the embedding and of the logits).
    pub vocab_size: usize,
    /// Width of the decoder layers.
    pub hidden_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Width of the feed-forward hidden layer.
    pub ffn_dim: usize,
    /// Number of learned positions.
    pub max_position_embeddings: usize,
    /// Pre-layer-norm (true) or post-layer-norm (false, as in OPT-350m).
    pub do_layer_norm_before: bool,
    /// Drops the final layer norm of pre-norm models (some converted checkpoints).
    #[serde(rename = "_remove_final_layer_norm")]
    pub remove_final_layer_norm: bool,
    /// Width of the token embeddings, projected to `hidden_size` when it differs.
    pub word_embed_proj_dim: Option<usize>,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Feed-forward activation name.
    pub activation_function: String,
    /// Whether linear layers have biases.
    pub enable_bias: bool,
    /// Whether layer norms have weight and bias.
    pub layer_norm_elementwise_affine: bool,
    /// Whether the output projection reuses the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// Padding token id.
    pub pad_token_id: Option<u32>,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id.
    pub eos_token_id: Option<u32>,
}

impl Default for OptConfig {
    fn default() -> Self {
        Self {
            vocab_size: 50272,
            hidden_size: 768,
            num_hidden_layers: 12,
            ffn_dim: 3072,
            max_position_embeddings: 2048,
            do_layer_norm_before: true,
            remove_final_layer_norm: false,
            word_embed_proj_dim: None,
            num_attention_heads: 12,
            activation_function: "relu".into(),
            enable_bias: true,
            layer_norm_elementwise_affine: true,
            tie_word_embeddings: true,
            pad_token_id: Some(1),
            bos_token_id: Some(2),
            eos_token_id: Some(2),
        }
    }
}

/// Validated OPT settings.
#[derive(Debug, Clone, PartialEq)]
pub struct OptSettings {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the decoder layers.
    pub hidden_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Width of the feed-forward hidden layer.
    pub ffn_dim: usize,
    /// Number of learned positions.
    pub max_positions: usize,
    /// Pre-layer-norm or post-layer-norm.
    pub layer_norm_before: bool,
    /// Whether the decoder ends with a layer norm.
    pub final_layer_norm: bool,
    /// Width of the token embeddings.
    pub embedding_size: usize,
    /// Number of attention heads.
    pub num_heads: usize,
    /// Feed-forward activation.
    pub activation: Activation,
    /// Whether linear layers have biases.
    pub bias: bool,
    /// Whether layer norms have weight and bias.
    pub layer_norm_affine: bool,
    /// Whether the output projection reuses the token embeddings.
    pub tie_word_embeddings: bool,
}

/// OPT's layer norms use PyTorch's default epsilon; `OPTConfig` has no field for it.
pub const OPT_LAYER_NORM_EPS: f64 = 1e-5;

/// OPT's learned position table has two extra rows at the start (a fairseq legacy),
/// so position `p` reads row `p + 2`.
pub const OPT_POSITION_OFFSET: usize = 2;

impl OptConfig {
    /// Checks the values and derives the settings the model is built from.
    pub fn resolve(&self) -> Result<OptSettings, ConfigError> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("ffn_dim", self.ffn_dim),
            ("max_position_embeddings", self.max_position_embeddings),
            ("num_attention_heads", self.num_attention_heads),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ConfigError::new(field, "must be greater than zero"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(ConfigError::new(
                "num_attention_heads",
                format!(
                    "hidden_size {} is not divisible by num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        let embedding_size = self.word_embed_proj_dim.unwrap_or(self.hidden_size);
        if embedding_size == 0 {
            return Err(ConfigError::new(
                "word_embed_proj_dim",
                "must be greater than zero",
            ));
        }
        Ok(OptSettings {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_layers: self.num_hidden_layers,
            ffn_dim: self.ffn_dim,
            max_positions: self.max_position_embeddings,
            layer_norm_before: self.do_layer_norm_before,
            final_layer_norm: self.do_layer_norm_before && !self.remove_final_layer_norm,
            embedding_size,
            num_heads: self.num_attention_heads,
            activation: Activation::from_hf_name(&self.activation_function, "activation_function")?,
            bias: self.enable_bias,
            layer_norm_affine: self.layer_norm_elementwise_affine,
            tie_word_embeddings: self.tie_word_embeddings,
        })
    }
}

/// A mirror of transformers' `T5Config`, with its defaults (Flan-T5 checkpoints set
/// `feed_forward_proj: "gated-gelu"` and `tie_word_embeddings: false`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct T5Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Width of each attention head.
    pub d_kv: usize,
    /// Width of the feed-forward hidden layer.
    pub d_ff: usize,
    /// Number of encoder layers.
    pub num_layers: usize,
    /// Number of decoder layers (defaults to `num_layers`).
    pub num_decoder_layers: Option<usize>,
    /// Number of attention heads.
    pub num_heads: usize,
    /// Number of relative position buckets.
    pub relative_attention_num_buckets: usize,
    /// Distance beyond which relative positions share a bucket.
    pub relative_attention_max_distance: usize,
    /// Epsilon of the RMS norms.
    pub layer_norm_epsilon: f64,
    /// `"relu"`, `"gated-gelu"` or `"gated-ACT"`.
    pub feed_forward_proj: String,
    /// Whether the output projection reuses the embeddings; when not `false`, the decoder
    /// output is scaled by `d_model^-0.5` before it (unless `scale_decoder_outputs` says
    /// otherwise).
    pub tie_word_embeddings: Option<bool>,
    /// Whether to scale the decoder output by `d_model^-0.5`; transformers 5 writes it
    /// explicitly, older configs imply it through `tie_word_embeddings`.
    pub scale_decoder_outputs: Option<bool>,
    /// Padding token id (also the usual decoder start token).
    pub pad_token_id: Option<u32>,
    /// End-of-sequence token id.
    pub eos_token_id: Option<u32>,
    /// Beginning-of-sequence token id (T5 has none).
    pub bos_token_id: Option<u32>,
    /// First decoder token; transformers falls back to `pad_token_id`.
    pub decoder_start_token_id: Option<u32>,
}

impl Default for T5Config {
    fn default() -> Self {
        Self {
            vocab_size: 32128,
            d_model: 512,
            d_kv: 64,
            d_ff: 2048,
            num_layers: 6,
            num_decoder_layers: None,
            num_heads: 8,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "relu".into(),
            tie_word_embeddings: None,
            scale_decoder_outputs: None,
            pad_token_id: Some(0),
            eos_token_id: Some(1),
            bos_token_id: None,
            decoder_start_token_id: None,
        }
    }
}

/// Validated T5 settings.
#[derive(Debug, Clone, PartialEq)]
pub struct T5Settings {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Width of each attention head.
    pub d_kv: usize,
    /// Width of the feed-forward hidden layer.
    pub d_ff: usize,
    /// Number of encoder layers.
    pub encoder_layers: usize,
    /// Number of decoder layers.
    pub decoder_layers: usize,
    /// Number of attention heads.
    pub num_heads: usize,
    /// Number of relative position buckets.
    pub num_buckets: usize,
    /// Distance beyond which relative positions share a bucket.
    pub max_distance: usize,
    /// Epsilon of the RMS norms.
    pub layer_norm_eps: f64,
    /// Feed-forward activation.
    pub activation: Activation,
    /// Whether the feed-forward is gated (`wi_0`, `wi_1`) or plain (`wi`).
    pub gated: bool,
    /// Whether the decoder output is scaled by `d_model^-0.5` before the output layer.
    pub scale_decoder_outputs: bool,
    /// First decoder token.
    pub decoder_start_token_id: u32,
}

impl T5Config {
    /// Checks the values and derives the settings the model is built from.
    pub fn resolve(&self) -> Result<T5Settings, ConfigError> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            (
                "relative_attention_num_buckets",
                self.relative_attention_num_buckets,
            ),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ConfigError::new(field, "must be greater than zero"));
            }
        }
        if self.relative_attention_max_distance < self.relative_attention_num_buckets {
            return Err(ConfigError::new(
                "relative_attention_max_distance",
                format!(
                    "must be at least relative_attention_num_buckets ({}), got {}",
                    self.relative_attention_num_buckets, self.relative_attention_max_distance
                ),
            ));
        }
        let parts: Vec<&str> = self.feed_forward_proj.split('-').collect();
        let (gated, activation_name) = match parts.as_slice() {
            [name] => (false, *name),
            ["gated", name] => (true, *name),
            _ => {
                return Err(ConfigError::new(
                    "feed_forward_proj",
                    format!(
                        "expected \"ACT\" or \"gated-ACT\", got {:?}",
                        self.feed_forward_proj
                    ),
                ));
            }
        };
        // transformers maps the legacy "gated-gelu" to the tanh approximation.
        let activation_name = if self.feed_forward_proj == "gated-gelu" {
            "gelu_new"
        } else {
            activation_name
        };
        let decoder_start_token_id = self
            .decoder_start_token_id
            .or(self.pad_token_id)
            .ok_or_else(|| {
                ConfigError::new(
                    "decoder_start_token_id",
                    "neither it nor pad_token_id is set",
                )
            })?;
        Ok(T5Settings {
            vocab_size: self.vocab_size,
            d_model: self.d_model,
            d_kv: self.d_kv,
            d_ff: self.d_ff,
            encoder_layers: self.num_layers,
            decoder_layers: self.num_decoder_layers.unwrap_or(self.num_layers),
            num_heads: self.num_heads,
            num_buckets: self.relative_attention_num_buckets,
            max_distance: self.relative_attention_max_distance,
            layer_norm_eps: self.layer_norm_epsilon,
            activation: Activation::from_hf_name(activation_name, "feed_forward_proj")?,
            gated,
            scale_decoder_outputs: self
                .scale_decoder_outputs
                .unwrap_or(self.tie_word_embeddings != Some(false)),
            decoder_start_token_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_type_selects_variant() {
        let config: TextConfig =
            serde_json::from_str(r#"{"model_type": "opt", "hidden_size": 64}"#).unwrap();
        assert_eq!(config.hidden_size(), 64);
        assert_eq!(config.model_type(), "opt");
    }

    #[test]
    fn unknown_model_type_is_named() {
        let error = serde_json::from_str::<TextConfig>(r#"{"model_type": "gpt9"}"#).unwrap_err();
        assert!(error.to_string().contains("gpt9"), "{error}");
    }

    #[test]
    fn flan_t5_settings() {
        let json = r#"{"model_type": "t5", "feed_forward_proj": "gated-gelu", "tie_word_embeddings": false,
                       "d_model": 2048, "num_layers": 24, "num_heads": 32, "decoder_start_token_id": 0}"#;
        let TextConfig::T5(config) = serde_json::from_str::<TextConfig>(json).unwrap() else {
            panic!("expected a T5 config");
        };
        let settings = config.resolve().unwrap();
        assert!(settings.gated);
        assert_eq!(settings.activation, Activation::GeluTanh);
        assert!(!settings.scale_decoder_outputs);
        assert_eq!(settings.decoder_layers, 24);
    }

    #[test]
    fn malformed_feed_forward_is_named() {
        let config: T5Config =
            serde_json::from_str(r#"{"feed_forward_proj": "gated-gelu-extra"}"#).unwrap();
        assert_eq!(config.resolve().unwrap_err().field, "feed_forward_proj");
    }

    #[test]
    fn post_layer_norm_has_no_final_norm() {
        let config: OptConfig = serde_json::from_str(r#"{"do_layer_norm_before": false}"#).unwrap();
        assert!(!config.resolve().unwrap().final_layer_norm);
    }
}
