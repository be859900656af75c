//! The image processor settings, mirrored from Hugging Face's `BlipImageProcessor`.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// `OPENAI_CLIP_MEAN` in transformers, the default `image_mean` of `BlipImageProcessor`.
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// `OPENAI_CLIP_STD` in transformers, the default `image_std` of `BlipImageProcessor`.
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// A PIL resampling filter, serialized as its PIL integer id (`Image.Resampling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "u8")]
pub enum Resample {
    /// `Image.NEAREST` (0).
    Nearest,
    /// `Image.LANCZOS` (1), a 3-lobe windowed sinc.
    Lanczos,
    /// `Image.BILINEAR` (2).
    Bilinear,
    /// `Image.BICUBIC` (3), the filter BLIP-2 uses.
    Bicubic,
    /// `Image.BOX` (4).
    Box,
    /// `Image.HAMMING` (5).
    Hamming,
}

impl Resample {
    /// Returns the PIL filter id.
    pub fn pil_id(self) -> u8 {
        match self {
            Resample::Nearest => 0,
            Resample::Lanczos => 1,
            Resample::Bilinear => 2,
            Resample::Bicubic => 3,
            Resample::Box => 4,
            Resample::Hamming => 5,
        }
    }

    /// Returns the filter with PIL id `id`, or `None` for an id PIL does not define.
    pub fn from_pil_id(id: i64) -> Option<Self> {
        match id {
            0 => Some(Resample::Nearest),
            1 => Some(Resample::Lanczos),
            2 => Some(Resample::Bilinear),
            3 => Some(Resample::Bicubic),
            4 => Some(Resample::Box),
            5 => Some(Resample::Hamming),
            _ => None,
        }
    }
}

impl TryFrom<i64> for Resample {
    type Error = String;

    fn try_from(id: i64) -> Result<Self, Self::Error> {
        Resample::from_pil_id(id).ok_or_else(|| {
            format!(
                "unknown PIL resampling filter {id}; expected 0 (nearest), 1 (lanczos), 2 (bilinear), \
                 3 (bicubic), 4 (box) or 5 (hamming)"
            )
        })
    }
}

impl From<Resample> for u8 {
    fn from(resample: Resample) -> u8 {
        resample.pil_id()
    }
}

/// The `size` entry: an output height and width in pixels.
///
/// transformers also accepts `shortest_edge`/`longest_edge` sizes for other processors; BLIP
/// resizes to a fixed height and width, so those keys are rejected by
/// [`ImageProcessorConfig::validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ImageSize {
    /// Output height in pixels.
    pub height: Option<u32>,
    /// Output width in pixels.
    pub width: Option<u32>,
    /// Resize so the shorter side has this length (not used by BLIP; rejected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shortest_edge: Option<u32>,
    /// Upper bound for the longer side (not used by BLIP; rejected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub longest_edge: Option<u32>,
}

impl ImageSize {
    /// Returns a `height` x `width` size.
    pub fn new(height: u32, width: u32) -> Self {
        ImageSize {
            height: Some(height),
            width: Some(width),
            shortest_edge: None,
            longest_edge: None,
        }
    }
}

/// A serde mirror of the image processor settings that transformers writes for BLIP and BLIP-2.
///
/// Defaults are those of transformers' `BlipImageProcessor`: resize to 384x384 with bicubic
/// resampling, rescale by 1/255, normalize with the OpenAI CLIP mean and std, convert to RGB.
/// Keys this crate does not use (`image_processor_type`, `processor_class`, ...) are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageProcessorConfig {
    /// Whether to resize to `size`.
    pub do_resize: bool,
    /// Output size.
    pub size: ImageSize,
    /// Resampling filter for the resize.
    pub resample: Resample,
    /// Whether to multiply the pixel values by `rescale_factor`.
    pub do_rescale: bool,
    /// Factor applied to the 0..=255 pixel values.
    pub rescale_factor: f64,
    /// Whether to subtract `image_mean` and divide by `image_std`.
    pub do_normalize: bool,
    /// Per-channel mean, R, G, B.
    pub image_mean: Vec<f64>,
    /// Per-channel standard deviation, R, G, B.
    pub image_std: Vec<f64>,
    /// Whether to convert to RGB; `false` is rejected because the model needs 3 channels.
    pub do_convert_rgb: bool,
    /// Whether to center-crop after the resize; `true` is rejected (BLIP does not crop).
    pub do_center_crop: bool,
    /// `num_query_tokens` from a `processor_config.json`, when the file has one.
    #[serde(skip)]
    pub num_query_tokens: Option<usize>,
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        ImageProcessorConfig {
            do_resize: true,
            size: ImageSize::new(384, 384),
            resample: Resample::Bicubic,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN.to_vec(),
            image_std: OPENAI_CLIP_STD.to_vec(),
            do_convert_rgb: true,
            do_center_crop: false,
            num_query_tokens: None,
        }
    }
}

