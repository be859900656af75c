//! The language model's tokenizer, from `tokenizer.json`.

use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

/// The parts of `tokenizer_config.json` that change encoding.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TokenizerSettings {
    add_bos_token: Option<bool>,
}

/// Encodes prompts and decodes generated ids.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// Prepended when the tokenizer settings ask for a beginning-of-sequence token
    /// that `tokenizer.json`'s post-processor does not add itself.
    required_bos: Option<u32>,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`; `settings` is `tokenizer_config.json` if present, and
    /// `bos_token_id` the language model's beginning-of-sequence id.
    pub fn load(path: &Path, settings: Option<&Path>, bos_token_id: Option<u32>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let settings: TokenizerSettings = match settings {
            Some(settings_path) => crate::config::read_json(settings_path)?,
            None => TokenizerSettings::default(),
        };
        let required_bos = if settings.add_bos_token == Some(true) {
            bos_token_id
        } else {
            None
        };
        Ok(Self {
            inner,
            required_bos,
        })
    }

    /// Token ids of `text` with the tokenizer's special tokens (BOS for OPT, EOS for T5).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, true).map_err(|e| Error::Tokenize {
            input: text.into(),
            message: e.to_string(),
        })?;
        let mut ids = encoding.get_ids().to_vec();
        if let Some(bos) = self.required_bos
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// Text of `ids` without special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| Error::Tokenize {
            input: format!("{} token ids", ids.len()),
            message: e.to_string(),
        })
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
