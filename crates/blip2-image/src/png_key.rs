//! Pillow's handling of a PNG tRNS color key (gray and RGB PNGs).
//!
//! The `image` crate turns a tRNS color key into an alpha channel by comparing each raw sample
//! with the key. Pillow 13 instead keeps the key as `info["transparency"]` and, in
//! `convert("RGBA")`, compares its 8-bit pixels with the key's low byte. The 8-bit pixel is the
//! sample scaled to 8 bits for gray depths up to 8, the sample saturated at 255 for 16-bit gray
//! (`I;16`), and the high byte for 16-bit RGB. The two rules pick different pixels whenever a
//! 16-bit or low-bit-depth image has a key, so this module reads the key itself and recomputes
//! the alpha channel with Pillow's rule.

/// A tRNS color key read from a PNG header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ColorKey {
    /// The gray sample value that is transparent (color type 0).
    Gray(u16),
    /// The RGB sample values that are transparent (color type 2).
    Rgb([u16; 3]),
}

/// Reads the tRNS color key of a gray or RGB PNG; returns `None` for other color types, for a
/// PNG without tRNS, and for a header too damaged to walk (the decoder reports that).
pub(crate) fn read_color_key(bytes: &[u8]) -> Option<ColorKey> {
    const SIGNATURE_LEN: usize = 8;
    let color_type = *bytes.get(SIGNATURE_LEN + 8 + 9)?;
    let mut offset = SIGNATURE_LEN;
    loop {
        let length = u32::from_be_bytes(bytes.get(offset..offset + 4)?.try_into().ok()?) as usize;
        let kind = bytes.get(offset + 4..offset + 8)?;
        let data = bytes.get(offset + 8..offset.checked_add(8)?.checked_add(length)?)?;
        match kind {
            b"tRNS" => {
                let sample = |index: usize| -> Option<u16> {
                    Some(u16::from_be_bytes(
                        data.get(index * 2..index * 2 + 2)?.try_into().ok()?,
                    ))
                };
                return match color_type {
                    0 => Some(ColorKey::Gray(sample(0)?)),
                    2 => Some(ColorKey::Rgb([sample(0)?, sample(1)?, sample(2)?])),
                    _ => None,
                };
            }
            // tRNS must come before the image data.
            b"IDAT" | b"IEND" => return None,
            _ => offset = offset.checked_add(12)?.checked_add(length)?,
        }
    }
}

/// Builds RGBA pixels from gray samples already scaled or saturated to Pillow's 8-bit values,
/// transparent where the value equals the key's low byte.
pub(crate) fn gray_with_key(gray: impl Iterator<Item = u8>, key: u16) -> Vec<u8> {
    let transparent = key as u8;
    gray.flat_map(|l| [l, l, l, if l == transparent { 0 } else { 255 }])
        .collect()
}

/// Builds RGBA pixels from Pillow's 8-bit RGB values, transparent where all three channels
/// equal the key's low bytes.
pub(crate) fn rgb_with_key(rgb: &[u8], key: [u16; 3]) -> Vec<u8> {
    let transparent = key.map(|sample| sample as u8);
    rgb.chunks_exact(3)
        .flat_map(|p| {
            [
                p[0],
                p[1],
                p[2],
                if p == transparent.as_slice() { 0 } else { 255 },
            ]
        })
        .collect()
}
