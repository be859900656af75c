//! The BLIP-2 image encoder: an EVA ViT (ViT-g/14 in the published checkpoints).
//!
//! Pixels `[batch, 3, height, width]` go in; a sequence `[batch, 1 + patches, width]`
//! comes out (the class token first), after the final layer norm, which is what the
//! Q-Former cross-attends to. Any backbone that produces such a sequence can stand in
//! for it through the [`VisionEncoder`] trait.
//!
//! ```no_run
//! use blip2_vision::{EvaVisionModel, VisionConfig, VisionEncoder};
//! # fn run(vb: blip2_nn::Weights, pixels: &candle_core::Tensor) -> candle_core::Result<()> {
//! let config: VisionConfig = serde_json::from_str(r#"{"hidden_size": 1408}"#).unwrap();
//! let model = EvaVisionModel::load(&config.resolve().unwrap(), vb.pp("vision_model"))?;
//! let features = model.encode(pixels)?; // [batch, 257, 1408] for 224-pixel images
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod config;
mod interpolate;
mod model;

pub use config::{ImageSize, VisionConfig, VisionSettings};
pub use interpolate::resize_position_grid;
pub use model::EvaVisionModel;

use candle_core::{Result, Tensor};

/// An image backbone: turns normalised pixels into a sequence of features.
///
/// The Q-Former only needs `[batch, tokens, hidden_size]`; the token count may differ
/// from one backbone to another.
pub trait VisionEncoder: Send + Sync {
    /// Encodes `pixel_values` `[batch, 3, height, width]` into `[batch, tokens, hidden_size]`.
    fn encode(&self, pixel_values: &Tensor) -> Result<Tensor>;

    /// Width of each output feature; the Q-Former's cross-attention input size.
    fn hidden_size(&self) -> usize;

    /// Quantizes the fully connected layers' weights to 8 bits with one scale per output
    /// row; their inputs are then quantized per token as they run. Faster on CPUs with
    /// AVX-512 VNNI, at some cost in accuracy. Returns how many layers were quantized.
    /// Backbones that do not support it keep their weights and return 0.
    fn quantize_per_row(&mut self) -> Result<usize> {
        Ok(0)
    }

    /// Sets whether to drop each layer's weights from memory as soon as the layer has run,
    /// for weights read in place from a mapped checkpoint. The next image reads them back
    /// from the file cache. This keeps the encoder from adding its size to peak memory
    /// while the language model stays resident. Backbones without support ignore it.
    fn set_release_layers_after_use(&mut self, _release: bool) {}
}
