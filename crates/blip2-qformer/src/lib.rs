//! The BLIP-2 Querying Transformer (Q-Former).
//!
//! A BERT-sized encoder whose input starts with a fixed set of learned query
//! embeddings. In the layers that have cross-attention the queries read the image
//! features; text tokens, when present, share the self-attention with the queries but
//! never see the image directly. The query outputs are what the language model
//! receives (after a linear projection) and what image-text retrieval compares.
//!
//! ```no_run
//! use blip2_qformer::{QFormer, QFormerConfig};
//! # fn run(vb: blip2_nn::Weights, query_tokens: &candle_core::Tensor, image: &candle_core::Tensor) -> candle_core::Result<()> {
//! let config: QFormerConfig = serde_json::from_str("{}").unwrap();
//! let qformer = QFormer::load(&config.resolve(1408).unwrap(), vb.pp("qformer"))?;
//! let queries = qformer.query_features(query_tokens, image)?; // [batch, 32, 768]
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod config;
mod model;
mod text;

pub use config::{QFormerConfig, QFormerSettings};
pub use model::QFormer;
pub use text::TextEmbeddings;
