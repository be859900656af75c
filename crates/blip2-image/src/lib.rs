//! Image decoding and preprocessing for BLIP-2, reproducing the reference Python path bit for bit.
//!
//! The reference is Hugging Face transformers 5.23's `BlipImageProcessorPil`: Pillow 13.0
//! decodes the file, `convert_to_rgb` composites any transparency over white, `Image.resize`
//! resamples (bicubic by default), and numpy rescales by 1/255 and normalizes with the CLIP
//! mean and std. This crate does each step with the same arithmetic, so its `[3, H, W]` float32
//! output equals the reference's exactly on every fixture in `tests/fixtures/images`
//! (made by `scripts/fixture_images.py`).
//!
//! ```no_run
//! use blip2_image::{ImageProcessorConfig, LoadOptions, load_image, preprocess};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = ImageProcessorConfig::from_json_file("checkpoint/processor_config.json")?;
//! let image = load_image("images/chelsea.png", &LoadOptions::default())?;
//! let pixels = preprocess(&image, &config)?;
//! assert_eq!(pixels.shape, [3, 224, 224]); // from `size` in the config
//! # Ok(())
//! # }
//! ```
//!
//! # Formats
//!
//! JPEG (baseline, progressive, gray and Adobe CMYK) is decoded by libjpeg-turbo's decoder,
//! through the `mozjpeg` crate built from C with no assembler, because Pillow uses that decoder.
//! The `image` crate's zune-jpeg differs from it by up to 4 levels per channel on the fixtures.
//! The `image` crate decodes PNG (1 to 16 bits, every color type, tRNS), WebP (lossy,
//! lossless, alpha), GIF (first frame), BMP and TIFF. Their pixels are then
//! converted to RGB as Pillow converts the mode it opens each file in, including Pillow's
//! handling of PNG tRNS color keys.
//!
//! # Departure from the reference: EXIF orientation
//!
//! [`LoadOptions::apply_exif_orientation`] (on by default) rotates or mirrors photos as their
//! EXIF orientation tag specifies, as `ImageOps.exif_transpose` does, so the model receives the
//! photo as a viewer shows it. The reference processor ignores EXIF when given a PIL image, so
//! turn the option off to match it exactly on such files.
//!
//! # Untrusted input
//!
//! Every malformed input returns an [`ImageError`] naming the file. Headers that declare more
//! than [`LoadOptions::max_pixels`] pixels (default: Pillow's decompression-bomb threshold) are
//! rejected before the pixels are decoded. JPEG errors are caught as unwinds, so they need the
//! default `panic = "unwind"`.

#![warn(missing_docs)]

mod config;
mod decode;
mod error;
mod jpeg;
mod orientation;
mod png_key;
mod preprocess;
mod resize;
mod rgb;

pub use config::{ImageProcessorConfig, ImageSize, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Resample};
pub use decode::{
    LoadOptions, MEMORY_INPUT, PIL_MAX_IMAGE_PIXELS, decode_image, decode_image_named, load_image,
};
pub use error::{ConfigError, ImageError};
pub use orientation::Orientation;
pub use preprocess::{
    PixelBatch, PixelValues, load_and_preprocess_each, preprocess, preprocess_batch,
};
pub use resize::resize;
pub use rgb::RgbImage;
