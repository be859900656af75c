//! BLIP-2 end to end: load a published checkpoint, caption images, answer prompts.
//!
//! ```no_run
//! use blip2_pipeline::{Blip2, LoadOptions};
//! use blip2_image::{load_image, LoadOptions as ImageOptions};
//!
//! let blip2 = Blip2::from_pretrained("Salesforce/blip2-opt-2.7b", &LoadOptions::default())?;
//! let image = load_image("photo.jpg", &ImageOptions::default())?;
//! let caption = blip2.caption(&image, None, &blip2.default_generation_options())?;
//! println!("{}", caption.text);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Checkpoints are read from the layout transformers publishes: `config.json`,
//! `model.safetensors` or shards with `model.safetensors.index.json`,
//! `tokenizer.json`, `preprocessor_config.json` or `processor_config.json`, and
//! optionally `generation_config.json` and `tokenizer_config.json`. Only safetensors
//! weights are loaded, never pickles.

#![warn(missing_docs)]

mod chat;
pub mod checkpoint;
mod config;
mod error;
pub mod hub;
pub mod index;
mod indexing;
mod model;
mod pipeline;
mod retrieval;
mod tokenizer;

pub use blip2_lm::generation::{EarlyStopping, GenerationConfig, GenerationOptions};
pub use blip2_lm::{is_quantized_file, write_safetensors};
pub use chat::{Answer, Conversation, DEFAULT_QUESTION_TEMPLATE, QuestionTemplate, TextStreamer};
pub use checkpoint::CheckpointFiles;
pub use config::Blip2Config;
pub use error::{Error, Result};
pub use indexing::{
    IndexEvent, IndexReport, PHOTO_EXTENSIONS, SearchOutcome, SearchResult, find_photos,
};
pub use model::{Blip2Model, ImageFeatures, QuantizedStages, RetrievalHeads};
pub use pipeline::{
    Blip2, Caption, DEFAULT_MAX_NEW_TOKENS, LoadOptions, parse_dtype, parse_quantization,
};
pub use retrieval::{MatchScore, TextBatch, contrastive_similarity, normalize};
pub use tokenizer::TextTokenizer;

#[cfg(test)]
mod thread_safety {
    /// Servers share one loaded model between threads.
    #[test]
    fn blip2_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<crate::Blip2>();
        assert_send_sync::<crate::ImageFeatures>();
    }
}
