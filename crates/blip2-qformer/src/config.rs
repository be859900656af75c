use blip2_nn::{Activation, ConfigError};
use serde::Deserialize;

/// A mirror of `qformer_config` in a BLIP-2 `config.json`.
///
/// Missing keys take the defaults of transformers' `Blip2QFormerConfig` (BERT-base
/// sizes). `encoder_hidden_size` is ignored: like the reference, the width of the
/// image features is taken from the vision config.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct QFormerConfig {
    /// Size of the BERT WordPiece vocabulary used by the text path.
    pub vocab_size: usize,
    /// Width of every token.
    pub hidden_size: usize,
    /// Number of layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Width of the feed-forward hidden layer.
    pub intermediate_size: usize,
    /// Feed-forward activation name.
    pub hidden_act: String,
    /// Number of learned text position embeddings.
    pub max_position_embeddings: usize,
    /// Epsilon of every layer norm.
    pub layer_norm_eps: f64,
    /// Id of the padding token of the text path.
    pub pad_token_id: Option<u32>,
    /// Layers `0, f, 2f, …` have cross-attention to the image.
    pub cross_attention_frequency: usize,
    /// Whether the layers carry the text feed-forward (`intermediate`, `output`).
    pub use_qformer_text_input: bool,
}

impl Default for QFormerConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".into(),
            max_position_embeddings: 512,
            layer_norm_eps: 1e-12,
            pad_token_id: Some(0),
            cross_attention_frequency: 2,
            use_qformer_text_input: false,
        }
    }
}

/// Validated Q-Former settings.
#[derive(Debug, Clone, PartialEq)]
pub struct QFormerSettings {
    /// Size of the text vocabulary.
    pub vocab_size: usize,
    /// Width of every token.
    pub hidden_size: usize,
    /// Number of layers.
    pub num_layers: usize,
    /// Number of attention heads.
    pub num_heads: usize,
    /// Width of the feed-forward hidden layer.
    pub intermediate_size: usize,
    /// Feed-forward activation.
    pub activation: Activation,
    /// Number of learned text position embeddings.
    pub max_position_embeddings: usize,
    /// Epsilon of every layer norm.
    pub layer_norm_eps: f64,
    /// Layers whose index is a multiple of this have cross-attention.
    pub cross_attention_frequency: usize,
    /// Width of the image features the cross-attention reads.
    pub encoder_hidden_size: usize,
    /// Whether the text feed-forward weights are part of the model.
    pub has_text_feed_forward: bool,
}

impl QFormerSettings {
    /// Whether layer `index` has cross-attention to the image features.
    pub fn has_cross_attention(&self, index: usize) -> bool {
        index.is_multiple_of(self.cross_attention_frequency)
    }
}

impl QFormerConfig {
    /// Checks the values; `encoder_hidden_size` is the vision encoder's output width.
    pub fn resolve(&self, encoder_hidden_size: usize) -> Result<QFormerSettings, ConfigError> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("cross_attention_frequency", self.cross_attention_frequency),
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
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return Err(ConfigError::new(
                "layer_norm_eps",
                format!("must be positive, got {}", self.layer_norm_eps),
            ));
        }
        Ok(QFormerSettings {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            activation: Activation::from_hf_name(&self.hidden_act, "hidden_act")?,
            max_position_embeddings: self.max_position_embeddings,
            layer_norm_eps: self.layer_norm_eps,
            cross_attention_frequency: self.cross_attention_frequency,
            encoder_hidden_size,
            has_text_feed_forward: self.use_qformer_text_input,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_attention_every_other_layer_by_default() {
        let settings = QFormerConfig::default().resolve(1408).unwrap();
        let layers: Vec<bool> = (0..4).map(|i| settings.has_cross_attention(i)).collect();
        assert_eq!(layers, [true, false, true, false]);
    }

    #[test]
    fn zero_frequency_is_rejected() {
        let config: QFormerConfig =
            serde_json::from_str(r#"{"cross_attention_frequency": 0}"#).unwrap();
        assert_eq!(
            config.resolve(32).unwrap_err().field,
            "cross_attention_frequency"
        );
    }
}
