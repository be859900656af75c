//! Reading `multipart/form-data` requests: the image upload, repeated `text` fields, and
//! single-valued settings parsed into typed values with errors that name the field.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::Multipart;
use axum::extract::multipart::MultipartError;
use axum::http::{HeaderMap, StatusCode, header};

use crate::error::ApiError;
use crate::limits::Limits;

/// The name the image is given in errors when the upload has no file name.
const UNNAMED_UPLOAD: &str = "the uploaded image";
/// Client-chosen names are shortened to this many characters in errors and logs.
const MAX_FILE_NAME_CHARS: usize = 100;

/// An uploaded image file, still encoded.
#[derive(Debug, Clone)]
pub(crate) struct Upload {
    pub bytes: Bytes,
    /// The client's file name, only used to label errors.
    pub name: String,
}

/// The fields of one request.
#[derive(Debug, Default)]
pub(crate) struct Form {
    pub image: Option<Upload>,
    pub texts: Vec<String>,
    fields: BTreeMap<String, String>,
}

/// Returns the `415` error for a request to `endpoint` that is not `multipart/form-data`
/// (axum also rejects a multipart request without a boundary). `fields` describes what the
/// form must contain.
pub(crate) fn not_multipart(endpoint: &str, fields: &str, headers: &HeaderMap) -> ApiError {
    let sent = match headers
        .get(header::CONTENT_TYPE)
        .map(|value| printable(&String::from_utf8_lossy(value.as_bytes())))
    {
        None => "has no Content-Type".to_owned(),
        Some(content_type)
            if content_type
                .to_ascii_lowercase()
                .starts_with("multipart/form-data") =>
        {
            format!("is {content_type}, without a boundary")
        }
        Some(content_type) => format!("is {content_type}"),
    };
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!(
            "{endpoint} takes multipart/form-data (curl -F name=value) with {fields}, but this \
             request {sent}"
        ),
    )
}

/// Reads every field of a multipart request; `allowed` lists the single-valued fields
/// the endpoint takes besides `image` and (when `texts_allowed`) `text`.
pub(crate) async fn read_form(
    mut multipart: Multipart,
    allowed: &[&str],
    texts_allowed: bool,
    limits: &Limits,
) -> Result<Form, ApiError> {
    let mut form = Form::default();
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| multipart_error(e, limits))?
    {
        let name = field.name().unwrap_or_default().to_owned();
        match name.as_str() {
            "image" => {
                if form.image.is_some() {
                    return Err(ApiError::invalid_request(
                        "the form has more than one `image` field; send one image per request",
                    ));
                }
                let file_name = field
                    .file_name()
                    .map(printable)
                    .filter(|name| !name.is_empty())
                    .unwrap_or_else(|| UNNAMED_UPLOAD.to_owned());
                let bytes = field
                    .bytes()
                    .await
                    .map_err(|e| multipart_error(e, limits))?;
                form.image = Some(Upload {
                    bytes,
                    name: file_name,
                });
            }
            "text" if texts_allowed => {
                let text = field_text(field, "text", limits).await?;
                // The model would score an empty text like any other.
                if text.trim().is_empty() {
                    return Err(ApiError::invalid_request(format!(
                        "`text` field {} is empty; send words to embed or score",
                        form.texts.len() + 1
                    )));
                }
                if form.texts.len() == limits.max_texts {
                    return Err(ApiError::over_limit(
                        StatusCode::BAD_REQUEST,
                        "too_many_texts",
                        "max_texts",
                        limits.max_texts,
                        format!(
                            "the request has more than {} `text` fields, this server's limit \
                             (set by --max-texts); split it into several requests",
                            limits.max_texts
                        ),
                    ));
                }
                form.texts.push(text);
            }
            other if allowed.contains(&other) => {
                let value = field_text(field, other, limits).await?;
                if form.fields.insert(name.clone(), value).is_some() {
                    return Err(ApiError::invalid_request(format!(
                        "the form has more than one `{name}` field"
                    )));
                }
            }
            other => {
                let mut accepted = vec!["image"];
                if texts_allowed {
                    accepted.push("text");
                }
                accepted.extend_from_slice(allowed);
                return Err(ApiError::invalid_request(format!(
                    "unknown form field `{}`; this endpoint takes {}",
                    printable(other),
                    accepted.join(", ")
                )));
            }
        }
    }
    Ok(form)
}

/// Makes a client-chosen name safe for messages and logs: removes control characters
/// (which could forge log lines) and shortens it to [`MAX_FILE_NAME_CHARS`].
fn printable(name: &str) -> String {
    name.chars()
        .filter(|c| !c.is_control())
        .take(MAX_FILE_NAME_CHARS)
        .collect()
}

async fn field_text(
    field: axum::extract::multipart::Field<'_>,
    name: &str,
    limits: &Limits,
) -> Result<String, ApiError> {
    let text = field.text().await.map_err(|e| multipart_error(e, limits))?;
    check_text_length(name, &text, limits)?;
    Ok(text)
}

