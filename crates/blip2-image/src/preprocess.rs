//! Resize, rescale and normalize: the steps of transformers' PIL-backend `_preprocess`.

use std::path::Path;

use crate::config::ImageProcessorConfig;
use crate::decode::{LoadOptions, load_image};
use crate::error::ImageError;
use crate::resize::resize;
use crate::rgb::RgbImage;

/// Normalized pixel values of one image, channel-first.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelValues {
    /// The values, `[3, height, width]` in row-major order (R plane, then G, then B).
    pub data: Vec<f32>,
    /// `[3, height, width]`.
    pub shape: [usize; 3],
}

/// Pixel values of several images of the same size, stacked.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelBatch {
    /// The values, `[batch, 3, height, width]` in row-major order.
    pub data: Vec<f32>,
    /// `[batch, 3, height, width]`.
    pub shape: [usize; 4],
}

impl PixelBatch {
    /// Stacks items of equal shape along a new first axis.
    pub fn stack(items: &[PixelValues]) -> Result<Self, ImageError> {
        let first = items.first().ok_or(ImageError::EmptyBatch)?.shape;
        if let Some((index, item)) = items
            .iter()
            .enumerate()
            .find(|(_, item)| item.shape != first)
        {
            return Err(ImageError::ShapeMismatch {
                first,
                index,
                other: item.shape,
            });
        }
        let data = items
            .iter()
            .flat_map(|item| item.data.iter().copied())
            .collect();
        Ok(PixelBatch {
            data,
            shape: [items.len(), first[0], first[1], first[2]],
        })
    }
}

/// Runs the processor's steps on a decoded RGB image: resize (when `do_resize`), rescale
/// (when `do_rescale`), normalize (when `do_normalize`), channel-first output.
///
/// The arithmetic is numpy's in transformers 5.23: `rescale` multiplies in float64 and casts to
/// float32, then `normalize` computes `(x - mean) / std` in float32 with the mean and std cast
/// to float32. Without `do_rescale` the uint8 values are cast to float32 directly.
pub fn preprocess(
    image: &RgbImage,
    config: &ImageProcessorConfig,
) -> Result<PixelValues, ImageError> {
    config.validate()?;
    let _span = tracing::debug_span!("preprocess", width = image.width(), height = image.height())
        .entered();

    let resized;
    let image = match config.output_size() {
        Some((height, width)) if config.do_resize => {
            resized = resize(image, width, height, config.resample)?;
            &resized
        }
        _ => image,
    };

    let factor = config.rescale_factor;
    let rescale = |value: u8| -> f32 {
        if config.do_rescale {
            (f64::from(value) * factor) as f32
        } else {
            f32::from(value)
        }
    };

    let (width, height) = (image.width() as usize, image.height() as usize);
    let plane = width * height;
    let mut data = vec![0f32; 3 * plane];
    for channel in 0..3 {
        let mean = config.image_mean[channel] as f32;
        let std = config.image_std[channel] as f32;
        let output = &mut data[channel * plane..(channel + 1) * plane];
        for (out, pixel) in output.iter_mut().zip(image.as_raw().chunks_exact(3)) {
            let value = rescale(pixel[channel]);
            *out = if config.do_normalize {
                (value - mean) / std
            } else {
                value
            };
        }
    }
    Ok(PixelValues {
        data,
        shape: [3, height, width],
    })
}

/// Preprocesses several images and stacks them into one batch.
///
/// Fails if any image fails or if the outputs differ in size (possible only with
/// `do_resize = false`).
pub fn preprocess_batch(
    images: &[RgbImage],
    config: &ImageProcessorConfig,
) -> Result<PixelBatch, ImageError> {
    let items = images
        .iter()
        .map(|image| preprocess(image, config))
        .collect::<Result<Vec<_>, _>>()?;
    PixelBatch::stack(&items)
}

/// Loads and preprocesses each file on its own, returning one result per path in order, so a
/// missing or corrupt file does not stop the others.
pub fn load_and_preprocess_each<P: AsRef<Path>>(
    paths: &[P],
    options: &LoadOptions,
    config: &ImageProcessorConfig,
) -> Vec<Result<PixelValues, ImageError>> {
    paths
        .iter()
        .map(|path| {
            let result = load_image(path, options).and_then(|image| preprocess(&image, config));
            if let Err(error) = &result {
                tracing::debug!(path = %path.as_ref().display(), %error, "image skipped");
            }
            result
        })
        .collect()
}
