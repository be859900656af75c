use blip2_nn::{Activation, ConfigError};
use serde::Deserialize;

/// The image size field: an integer, or `[height, width]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum ImageSize {
    /// A square image of this side.
    Square(usize),
    /// `[height, width]`.
    Pair([usize; 2]),
}

/// A mirror of `vision_config` in a BLIP-2 `config.json`.
///
/// Missing keys take the defaults of transformers' `Blip2VisionConfig`, which are the
/// ViT-g/14 sizes of the published checkpoints.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    /// Width of each token.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Number of transformer layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Side of the input images the position embeddings were trained for.
    pub image_size: ImageSize,
    /// Side of each square patch.
    pub patch_size: ImageSize,
    /// MLP activation name.
    pub hidden_act: String,
    /// Epsilon of every layer norm.
    pub layer_norm_eps: f64,
    /// Whether the query and value projections have biases (the key projection never has).
    pub qkv_bias: bool,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 1408,
            intermediate_size: 6144,
            num_hidden_layers: 39,
            num_attention_heads: 16,
            image_size: ImageSize::Square(224),
            patch_size: ImageSize::Square(14),
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-6,
            qkv_bias: true,
        }
    }
}

/// Validated vision encoder settings, ready to build a model from.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionSettings {
    /// Width of each token.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Number of transformer layers.
    pub num_layers: usize,
    /// Number of attention heads.
    pub num_heads: usize,
    /// Side of the square input image the position embeddings were trained for.
    pub image_size: usize,
    /// Side of each square patch.
    pub patch_size: usize,
    /// MLP activation.
    pub activation: Activation,
    /// Epsilon of every layer norm.
    pub layer_norm_eps: f64,
    /// Whether the query and value projections have biases.
    pub qkv_bias: bool,
}

impl VisionSettings {
    /// Patches along one side of the trained image size.
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Number of position embeddings: one per patch plus the class token.
    pub fn num_positions(&self) -> usize {
        self.grid_size() * self.grid_size() + 1
    }
}

fn square(size: ImageSize, field: &str) -> Result<usize, ConfigError> {
    match size {
        ImageSize::Square(side) => Ok(side),
        ImageSize::Pair([height, width]) if height == width => Ok(height),
        ImageSize::Pair([height, width]) => Err(ConfigError::new(
            field,
            format!("only square sizes are supported, got [{height}, {width}]"),
        )),
    }
}

impl VisionConfig {
    /// Checks the values and derives the settings the model is built from.
    pub fn resolve(&self) -> Result<VisionSettings, ConfigError> {
        let image_size = square(self.image_size, "image_size")?;
        let patch_size = square(self.patch_size, "patch_size")?;
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("image_size", image_size),
            ("patch_size", patch_size),
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
        if patch_size > image_size {
            return Err(ConfigError::new(
                "patch_size",
                format!("patch_size {patch_size} is larger than image_size {image_size}"),
            ));
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return Err(ConfigError::new(
                "layer_norm_eps",
                format!("must be positive, got {}", self.layer_norm_eps),
            ));
        }
        Ok(VisionSettings {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            image_size,
            patch_size,
            activation: Activation::from_hf_name(&self.hidden_act, "hidden_act")?,
            layer_norm_eps: self.layer_norm_eps,
            qkv_bias: self.qkv_bias,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_vit_g() {
        let config: VisionConfig = serde_json::from_str("{}").unwrap();
        let settings = config.resolve().unwrap();
        assert_eq!(settings.hidden_size, 1408);
        assert_eq!(settings.num_layers, 39);
        assert_eq!(settings.num_positions(), 257);
        assert_eq!(settings.activation, Activation::GeluErf);
    }

    #[test]
    fn size_pairs_must_be_square() {
        let config: VisionConfig = serde_json::from_str(r#"{"image_size": [224, 160]}"#).unwrap();
        let error = config.resolve().unwrap_err();
        assert_eq!(error.field, "image_size");
        let config: VisionConfig = serde_json::from_str(r#"{"image_size": [364, 364]}"#).unwrap();
        assert_eq!(config.resolve().unwrap().image_size, 364);
    }

    #[test]
    fn heads_must_divide_width() {
        let config: VisionConfig =
            serde_json::from_str(r#"{"hidden_size": 30, "num_attention_heads": 4}"#).unwrap();
        assert_eq!(config.resolve().unwrap_err().field, "num_attention_heads");
    }
}
