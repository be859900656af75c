//! Decoding files and byte buffers to upright 8-bit RGB, as Pillow plus transformers'
//! `convert_to_rgb` would see them.
//!
//! JPEG goes through libjpeg-turbo's decoder (see [`crate::jpeg`]); PNG, WebP, GIF, BMP and
//! TIFF through the `image` crate, whose pixel layouts are then converted with Pillow's
//! arithmetic (see [`crate::rgb`] and [`crate::png_key`]).

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};

use crate::error::ImageError;
use crate::jpeg::decode_jpeg;
use crate::orientation::Orientation;
use crate::png_key::{ColorKey, gray_with_key, read_color_key, rgb_with_key};
use crate::rgb::{
    RgbImage, composite_over_white, gray_alpha_to_rgba, gray_to_rgb, gray16_to_rgb, high_bytes,
};

/// Pillow's `Image.MAX_IMAGE_PIXELS` (1024 * 1024 * 1024 / 4 / 3). Pillow warns above it and
/// raises `DecompressionBombError` above twice it.
pub const PIL_MAX_IMAGE_PIXELS: u64 = 89_478_485;

/// Label used in errors for [`decode_image`] input.
pub const MEMORY_INPUT: &str = "<memory>";

/// Options for [`load_image`] and [`decode_image`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Whether to rotate or mirror the image as its EXIF orientation tag specifies, so the
    /// result is what a photo viewer shows. Default `true`.
    ///
    /// This departs from the reference on purpose: transformers' processor, given a PIL image,
    /// ignores EXIF, so a phone photo stored sideways reaches the model sideways. Set `false`
    /// to match the reference exactly on such files.
    pub apply_exif_orientation: bool,
    /// Largest accepted `width * height`, checked on the header before the pixels are
    /// decoded. Default `2 * 89_478_485`, the size at which Pillow raises
    /// `DecompressionBombError`.
    pub max_pixels: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            apply_exif_orientation: true,
            max_pixels: 2 * PIL_MAX_IMAGE_PIXELS,
        }
    }
}

/// Reads and decodes an image file to upright 8-bit RGB.
///
/// The format comes from the file's content, not its extension.
pub fn load_image(path: impl AsRef<Path>, options: &LoadOptions) -> Result<RgbImage, ImageError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ImageError::NotFound {
            path: path.to_path_buf(),
        },
        _ => ImageError::Read {
            path: path.to_path_buf(),
            source,
        },
    })?;
    let _span = tracing::debug_span!("load_image", path = %path.display()).entered();
    decode_image_named(&bytes, &path.display().to_string(), options)
}

/// Decodes an encoded image held in memory to upright 8-bit RGB; errors name it `<memory>`.
pub fn decode_image(bytes: &[u8], options: &LoadOptions) -> Result<RgbImage, ImageError> {
    decode_image_named(bytes, MEMORY_INPUT, options)
}

/// Decodes an encoded image held in memory, naming it `input` in errors.
pub fn decode_image_named(
    bytes: &[u8],
    input: &str,
    options: &LoadOptions,
) -> Result<RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty {
            input: input.to_string(),
        });
    }
    let format = image::guess_format(bytes).map_err(|_| ImageError::UnknownFormat {
        input: input.to_string(),
        magic: bytes
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" "),
    })?;
    let image = match format {
        ImageFormat::Jpeg => decode_jpeg(bytes, input, options)?,
        ImageFormat::Png
        | ImageFormat::WebP
        | ImageFormat::Gif
        | ImageFormat::Bmp
        | ImageFormat::Tiff => decode_with_image_crate(bytes, format, input, options)?,
        other => {
            return Err(ImageError::UnsupportedFormat {
                input: input.to_string(),
                // The image crate's name for the format, such as `Pnm`, in capitals as acronyms are written.
                format: format!("{other:?}").to_uppercase(),
            });
        }
    };
    tracing::debug!(
        input,
        width = image.width(),
        height = image.height(),
        "decoded"
    );
    Ok(image)
}

/// Rejects a header whose pixel count exceeds the limit.
pub(crate) fn check_pixel_count(
    input: &str,
    width: u64,
    height: u64,
    options: &LoadOptions,
) -> Result<(), ImageError> {
    if width.saturating_mul(height) > options.max_pixels {
        return Err(ImageError::TooManyPixels {
            input: input.to_string(),
            width,
            height,
            limit: options.max_pixels,
        });
    }
    Ok(())
}

fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Png => "PNG",
        ImageFormat::WebP => "WebP",
        ImageFormat::Gif => "GIF",
        ImageFormat::Bmp => "BMP",
        ImageFormat::Tiff => "TIFF",
        ImageFormat::Jpeg => "JPEG",
        _ => "image",
    }
}

