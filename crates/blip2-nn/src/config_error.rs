/// A config value that the model cannot be built from.
///
/// `field` is the dotted path of the key in `config.json` (for example
/// `vision_config.num_attention_heads`), so the user can find and fix it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid config field `{field}`: {message}")]
pub struct ConfigError {
    /// Dotted path of the offending key.
    pub field: String,
    /// What is wrong and what was expected.
    pub message: String,
}

impl ConfigError {
    /// Creates an error for `field` with an explanation of what was expected.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Prefixes the field path, so that a sub-config error reads `text_config.hidden_size`.
    pub fn within(mut self, parent: &str) -> Self {
        self.field = format!("{parent}.{}", self.field);
        self
    }
}
