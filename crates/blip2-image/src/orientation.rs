//! EXIF orientation (tag 0x0112) and the transposes that undo it.

use crate::rgb::RgbImage;

/// The transform (from EXIF tag 0x0112) that turns the stored pixels into the upright photo.
///
/// The transforms are those of Pillow's `ImageOps.exif_transpose`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Orientation {
    /// 1: already upright.
    #[default]
    Normal,
    /// 2: mirror left to right.
    FlipHorizontal,
    /// 3: rotate by 180 degrees.
    Rotate180,
    /// 4: mirror top to bottom.
    FlipVertical,
    /// 5: swap rows and columns (Pillow's `TRANSPOSE`).
    Transpose,
    /// 6: rotate 90 degrees clockwise (Pillow's `ROTATE_270`).
    Rotate90Clockwise,
    /// 7: swap rows and columns across the other diagonal (Pillow's `TRANSVERSE`).
    Transverse,
    /// 8: rotate 90 degrees counter-clockwise (Pillow's `ROTATE_90`).
    Rotate90CounterClockwise,
}

impl Orientation {
    /// Returns the orientation for an EXIF value 1..=8, or `None` for any other value.
    pub fn from_exif(value: u16) -> Option<Self> {
        Some(match value {
            1 => Orientation::Normal,
            2 => Orientation::FlipHorizontal,
            3 => Orientation::Rotate180,
            4 => Orientation::FlipVertical,
            5 => Orientation::Transpose,
            6 => Orientation::Rotate90Clockwise,
            7 => Orientation::Transverse,
            8 => Orientation::Rotate90CounterClockwise,
            _ => return None,
        })
    }

    /// Returns the orientation read by the `image` crate's EXIF parser.
    pub(crate) fn from_image_crate(orientation: image::metadata::Orientation) -> Self {
        Orientation::from_exif(u16::from(orientation.to_exif())).unwrap_or_default()
    }

    /// Reads the orientation from an EXIF block that starts with the TIFF header (`II*\0` or
    /// `MM\0*`); returns `Normal` when the tag is missing or invalid.
    pub(crate) fn from_exif_block(exif: &[u8]) -> Self {
        image::metadata::Orientation::from_exif_chunk(exif)
            .map(Self::from_image_crate)
            .unwrap_or_default()
    }

    /// Applies the transform to `image`, returning the upright image.
    pub fn apply(self, image: RgbImage) -> RgbImage {
        if self == Orientation::Normal {
            return image;
        }
        let (width, height) = (image.width() as usize, image.height() as usize);
        let (out_width, out_height) = if self.swaps_axes() {
            (height, width)
        } else {
            (width, height)
        };

        let input = image.as_raw();
        let mut pixels = Vec::with_capacity(input.len());
        for y in 0..out_height {
            for x in 0..out_width {
                let (source_x, source_y) = self.source_position(x, y, width, height);
                let start = (source_y * width + source_x) * 3;
                pixels.extend_from_slice(&input[start..start + 3]);
            }
        }
        RgbImage::from_parts(out_width as u32, out_height as u32, pixels)
    }

    fn swaps_axes(self) -> bool {
        matches!(
            self,
            Orientation::Transpose
                | Orientation::Rotate90Clockwise
                | Orientation::Transverse
                | Orientation::Rotate90CounterClockwise
        )
    }

    /// Returns the position of the stored pixel shown at column `x`, row `y` of the upright
    /// image, for a stored image of `width` x `height`.
    fn source_position(self, x: usize, y: usize, width: usize, height: usize) -> (usize, usize) {
        match self {
            Orientation::Normal => (x, y),
            Orientation::FlipHorizontal => (width - 1 - x, y),
            Orientation::Rotate180 => (width - 1 - x, height - 1 - y),
            Orientation::FlipVertical => (x, height - 1 - y),
            Orientation::Transpose => (y, x),
            Orientation::Rotate90Clockwise => (y, height - 1 - x),
            Orientation::Transverse => (width - 1 - y, height - 1 - x),
            Orientation::Rotate90CounterClockwise => (width - 1 - y, x),
        }
    }
}
