//! JPEG decoding through libjpeg-turbo's decoder (the `mozjpeg` crate), as Pillow does it.
//!
//! Pillow 13.0 decodes JPEG with libjpeg-turbo: islow integer IDCT, fancy (triangle)
//! chroma upsampling, and an output color space chosen by the component count: 1 gives `L`,
//! 3 gives `RGB`, 4 gives `CMYK`, read as inverted (Adobe) CMYK. mozjpeg is a fork of
//! libjpeg-turbo that keeps its decoder, so its pixels match Pillow's exactly on every fixture
//! and on rocket.jpg, where zune-jpeg (the `image` crate's decoder) differs by up to 4 levels
//! per channel.
//!
//! libjpeg reports fatal errors through a callback that must not return. The `mozjpeg` crate
//! unwinds out of it with `resume_unwind`, so [`decode_jpeg`] catches that unwind and turns it
//! into [`ImageError::Corrupt`].
//!
//! NOTE: catching needs `panic = "unwind"` (the default). Built with `panic = "abort"`, a
//! corrupt JPEG aborts the process instead of returning an error.

use std::io::{self, BufRead, Read};
use std::panic::{AssertUnwindSafe, catch_unwind};

use mozjpeg::decompress::DecompressBuilder;
use mozjpeg::{ColorSpace, Marker};

use crate::decode::{LoadOptions, check_pixel_count};
use crate::error::ImageError;
use crate::orientation::Orientation;
use crate::rgb::{RgbImage, cmyk_to_rgb, gray_to_rgb};

const FORMAT: &str = "JPEG";

/// Decodes a JPEG to upright RGB.
pub(crate) fn decode_jpeg(
    bytes: &[u8],
    input: &str,
    options: &LoadOptions,
) -> Result<RgbImage, ImageError> {
    let corrupt = |reason: String| ImageError::Corrupt {
        input: input.to_string(),
        format: FORMAT,
        reason,
    };
    match catch_unwind(AssertUnwindSafe(|| decode_unchecked(bytes, input, options))) {
        Ok(result) => result,
        Err(payload) => {
            // The mozjpeg crate unwinds with a `String` containing libjpeg's message.
            let reason = match payload.downcast::<String>() {
                Ok(message) => *message,
                Err(payload) => match payload.downcast::<&str>() {
                    Ok(message) => (*message).to_string(),
                    Err(_) => "libjpeg reported a fatal error".to_string(),
                },
            };
            Err(corrupt(reason))
        }
    }
}

/// Decodes without catching: libjpeg errors unwind out of this function.
fn decode_unchecked(
    bytes: &[u8],
    input: &str,
    options: &LoadOptions,
) -> Result<RgbImage, ImageError> {
    let io_error = |error: io::Error| ImageError::Corrupt {
        input: input.to_string(),
        format: FORMAT,
        reason: error.to_string(),
    };

    let reader = EofTrackingReader {
        data: bytes,
        position: 0,
        read_past_end: false,
    };
    let decompress = DecompressBuilder::new()
        .with_markers(&[Marker::APP(1)])
        .from_reader(reader)
        .map_err(io_error)?;

    let (width, height) = decompress.size();
    check_pixel_count(input, width as u64, height as u64, options)?;
    let orientation = if options.apply_exif_orientation {
        exif_orientation(&decompress)
    } else {
        Orientation::Normal
    };

    let components = decompress.components().len();
    let started = match components {
        1 => decompress.grayscale(),
        3 => decompress.rgb(),
        4 => decompress.to_colorspace(ColorSpace::JCS_CMYK),
        other => {
            return Err(ImageError::Unsupported {
                input: input.to_string(),
                format: FORMAT,
                reason: format!(
                    "{other} color components; expected 1 (gray), 3 (color) or 4 (CMYK)"
                ),
            });
        }
    };
    let mut started = started.map_err(io_error)?;
    let samples: Vec<u8> = started.read_scanlines().map_err(io_error)?;
    let reader = started.finish_into_inner().map_err(io_error)?;

    // At the end of the data, the source manager feeds libjpeg a fake end-of-image marker and
    // libjpeg only warns, filling the missing rows with gray. Pillow raises "image file is
    // truncated" instead, so this does too.
    if reader.read_past_end {
        return Err(ImageError::Corrupt {
            input: input.to_string(),
            format: FORMAT,
            reason: "the data ends before the end-of-image marker (the file is truncated)"
                .to_string(),
        });
    }

    let pixels = match components {
        1 => gray_to_rgb(&samples),
        3 => samples,
        // Pillow reads 4-component JPEGs with raw mode `CMYK;I`, inverting every sample.
        _ => {
            let cmyk: Vec<u8> = samples.iter().map(|&v| 255 - v).collect();
            cmyk_to_rgb(&cmyk)
        }
    };
    let image = RgbImage::from_parts(width as u32, height as u32, pixels);
    Ok(orientation.apply(image))
}

/// Reads the orientation from the first APP1 segment that contains EXIF, the segment Pillow
/// stores as `info["exif"]`.
fn exif_orientation<R>(decompress: &mozjpeg::Decompress<R>) -> Orientation {
    const EXIF_PREFIX: &[u8] = b"Exif\0\0";
    decompress
        .markers()
        .find(|marker| marker.marker == Marker::APP(1) && marker.data.starts_with(EXIF_PREFIX))
        .map(|marker| Orientation::from_exif_block(&marker.data[EXIF_PREFIX.len()..]))
        .unwrap_or_default()
}

/// A reader over a byte slice that records whether the decoder asked for bytes past the end.
struct EofTrackingReader<'a> {
    data: &'a [u8],
    position: usize,
    read_past_end: bool,
}

impl Read for EofTrackingReader<'_> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let count = available.len().min(buffer.len());
        buffer[..count].copy_from_slice(&available[..count]);
        self.consume(count);
        Ok(count)
    }
}

impl BufRead for EofTrackingReader<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.position >= self.data.len() {
            self.read_past_end = true;
        }
        Ok(&self.data[self.position.min(self.data.len())..])
    }

    fn consume(&mut self, count: usize) {
        self.position = (self.position + count).min(self.data.len());
    }
}
