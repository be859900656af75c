//! Error types for decoding, preprocessing and configuration.

use std::io;
use std::path::PathBuf;

/// An error from decoding or preprocessing an image.
///
/// `input` fields name the image: the file path for [`load_image`](crate::load_image), or
/// the label given to [`decode_image`](crate::decode_image) (`"<memory>"` by default).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// The image file does not exist.
    #[error("image file not found: {}", path.display())]
    NotFound {
        /// The path that was opened.
        path: PathBuf,
    },

    /// The image file exists but could not be read (permissions, a directory, an I/O error).
    #[error("failed to read image file {}: {source}", path.display())]
    Read {
        /// The path that was opened.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },

    /// The input has no bytes at all.
    #[error("{input}: the image is empty (0 bytes)")]
    Empty {
        /// The path or label of the input.
        input: String,
    },

    /// The bytes do not start with the signature of a supported format.
    #[error(
        "{input}: not a supported image (first bytes {magic}); expected JPEG, PNG, WebP, GIF, BMP or TIFF"
    )]
    UnknownFormat {
        /// The path or label of the input.
        input: String,
        /// The first bytes of the input, in hex.
        magic: String,
    },

    /// The data is truncated or corrupt, so the decoder failed.
    #[error("{input}: invalid {format} data: {reason}")]
    Corrupt {
        /// The path or label of the input.
        input: String,
        /// The detected format.
        format: &'static str,
        /// The decoder's message.
        reason: String,
    },

    /// The image is valid but uses a feature this crate does not decode.
    #[error("{input}: unsupported {format} image: {reason}")]
    Unsupported {
        /// The path or label of the input.
        input: String,
        /// The detected format.
        format: &'static str,
        /// The missing feature.
        reason: String,
    },

    /// The input is in an image format this crate does not decode.
    #[error(
        "{input}: {format} images are not supported; convert the image to JPEG, PNG, WebP, GIF, \
         BMP or TIFF"
    )]
    UnsupportedFormat {
        /// The path or label of the input.
        input: String,
        /// The format the content was recognised as, such as `PNM`.
        format: String,
    },

    /// The header declares more pixels than [`LoadOptions::max_pixels`](crate::LoadOptions::max_pixels).
    #[error(
        "{input}: the image is {width}x{height} = {} pixels, more than the limit of {limit} pixels; \
         if the file is trusted, raise the limit (--max-pixels on the command line, \
         LoadOptions::max_pixels in the library)",
        u128::from(*width) * u128::from(*height)
    )]
    TooManyPixels {
        /// The path or label of the input.
        input: String,
        /// Width declared by the header.
        width: u64,
        /// Height declared by the header.
        height: u64,
        /// The limit in force.
        limit: u64,
    },

    /// A pixel buffer does not match the dimensions given with it.
    #[error("invalid RGB image: {width}x{height} needs {expected} bytes, got {actual}")]
    BufferSize {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// `width * height * 3`.
        expected: u64,
        /// Length of the buffer.
        actual: usize,
    },

    /// A width or height of zero (for an image or a resize target).
    #[error("invalid {what} size {width}x{height}: width and height must be at least 1")]
    ZeroSize {
        /// The thing being sized (an image or a resize target).
        what: &'static str,
        /// Width given.
        width: u32,
        /// Height given.
        height: u32,
    },

    /// Items of a batch have different shapes, so they cannot be stacked.
    #[error(
        "cannot stack pixel values: item 0 has shape {first:?} but item {index} has shape {other:?}"
    )]
    ShapeMismatch {
        /// Shape of the first item, `[3, height, width]`.
        first: [usize; 3],
        /// Index of the first item whose shape differs.
        index: usize,
        /// Its shape.
        other: [usize; 3],
    },

    /// A batch with no items.
    #[error("cannot stack an empty batch of pixel values")]
    EmptyBatch,

    /// The preprocessing settings are invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// An error from loading or validating an [`ImageProcessorConfig`](crate::ImageProcessorConfig).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("failed to read image processor config {}: {source}", path.display())]
    Read {
        /// The path that was opened.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },

    /// The file is not valid JSON.
    #[error("{source_name}: invalid JSON: {source}")]
    Json {
        /// The file path or label.
        source_name: String,
        /// The parser error, with line and column.
        source: serde_json::Error,
    },

    /// A field has the wrong type or an unknown value.
    #[error("{source_name}: invalid field `{field}`: {message}")]
    Field {
        /// The file path or label.
        source_name: String,
        /// The dotted path of the field, such as `image_processor.size.height`.
        field: String,
        /// The deserializer's message: the expected and the found type or value.
        message: String,
    },

    /// A field parsed, but its value cannot be used.
    #[error("{source_name}: invalid value {value} for `{field}`: expected {expected}")]
    Invalid {
        /// The file path or label.
        source_name: String,
        /// The field name.
        field: &'static str,
        /// The value found.
        value: String,
        /// A description of a valid value.
        expected: &'static str,
    },
}