fn decode_with_image_crate(
    bytes: &[u8],
    format: ImageFormat,
    input: &str,
    options: &LoadOptions,
) -> Result<RgbImage, ImageError> {
    let name = format_name(format);
    let decode_error = |error: image::ImageError| match error {
        image::ImageError::Unsupported(reason) => ImageError::Unsupported {
            input: input.to_string(),
            format: name,
            reason: reason.to_string(),
        },
        other => ImageError::Corrupt {
            input: input.to_string(),
            format: name,
            reason: other.to_string(),
        },
    };

    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    // The pixel count is checked below against `max_pixels`; the allocation limit only has to
    // leave room for that many 16-bit RGBA pixels.
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(options.max_pixels.saturating_mul(8).max(512 << 20));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(decode_error)?;

    let (width, height) = decoder.dimensions();
    check_pixel_count(input, width.into(), height.into(), options)?;
    let orientation = if options.apply_exif_orientation {
        match decoder.orientation() {
            Ok(orientation) => Orientation::from_image_crate(orientation),
            Err(error) => {
                tracing::debug!(input, %error, "unreadable EXIF orientation ignored");
                Orientation::Normal
            }
        }
    } else {
        Orientation::Normal
    };

    let decoded = DynamicImage::from_decoder(decoder).map_err(decode_error)?;
    // The buffer's own size, which is the header's for every decoder used here.
    let (width, height) = (decoded.width(), decoded.height());
    let color_key = if format == ImageFormat::Png {
        read_color_key(bytes)
    } else {
        None
    };
    let pixels = pillow_rgb(decoded, color_key).map_err(|layout| ImageError::Unsupported {
        input: input.to_string(),
        format: name,
        reason: format!("pixel layout {layout:?} has no Pillow RGB equivalent here"),
    })?;

    let image = RgbImage::from_parts(width, height, pixels);
    Ok(orientation.apply(image))
}

/// Converts decoded pixels to RGB as Pillow converts the mode it opens the same file in,
/// compositing over white where transformers' `convert_to_rgb` would. Returns the layout as the
/// error when Pillow has no RGB conversion this crate reproduces for it.
fn pillow_rgb(
    decoded: DynamicImage,
    color_key: Option<ColorKey>,
) -> Result<Vec<u8>, image::ColorType> {
    let pixels = match (decoded, color_key) {
        // Gray or RGB PNGs with a tRNS color key: recompute the alpha with Pillow's rule.
        (DynamicImage::ImageLumaA8(gray_alpha), Some(ColorKey::Gray(key))) => composite_over_white(
            &gray_with_key(gray_alpha.as_raw().iter().step_by(2).copied(), key),
        ),
        (DynamicImage::ImageLumaA16(gray_alpha), Some(ColorKey::Gray(key))) => {
            let saturated = gray_alpha
                .as_raw()
                .iter()
                .step_by(2)
                .map(|&v| v.min(255) as u8);
            composite_over_white(&gray_with_key(saturated, key))
        }
        (DynamicImage::ImageRgba8(rgba), Some(ColorKey::Rgb(key))) => composite_over_white(
            &rgb_with_key(&DynamicImage::ImageRgba8(rgba).to_rgb8().into_raw(), key),
        ),
        (DynamicImage::ImageRgba16(rgba), Some(ColorKey::Rgb(key))) => {
            let rgb: Vec<u16> = rgba
                .as_raw()
                .chunks_exact(4)
                .flat_map(|p| [p[0], p[1], p[2]])
                .collect();
            composite_over_white(&rgb_with_key(&high_bytes(&rgb), key))
        }

        (DynamicImage::ImageLuma8(gray), _) => gray_to_rgb(gray.as_raw()),
        (DynamicImage::ImageLumaA8(gray_alpha), _) => {
            composite_over_white(&gray_alpha_to_rgba(gray_alpha.as_raw()))
        }
        (DynamicImage::ImageRgb8(rgb), _) => rgb.into_raw(),
        (DynamicImage::ImageRgba8(rgba), _) => composite_over_white(rgba.as_raw()),
        (DynamicImage::ImageLuma16(gray), _) => gray16_to_rgb(gray.as_raw()),
        (DynamicImage::ImageLumaA16(gray_alpha), _) => {
            composite_over_white(&gray_alpha_to_rgba(&high_bytes(gray_alpha.as_raw())))
        }
        (DynamicImage::ImageRgb16(rgb), _) => high_bytes(rgb.as_raw()),
        (DynamicImage::ImageRgba16(rgba), _) => composite_over_white(&high_bytes(rgba.as_raw())),
        (other, _) => return Err(other.color()),
    };
    Ok(pixels)
}