/// Checks a question, prompt, template or text against `max_text_chars`.
pub(crate) fn check_text_length(name: &str, text: &str, limits: &Limits) -> Result<(), ApiError> {
    let chars = text.chars().count();
    if chars > limits.max_text_chars {
        return Err(ApiError::over_limit(
            StatusCode::BAD_REQUEST,
            "text_too_long",
            "max_text_chars",
            limits.max_text_chars,
            format!(
                "the `{name}` field has {chars} characters, more than this server's limit of {} \
                 (set by --max-text-chars)",
                limits.max_text_chars
            ),
        ));
    }
    Ok(())
}

fn multipart_error(error: MultipartError, limits: &Limits) -> ApiError {
    if error.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::upload_too_large(limits.max_upload_bytes);
    }
    ApiError::invalid_request(format!(
        "cannot read the multipart form: {}",
        error.body_text()
    ))
}

impl Form {
    /// Takes the image out of the form, or returns an error that asks for one.
    pub fn take_image(&mut self) -> Result<Upload, ApiError> {
        self.image.take().ok_or_else(|| {
            ApiError::invalid_request(
                "the form has no `image` field; attach the photo as a file (curl -F image=@photo.jpg)",
            )
        })
    }

    /// Returns the raw value of a single-valued field.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }

    /// Tells whether the field was sent.
    pub fn has(&self, name: &str) -> bool {
        self.fields.contains_key(name)
    }

    /// Parses a whole number field.
    pub fn usize(&self, name: &str) -> Result<Option<usize>, ApiError> {
        self.parse(name, "a whole number such as 3", |s| {
            s.parse::<usize>().ok()
        })
    }

    /// Parses a 64-bit whole number field.
    pub fn u64(&self, name: &str) -> Result<Option<u64>, ApiError> {
        self.parse(name, "a whole number such as 42", |s| s.parse::<u64>().ok())
    }

    /// Parses a finite decimal number field.
    pub fn f32(&self, name: &str) -> Result<Option<f32>, ApiError> {
        self.parse(name, "a finite number such as 0.9", |s| {
            s.parse::<f32>().ok().filter(|v| v.is_finite())
        })
    }

    /// Parses a `true`/`false` field (`1`, `0`, `on`, `off`, `yes` and `no` are accepted too).
    pub fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        self.parse(name, "true or false", |s| {
            match s.to_ascii_lowercase().as_str() {
                "true" | "1" | "on" | "yes" => Some(true),
                "false" | "0" | "off" | "no" => Some(false),
                _ => None,
            }
        })
    }

    fn parse<T>(
        &self,
        name: &str,
        expected: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Option<T>, ApiError> {
        let Some(raw) = self.text(name) else {
            return Ok(None);
        };
        parse(raw.trim()).map(Some).ok_or_else(|| {
            ApiError::invalid_request(format!(
                "the `{name}` field must be {expected}, got {:?}",
                raw.chars().take(40).collect::<String>()
            ))
        })
    }
}

#[cfg(test)]
impl Form {
    /// Builds a form with these single-valued fields and no image.
    pub fn with_fields(fields: &[(&str, &str)]) -> Self {
        Self {
            fields: fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(fields: &[(&str, &str)]) -> Form {
        Form::with_fields(fields)
    }

    #[test]
    fn numbers_parse_and_name_bad_field() {
        let form = form(&[("num_beams", " 4 "), ("top_p", "0.5"), ("seed", "abc")]);
        assert_eq!(form.usize("num_beams").unwrap(), Some(4));
        assert_eq!(form.f32("top_p").unwrap(), Some(0.5));
        assert_eq!(form.usize("missing").unwrap(), None);
        let error = form.u64("seed").unwrap_err();
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        assert!(error.message.contains("`seed`"), "{}", error.message);
    }

    #[test]
    fn non_finite_numbers_are_rejected() {
        for value in ["NaN", "inf", "-inf"] {
            assert!(form(&[("top_p", value)]).f32("top_p").is_err(), "{value}");
        }
    }

    #[test]
    fn printable_drops_control_characters() {
        assert_eq!(printable("cat.png\nFAKE LOG LINE"), "cat.pngFAKE LOG LINE");
        assert_eq!(printable(&"x".repeat(500)).len(), MAX_FILE_NAME_CHARS);
    }

    #[test]
    fn text_length_counts_characters() {
        let limits = Limits {
            max_text_chars: 3,
            ..Limits::default()
        };
        assert!(check_text_length("question", "äöü", &limits).is_ok());
        let error = check_text_length("question", "abcd", &limits).unwrap_err();
        assert_eq!(error.code, "text_too_long");
        assert_eq!(error.limit, Some(("max_text_chars", 3.into())));
    }
}