impl ImageProcessorConfig {
    /// Reads and validates a `preprocessor_config.json` or a `processor_config.json`.
    ///
    /// A flat file (older published checkpoints) has the settings at the top level. A
    /// `processor_config.json` written by transformers 5 has them under `image_processor`,
    /// next to `num_query_tokens`.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parses and validates settings from JSON text; `source_name` labels the errors.
    pub fn from_json_str(text: &str, source_name: &str) -> Result<Self, ConfigError> {
        let json: serde_json::Value =
            serde_json::from_str(text).map_err(|source| ConfigError::Json {
                source_name: source_name.to_string(),
                source,
            })?;
        let serde_json::Value::Object(mut top) = json else {
            return Err(ConfigError::Invalid {
                source_name: source_name.to_string(),
                field: "(top level)",
                value: json_kind(&json).to_string(),
                expected: "a JSON object",
            });
        };

        let config = match top.remove("image_processor") {
            Some(nested) => {
                let mut config: Self = deserialize_field(nested, source_name, "image_processor.")?;
                if let Some(tokens) = top.remove("num_query_tokens") {
                    config.num_query_tokens =
                        Some(deserialize_field(tokens, source_name, "num_query_tokens")?);
                }
                config
            }
            None => deserialize_field(serde_json::Value::Object(top), source_name, "")?,
        };
        config.validate_named(source_name)?;
        Ok(config)
    }

    /// Checks that the settings can be applied: 3 means and 3 non-zero, finite stds, a
    /// height and width of at least 1, and no option this crate does not implement.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_named("ImageProcessorConfig")
    }

    fn validate_named(&self, source_name: &str) -> Result<(), ConfigError> {
        let invalid =
            |field: &'static str, value: String, expected: &'static str| ConfigError::Invalid {
                source_name: source_name.to_string(),
                field,
                value,
                expected,
            };

        if self.image_mean.len() != 3 || self.image_mean.iter().any(|m| !m.is_finite()) {
            return Err(invalid(
                "image_mean",
                format!("{:?}", self.image_mean),
                "3 finite numbers (R, G, B)",
            ));
        }
        if self.image_std.len() != 3 || self.image_std.iter().any(|s| !s.is_finite() || *s == 0.0) {
            return Err(invalid(
                "image_std",
                format!("{:?}", self.image_std),
                "3 finite, non-zero numbers (R, G, B)",
            ));
        }
        if !self.rescale_factor.is_finite() {
            return Err(invalid(
                "rescale_factor",
                self.rescale_factor.to_string(),
                "a finite number",
            ));
        }
        if !self.do_convert_rgb {
            return Err(invalid(
                "do_convert_rgb",
                "false".into(),
                "true: the model needs 3-channel RGB input",
            ));
        }
        if self.do_center_crop {
            return Err(invalid(
                "do_center_crop",
                "true".into(),
                "false: BLIP does not center-crop",
            ));
        }
        if self.size.shortest_edge.is_some() || self.size.longest_edge.is_some() {
            return Err(invalid(
                "size",
                format!("{:?}", self.size),
                "{\"height\": H, \"width\": W}: BLIP resizes to a fixed size",
            ));
        }
        match (self.size.height, self.size.width) {
            (Some(height), Some(width)) if height > 0 && width > 0 => Ok(()),
            _ => Err(invalid(
                "size",
                format!("height {:?}, width {:?}", self.size.height, self.size.width),
                "a height and a width of at least 1",
            )),
        }
    }

    /// Returns the output `(height, width)`, or `None` when `size` lacks one of them.
    pub fn output_size(&self) -> Option<(u32, u32)> {
        Some((self.size.height?, self.size.width?))
    }
}

fn deserialize_field<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
    source_name: &str,
    prefix: &str,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let inner = error.path().to_string();
        let field = match (inner.as_str(), prefix) {
            (".", "") => "(top level)".to_string(),
            (".", _) => prefix.trim_end_matches('.').to_string(),
            _ => format!("{prefix}{inner}"),
        };
        ConfigError::Field {
            source_name: source_name.to_string(),
            field,
            message: error.into_inner().to_string(),
        }
    })
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

impl fmt::Display for Resample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Resample::Nearest => "nearest",
            Resample::Lanczos => "lanczos",
            Resample::Bilinear => "bilinear",
            Resample::Bicubic => "bicubic",
            Resample::Box => "box",
            Resample::Hamming => "hamming",
        };
        write!(f, "{name} ({})", self.pil_id())
    }
}
