//! Errors: the JSON errors requests get, and the errors of starting a server.

use std::net::SocketAddr;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use blip2_image::ImageError;
use serde_json::{Value, json};

/// An error starting or running a server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A limit in the configuration lets no request through.
    #[error("invalid server configuration: {0}")]
    InvalidConfig(String),

    /// The address could not be bound (in use, not local, no permission).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The operating system's error.
        source: std::io::Error,
    },

    /// Serving failed, or the model thread could not be started or stopped.
    #[error("server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// The error a request gets: an HTTP status and a JSON body
/// `{"error": {"code": ..., "message": ..., "limit": ..., "value": ...}}`, where `limit`
/// and `value` are present when a configured limit was exceeded.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A stable machine-readable code such as `upload_too_large`.
    pub code: &'static str,
    /// The explanation in words, with what to do next.
    pub message: String,
    /// The name of the limit that was exceeded and its configured value.
    pub limit: Option<(&'static str, Value)>,
    /// Seconds after which a retry may succeed (sent as `Retry-After`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error without a limit.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            limit: None,
            retry_after: None,
        }
    }

    /// `400 invalid_request`: a missing, malformed or contradictory form field.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// An error for a request over a configured limit.
    pub fn over_limit(
        status: StatusCode,
        code: &'static str,
        limit: &'static str,
        value: impl Into<Value>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            limit: Some((limit, value.into())),
            ..Self::new(status, code, message)
        }
    }

    /// `413 upload_too_large`.
    pub fn upload_too_large(max_upload_bytes: usize) -> Self {
        Self::over_limit(
            StatusCode::PAYLOAD_TOO_LARGE,
            "upload_too_large",
            "max_upload_bytes",
            max_upload_bytes,
            format!(
                "the request is larger than this server's limit of {max_upload_bytes} bytes \
                 ({:.1} MiB, set by --max-upload-bytes); send a smaller image",
                max_upload_bytes as f64 / (1024.0 * 1024.0)
            ),
        )
    }

    /// `400 wrong_model_kind`: the endpoint needs the other kind of checkpoint.
    pub fn wrong_model_kind(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "wrong_model_kind", message)
    }

    /// `500 internal_error`, for failures that are not the request's fault.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    /// Adds a `Retry-After` value in seconds.
    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The error for an image that cannot be decoded or is over `max_image_pixels`.
    pub fn from_image(error: ImageError) -> Self {
        match error {
            ImageError::TooManyPixels {
                input,
                width,
                height,
                limit,
            } => Self::over_limit(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_many_pixels",
                "max_image_pixels",
                limit,
                format!(
                    "{input}: the image is {width}x{height} = {} pixels, more than this server's limit \
                     of {limit} pixels (set by --max-image-pixels); send a smaller image",
                    u128::from(width) * u128::from(height)
                ),
            ),
            other => Self::new(StatusCode::BAD_REQUEST, "invalid_image", other.to_string()),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some((limit, value)) = &self.limit {
            error["limit"] = json!(limit);
            error["value"] = value.clone();
        }
        json!({ "error": error })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

impl From<blip2_pipeline::Error> for ApiError {
    fn from(error: blip2_pipeline::Error) -> Self {
        match error {
            blip2_pipeline::Error::InvalidRequest(message) => Self::invalid_request(message),
            blip2_pipeline::Error::Image(image) => Self::from_image(image),
            other => Self::internal(format!("the model failed: {other}")),
        }
    }
}

impl From<candle_core::Error> for ApiError {
    fn from(error: candle_core::Error) -> Self {
        blip2_pipeline::Error::from(error).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_error_body_names_limit() {
        let body = ApiError::upload_too_large(20_971_520).body();
        assert_eq!(body["error"]["code"], "upload_too_large");
        assert_eq!(body["error"]["limit"], "max_upload_bytes");
        assert_eq!(body["error"]["value"], 20_971_520);
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("20971520 bytes"), "{message}");
    }

    #[test]
    fn plain_error_body_has_no_limit() {
        let body = ApiError::invalid_request("the question is empty").body();
        assert_eq!(body["error"]["code"], "invalid_request");
        assert!(body["error"].get("limit").is_none(), "{body}");
    }

    #[test]
    fn retry_after_becomes_header() {
        let response = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "queue_full", "busy")
            .with_retry_after(7)
            .into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "7");
    }

    #[test]
    fn pipeline_request_error_is_400() {
        let error = ApiError::from(blip2_pipeline::Error::InvalidRequest("too long".into()));
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        assert_eq!(error.message, "too long");
    }
}
