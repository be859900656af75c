//! The BLIP-2 `config.json`.

use std::path::Path;

use blip2_lm::TextConfig;
use blip2_qformer::QFormerConfig;
use blip2_vision::VisionConfig;
use serde::Deserialize;

use crate::{Error, Result};

/// A mirror of transformers' `Blip2Config`; missing keys take its defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Blip2Config {
    /// `"blip-2"` for every BLIP-2 checkpoint.
    pub model_type: String,
    /// The model classes the checkpoint was saved from.
    pub architectures: Vec<String>,
    /// The image encoder.
    pub vision_config: VisionConfig,
    /// The Q-Former.
    pub qformer_config: QFormerConfig,
    /// The language model, selected by `model_type` (`opt`, ...).
    pub text_config: TextConfig,
    /// Number of learned queries.
    pub num_query_tokens: usize,
    /// Width of the retrieval embeddings (image-text matching checkpoints).
    pub image_text_hidden_size: usize,
    /// Token id that stands for one image query in the prompt's `input_ids`.
    pub image_token_index: Option<u32>,
}

impl Default for Blip2Config {
    fn default() -> Self {
        Self {
            model_type: "blip-2".into(),
            architectures: Vec::new(),
            vision_config: VisionConfig::default(),
            qformer_config: QFormerConfig::default(),
            text_config: TextConfig::default(),
            num_query_tokens: 32,
            image_text_hidden_size: 256,
            image_token_index: None,
        }
    }
}

impl Blip2Config {
    /// Reads and checks `config.json`; errors name the file and the field.
    pub fn from_file(path: &Path) -> Result<Self> {
        let config: Self = read_json(path)?;
        if config.model_type != "blip-2" {
            return Err(Error::Unsupported {
                path: path.to_owned(),
                message: format!("model_type is {:?}, expected \"blip-2\"", config.model_type),
            });
        }
        if config.num_query_tokens == 0 {
            return Err(Error::InvalidConfig {
                path: path.to_owned(),
                source: blip2_nn::ConfigError::new("num_query_tokens", "must be greater than zero"),
            });
        }
        Ok(config)
    }
}

/// Parses a JSON file into `T`, reporting the field path on type errors.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut deserializer = serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let field = error.path().to_string();
        let message = if field == "." {
            error.inner().to_string()
        } else {
            format!("field `{field}`: {}", error.inner())
        };
        Error::InvalidJson {
            path: path.to_owned(),
            message,
        }
    })
}
