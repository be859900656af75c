//! BLIP-2 in Rust: caption images, answer questions about them, on candle.
//!
//! This facade re-exports the stage crates so an application needs one dependency:
//!
//! - [`image`]: decoding and preprocessing identical to the reference PIL path;
//! - [`vision`]: the EVA ViT image encoder and the [`vision::VisionEncoder`] trait;
//! - [`qformer`]: the Q-Former;
//! - [`lm`]: language models behind [`lm::LanguageModel`] and the decoding strategies;
//! - [`pipeline`]: checkpoint loading and the high-level [`Blip2`] API.
//!
//! ```no_run
//! use blip2::{Blip2, LoadOptions};
//!
//! let blip2 = Blip2::from_pretrained("Salesforce/blip2-opt-2.7b", &LoadOptions::default())?;
//! let photo = blip2::image::load_image("photo.jpg", &Default::default())?;
//! let caption = blip2.caption(&photo, None, &blip2.default_generation_options())?;
//! println!("{}", caption.text);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

pub use blip2_image as image;
pub use blip2_lm as lm;
pub use blip2_pipeline as pipeline;
pub use blip2_qformer as qformer;
pub use blip2_vision as vision;

pub use blip2_pipeline::{Blip2, Caption, Error, GenerationOptions, LoadOptions, Result};
