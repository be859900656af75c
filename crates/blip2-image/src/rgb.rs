//! The 8-bit RGB image type and the conversions into it that reproduce Pillow's arithmetic.
//!
//! transformers' `convert_to_rgb` (5.23) sends an image with an alpha band or a `transparency`
//! entry through `convert("RGBA")` and `Image.alpha_composite` over opaque white, and every
//! other image through `convert("RGB")`. The functions here compute what Pillow 13.0 computes
//! for each source layout; the fixture tests check them against Pillow.

use crate::error::ImageError;

/// An 8-bit RGB image, rows top to bottom, pixels interleaved `R, G, B`.
#[derive(Clone, PartialEq, Eq)]
pub struct RgbImage {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
}

impl RgbImage {
    /// Wraps `pixels` (`width * height * 3` bytes, row-major, interleaved RGB).
    pub fn from_raw(width: u32, height: u32, pixels: Vec<u8>) -> Result<Self, ImageError> {
        if width == 0 || height == 0 {
            return Err(ImageError::ZeroSize {
                what: "image",
                width,
                height,
            });
        }
        let expected = u64::from(width) * u64::from(height) * 3;
        if pixels.len() as u64 != expected {
            return Err(ImageError::BufferSize {
                width,
                height,
                expected,
                actual: pixels.len(),
            });
        }
        Ok(RgbImage {
            width,
            height,
            pixels,
        })
    }

    /// Builds an image whose size is known to match the buffer.
    pub(crate) fn from_parts(width: u32, height: u32, pixels: Vec<u8>) -> Self {
        debug_assert_eq!(
            pixels.len() as u64,
            u64::from(width) * u64::from(height) * 3
        );
        RgbImage {
            width,
            height,
            pixels,
        }
    }

    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// Returns the pixel bytes, `[height, width, 3]` in row-major order.
    pub fn as_raw(&self) -> &[u8] {
        &self.pixels
    }

    /// Returns the pixel bytes, `[height, width, 3]` in row-major order.
    pub fn into_raw(self) -> Vec<u8> {
        self.pixels
    }

    /// Returns the `[r, g, b]` value at column `x`, row `y`, or `None` outside the image.
    pub fn pixel(&self, x: u32, y: u32) -> Option<[u8; 3]> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let start = (y as usize * self.width as usize + x as usize) * 3;
        Some([
            self.pixels[start],
            self.pixels[start + 1],
            self.pixels[start + 2],
        ])
    }
}

impl std::fmt::Debug for RgbImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RgbImage")
            .field("width", &self.width)
            .field("height", &self.height)
            .finish_non_exhaustive()
    }
}

/// Pillow's `L` to `RGB`: the gray level in all three channels.
pub(crate) fn gray_to_rgb(gray: &[u8]) -> Vec<u8> {
    gray.iter().flat_map(|&l| [l, l, l]).collect()
}

/// Pillow's `I;16` to `RGB`: values above 255 saturate to 255 (`I16_RGB` in `Convert.c`).
pub(crate) fn gray16_to_rgb(gray: &[u16]) -> Vec<u8> {
    gray.iter()
        .flat_map(|&v| {
            let l = v.min(255) as u8;
            [l, l, l]
        })
        .collect()
}

/// Pillow's `CMYK` to `RGB` (`cmyk2rgb` in `Convert.c`): each channel is
/// `(255 - k) - round(c * (255 - k) / 255)`, with the division done as Pillow's `MULDIV255`.
pub(crate) fn cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(cmyk.len() / 4 * 3);
    for pixel in cmyk.chunks_exact(4) {
        let not_k = 255 - u32::from(pixel[3]);
        for &ink in &pixel[..3] {
            let scaled = mul_div_255(u32::from(ink), not_k);
            rgb.push((not_k - scaled) as u8);
        }
    }
    rgb
}

/// `a * b / 255` rounded to nearest, as Pillow's `MULDIV255` macro computes it.
fn mul_div_255(a: u32, b: u32) -> u32 {
    let t = a * b + 128;
    ((t >> 8) + t) >> 8
}

/// Fixed-point fraction bits in Pillow's `ImagingAlphaComposite`.
const COMPOSITE_PRECISION_BITS: u32 = 7;

/// Composites straight-alpha RGBA pixels over opaque white and drops the alpha band, as
/// `Image.alpha_composite(white, image).convert("RGB")` does in Pillow.
///
/// This is the scalar integer path of `ImagingAlphaComposite` with an opaque white
/// destination: a fully transparent pixel becomes white, an opaque one keeps its color.
pub(crate) fn composite_over_white(rgba: &[u8]) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(rgba.len() / 4 * 3);
    for pixel in rgba.chunks_exact(4) {
        let alpha = u32::from(pixel[3]);
        if alpha == 0 {
            rgb.extend_from_slice(&[255, 255, 255]);
            continue;
        }

        // Destination alpha is 255, so `blend = 255 * (255 - alpha)`.
        let blend = 255 * (255 - alpha);
        let out_alpha_255 = alpha * 255 + blend;
        let source_weight = alpha * 255 * 255 * (1 << COMPOSITE_PRECISION_BITS) / out_alpha_255;
        let white_weight = 255 * (1 << COMPOSITE_PRECISION_BITS) - source_weight;
        for &channel in &pixel[..3] {
            let sum = u32::from(channel) * source_weight
                + 255 * white_weight
                + (0x80 << COMPOSITE_PRECISION_BITS);
            let divided = ((sum >> 8) + sum) >> 8;
            rgb.push((divided >> COMPOSITE_PRECISION_BITS) as u8);
        }
    }
    rgb
}

/// Expands gray + alpha pixels to RGBA, as Pillow's `LA` to `RGBA` conversion does.
pub(crate) fn gray_alpha_to_rgba(gray_alpha: &[u8]) -> Vec<u8> {
    gray_alpha
        .chunks_exact(2)
        .flat_map(|p| [p[0], p[0], p[0], p[1]])
        .collect()
}

/// Keeps the most significant byte of each 16-bit sample, as Pillow does when it opens a
/// 16-bit RGB, RGBA or LA PNG (raw modes `RGB;16B`, `RGBA;16B`, `LA;16B`).
pub(crate) fn high_bytes(samples: &[u16]) -> Vec<u8> {
    samples.iter().map(|&v| (v >> 8) as u8).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_keeps_opaque_and_whitens_transparent() {
        for value in 0..=255u8 {
            let opaque = composite_over_white(&[value, value, value, 255]);
            assert_eq!(opaque, vec![value; 3], "opaque pixel {value} changed");
        }
        assert_eq!(composite_over_white(&[7, 8, 9, 0]), vec![255; 3]);
    }

    #[test]
    fn rgb_image_rejects_wrong_buffer() {
        let error = RgbImage::from_raw(2, 2, vec![0; 11]).unwrap_err();
        assert!(
            matches!(
                error,
                ImageError::BufferSize {
                    expected: 12,
                    actual: 11,
                    ..
                }
            ),
            "{error}"
        );
        let error = RgbImage::from_raw(0, 2, vec![]).unwrap_err();
        assert!(matches!(error, ImageError::ZeroSize { .. }), "{error}");
    }
}
