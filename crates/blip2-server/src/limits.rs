//! The limits a server enforces on each request, with their defaults.

use std::time::Duration;

use serde::Serialize;

/// Default of [`Limits::max_upload_bytes`]: 20 MiB.
pub const DEFAULT_MAX_UPLOAD_BYTES: usize = 20 * 1024 * 1024;
/// Default of [`Limits::max_image_pixels`]: 50 megapixels, above a 48-megapixel phone photo
/// (8000 × 6000). Decoded, such an image takes 150 MB.
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 50_000_000;
/// Default of [`Limits::max_text_chars`].
pub const DEFAULT_MAX_TEXT_CHARS: usize = 1000;
/// Default of [`Limits::max_new_tokens_limit`].
pub const DEFAULT_MAX_NEW_TOKENS_LIMIT: usize = 128;
/// Default of [`Limits::max_num_beams`].
pub const DEFAULT_MAX_NUM_BEAMS: usize = 10;
/// Default of [`Limits::max_texts`].
pub const DEFAULT_MAX_TEXTS: usize = 32;
/// Default of [`Limits::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Default of [`Limits::queue_size`].
pub const DEFAULT_QUEUE_SIZE: usize = 16;
/// Default of [`Limits::max_sessions`].
pub const DEFAULT_MAX_SESSIONS: usize = 64;

/// Limits a server enforces on each request. Each field's name is the `limit` named in the JSON error of a
/// request that goes over it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Limits {
    /// Maximum request body in bytes (the whole multipart form, image included).
    pub max_upload_bytes: usize,
    /// Maximum image size in pixels (width × height), checked on the image header before the
    /// pixels are decoded.
    pub max_image_pixels: u64,
    /// Maximum length of a question, prompt, template or text, in Unicode characters.
    pub max_text_chars: usize,
    /// Maximum `max_new_tokens` a request may set; checkpoint defaults above it are
    /// lowered to it.
    pub max_new_tokens_limit: usize,
    /// Maximum `num_beams` a request may set.
    pub max_num_beams: usize,
    /// Maximum number of `text` fields in one `/api/embed` or `/api/match` request.
    pub max_texts: usize,
    /// Maximum time a job may wait in the queue; a job that waited longer is not started,
    /// and its request gets `503 request_timeout`.
    ///
    /// NOTE: the timeout does not cover a job that has started. It runs to its end and its
    /// result is sent, because generation cannot be interrupted between tokens;
    /// `max_new_tokens_limit` bounds how long it takes. A client that disconnects meanwhile
    /// does not stop it either.
    #[serde(rename = "request_timeout_secs", serialize_with = "seconds")]
    pub request_timeout: Duration,
    /// Maximum number of jobs waiting for the worker (the job it is running is not counted).
    pub queue_size: usize,
    /// Maximum number of conversations kept for `/api/ask` follow-ups.
    pub max_sessions: usize,
}

fn seconds<S: serde::Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64())
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
            max_image_pixels: DEFAULT_MAX_IMAGE_PIXELS,
            max_text_chars: DEFAULT_MAX_TEXT_CHARS,
            max_new_tokens_limit: DEFAULT_MAX_NEW_TOKENS_LIMIT,
            max_num_beams: DEFAULT_MAX_NUM_BEAMS,
            max_texts: DEFAULT_MAX_TEXTS,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            queue_size: DEFAULT_QUEUE_SIZE,
            max_sessions: DEFAULT_MAX_SESSIONS,
        }
    }
}

impl Limits {
    /// Checks that every limit lets at least one request through, naming the first that
    /// does not.
    pub fn validate(&self) -> Result<(), String> {
        let counts = [
            ("max_upload_bytes", self.max_upload_bytes as u64),
            ("max_image_pixels", self.max_image_pixels),
            ("max_text_chars", self.max_text_chars as u64),
            ("max_new_tokens_limit", self.max_new_tokens_limit as u64),
            ("max_num_beams", self.max_num_beams as u64),
            ("max_texts", self.max_texts as u64),
            ("queue_size", self.queue_size as u64),
            ("max_sessions", self.max_sessions as u64),
        ];
        if let Some((name, _)) = counts.iter().find(|(_, value)| *value == 0) {
            return Err(format!("the limit {name} must be at least 1"));
        }
        if self.request_timeout.is_zero() {
            return Err("the limit request_timeout must be longer than zero".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(Limits::default().validate(), Ok(()));
    }

    #[test]
    fn zero_limit_is_named() {
        let limits = Limits {
            queue_size: 0,
            ..Limits::default()
        };
        let message = limits.validate().unwrap_err();
        assert!(message.contains("queue_size"), "{message}");
    }

    #[test]
    fn timeout_serializes_as_seconds() {
        let limits = Limits {
            request_timeout: Duration::from_millis(1500),
            ..Limits::default()
        };
        let json = serde_json::to_value(&limits).unwrap();
        assert_eq!(json["request_timeout_secs"], 1.5);
        assert_eq!(json["max_upload_bytes"], 20_971_520);
    }
}
