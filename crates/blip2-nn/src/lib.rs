//! Building blocks shared by the BLIP-2 stage crates.
//!
//! The vision encoder, the Q-Former and the language models all need the same few
//! pieces: activations named as Hugging Face configs name them, a layer norm that
//! matches PyTorch's numerics, scaled dot-product attention with an additive mask,
//! and an error type for invalid config fields. They live here once.

#![warn(missing_docs)]

mod activation;
mod attention;
mod config_error;
pub mod convert;
pub mod elementwise;
mod gelu;
pub mod kernels;
mod layer_norm;
mod linear;
mod packed_attention;
mod single_query;
mod weights;

pub use activation::Activation;
pub use attention::{additive_mask_value, scaled_dot_product_attention, softmax_f32};
pub use config_error::ConfigError;
pub use layer_norm::LayerNorm;
pub use linear::{GEMV_MAX_ROWS, Linear, linear, linear_no_bias, linear_with_bias};
pub use weights::{MappedMatrix, MappedTensors, TokenEmbedding, Weights};
