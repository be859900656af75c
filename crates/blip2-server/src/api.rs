//! The HTTP API: routes, request handlers, and JSON or server-sent-event responses.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use axum::body::Body;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{DefaultBodyLimit, Multipart, OriginalUri, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use blip2_pipeline::{Blip2, GenerationOptions, QuestionTemplate};
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::json;
use tokio::sync::mpsc;
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::TraceLayer;

use crate::decoding::{DECODING_FIELDS, generation_options, server_defaults};
use crate::error::ApiError;
use crate::form::{Form, not_multipart, read_form};
use crate::limits::Limits;
use crate::queue::{CancelOnDrop, JobQueue, Ticket};
use crate::worker::{AskSource, Job, JobEvent, Work};

/// The model a server runs, as `/api/health` reports it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ModelInfo {
    name: String,
    /// `captioning` (a language model: captions, questions) or `retrieval` (embeddings, matching).
    kind: &'static str,
    /// `opt` or `t5` for captioning checkpoints.
    language_model: Option<&'static str>,
    dtype: String,
}

impl ModelInfo {
    pub fn of(blip2: &Blip2, name: &str) -> Self {
        let captioning = blip2.model().language_model().is_ok();
        Self {
            name: name.to_owned(),
            kind: if captioning {
                "captioning"
            } else {
                "retrieval"
            },
            language_model: captioning.then(|| blip2.model().config().text_config.model_type()),
            dtype: format!("{:?}", blip2.model().dtype()).to_lowercase(),
        }
    }
}

/// State shared by every handler.
#[derive(Clone)]
pub(crate) struct AppState(Arc<Shared>);

struct Shared {
    blip2: Arc<Blip2>,
    queue: Arc<JobQueue>,
    limits: Limits,
    defaults: GenerationOptions,
    model: ModelInfo,
    sessions: Arc<AtomicUsize>,
    next_job_id: AtomicU64,
}

impl AppState {
    pub fn new(
        blip2: Arc<Blip2>,
        queue: Arc<JobQueue>,
        limits: Limits,
        model: ModelInfo,
        sessions: Arc<AtomicUsize>,
    ) -> Self {
        let defaults = server_defaults(blip2.default_generation_options(), &limits);
        Self(Arc::new(Shared {
            blip2,
            queue,
            limits,
            defaults,
            model,
            sessions,
            next_job_id: AtomicU64::new(1),
        }))
    }
}

/// Fields of `/api/caption` besides `image` and the decoding settings.
const CAPTION_FIELDS: &[&str] = &["prompt", "start_session"];
/// Fields of `/api/ask` besides `image` and the decoding settings.
const ASK_FIELDS: &[&str] = &["question", "session", "template"];

/// Security headers on every response: the page loads only its own scripts, styles and
/// images (plus the photo the user picks, shown from a `blob:` URL), and cannot be framed.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' blob: data:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; \
     base-uri 'none'";

/// Builds the whole application: the API under `/api`, the page and its assets elsewhere.
pub(crate) fn router(state: AppState) -> Router {
    let max_upload_bytes = state.0.limits.max_upload_bytes;
    let api = Router::new()
        .route("/caption", post(caption))
        .route("/ask", post(ask))
        .route("/embed", post(embed))
        .route("/match", post(match_texts))
        .route("/health", get(health))
        .fallback(api_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_upload_bytes))
        .layer(middleware::from_fn_with_state(
            max_upload_bytes,
            reject_oversize,
        ))
        .with_state(state);
    Router::new()
        .nest("/api", api)
        // The nested router does not match `/api/` itself, which would otherwise get the
        // page's plain-text 404 instead of the API's JSON one.
        .route("/api/", any(api_not_found))
        .merge(crate::assets::router())
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ))
        .layer(TraceLayer::new_for_http())
}

/// Largest part of an oversized body that is read and thrown away before the `413`
/// response, so that the client, still sending, reads the response instead of a reset.
const MAX_DRAINED_BYTES: usize = 64 * 1024 * 1024;

/// Rejects with `413` a request over the size limit, before its form is read.
///
/// A request whose `Content-Length` is over the limit is rejected without reading its form. A
/// chunked request, with no length, is read into memory up to the limit. The rest of an
/// oversized body, up to [`MAX_DRAINED_BYTES`], is read and discarded before the response, so a
/// client that is still sending receives the `413` instead of a reset connection. A declared
/// length over that gets the `413` at once, because waiting for such a body could take as long
/// as the client likes, and most of it would be discarded.
async fn reject_oversize(
    State(max_upload_bytes): State<usize>,
    request: Request,
    next: Next,
) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    match declared {
        Some(length) if length > max_upload_bytes as u64 => {
            tracing::info!(
                length,
                max_upload_bytes,
                "rejected an upload over the size limit"
            );
            if length <= MAX_DRAINED_BYTES as u64 {
                drain(request.into_body().into_data_stream()).await;
            }
            upload_too_large(max_upload_bytes)
        }
        Some(_) => next.run(request).await,
        None => {
            let (parts, body) = request.into_parts();
            match read_within_limit(body, max_upload_bytes).await {
                Ok(bytes) => {
                    next.run(Request::from_parts(parts, Body::from(bytes)))
                        .await
                }
                Err(response) => response,
            }
        }
    }
}

/// Reads a body that has no declared length, or returns the `413` response once it passes the limit.
async fn read_within_limit(body: Body, max_upload_bytes: usize) -> Result<Vec<u8>, Response> {
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            tracing::warn!(error = %e, "failed to read a chunked request body");
            ApiError::invalid_request(format!("failed to read the request body: {e}"))
                .into_response()
        })?;
        if bytes.len() + chunk.len() > max_upload_bytes {
            tracing::info!(
                max_upload_bytes,
                "rejected a chunked upload over the size limit"
            );
            drain(stream).await;
            return Err(upload_too_large(max_upload_bytes));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// Builds the `413` response. It closes the connection because the body may not have been read
/// to the end.
fn upload_too_large(max_upload_bytes: usize) -> Response {
    let mut response = ApiError::upload_too_large(max_upload_bytes).into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Reads and discards up to [`MAX_DRAINED_BYTES`] of a body.
async fn drain(mut stream: axum::body::BodyDataStream) {
    let mut drained = 0;
    while drained < MAX_DRAINED_BYTES {
        match stream.next().await {
            Some(Ok(chunk)) => drained += chunk.len(),
            _ => break,
        }
    }
}

fn wants_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| value.contains("text/event-stream"))
}

async fn caption(
    State(state): State<AppState>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Response {
    let work = async {
        let multipart = multipart.map_err(|_| {
            not_multipart(
                "/api/caption",
                "the photo as an `image` file field",
                &headers,
            )
        })?;
        let mut form = read_form(
            multipart,
            &[CAPTION_FIELDS, DECODING_FIELDS].concat(),
            false,
            &state.0.limits,
        )
        .await?;
        state.require_language_model("/api/caption")?;
        let image = form.take_image()?;
        let options = generation_options(&form, &state.0.defaults, &state.0.limits)?;
        Ok(Work::Caption {
            image,
            prompt: form.text("prompt").unwrap_or_default().trim().to_owned(),
            options,
            start_session: form.bool("start_session")?.unwrap_or(false),
        })
    };
    state
        .respond(work.await, wants_event_stream(&headers))
        .await
}

async fn ask(
    State(state): State<AppState>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Response {
    let work = async {
        let multipart = multipart.map_err(|_| {
            not_multipart(
                "/api/ask",
                "a `question` field, and the photo as an `image` file field or the `session` \
                 of an earlier answer",
                &headers,
            )
        })?;
        let mut form = read_form(
            multipart,
            &[ASK_FIELDS, DECODING_FIELDS].concat(),
            false,
            &state.0.limits,
        )
        .await?;
        state.require_language_model("/api/ask")?;
        let question = form
            .text("question")
            .map(str::trim)
            .filter(|question| !question.is_empty())
            .ok_or_else(|| ApiError::invalid_request("the `question` field is missing or empty"))?
            .to_owned();
        let session = form
            .text("session")
            .map(str::trim)
            .filter(|id| !id.is_empty())
            .map(str::to_owned);
        let source = match (form.image.take(), session) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid_request(
                    "send either `image` (to start a conversation) or `session` (to continue one), \
                     not both",
                ));
            }
            (Some(image), None) => AskSource::Image(image),
            (None, Some(id)) => AskSource::Session(id),
            (None, None) => {
                return Err(ApiError::invalid_request(
                    "send an `image` to start a conversation, or the `session` id of an earlier \
                     answer to continue one",
                ));
            }
        };
        let template = form
            .text("template")
            .map(QuestionTemplate::new)
            .transpose()?;
        let options = generation_options(&form, &state.0.defaults, &state.0.limits)?;
        Ok(Work::Ask {
            source,
            question,
            template,
            options,
        })
    };
    state
        .respond(work.await, wants_event_stream(&headers))
        .await
}

async fn embed(
    State(state): State<AppState>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Response {
    let work = async {
        let multipart = multipart.map_err(|_| {
            not_multipart(
                "/api/embed",
                "the photo as an `image` file field, one or more `text` fields, or both",
                &headers,
            )
        })?;
        let mut form: Form = read_form(multipart, &[], true, &state.0.limits).await?;
        if !form.texts.is_empty() {
            state.require_retrieval("/api/embed with `text` fields (text embeddings)")?;
        }
        if form.image.is_none() && form.texts.is_empty() {
            return Err(ApiError::invalid_request(
                "send an `image` file, one or more `text` fields, or both",
            ));
        }
        Ok(Work::Embed {
            image: form.image.take(),
            texts: std::mem::take(&mut form.texts),
        })
    };
    state.respond(work.await, false).await
}

async fn match_texts(
    State(state): State<AppState>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Response {
    let work = async {
        let multipart = multipart.map_err(|_| {
            not_multipart(
                "/api/match",
                "the photo as an `image` file field and one or more `text` fields",
                &headers,
            )
        })?;
        let mut form: Form = read_form(multipart, &[], true, &state.0.limits).await?;
        state.require_retrieval("/api/match")?;
        let image = form.take_image()?;
        if form.texts.is_empty() {
            return Err(ApiError::invalid_request(
                "send one or more `text` fields to score against the image",
            ));
        }
        Ok(Work::Match {
            image,
            texts: std::mem::take(&mut form.texts),
        })
    };
    state.respond(work.await, false).await
}

async fn health(State(state): State<AppState>) -> Json<serde_json::Value> {
    let shared = &state.0;
    let queue = shared.queue.status();
    let defaults = &shared.defaults;
    Json(json!({
        "status": "ok",
        "model": shared.model,
        "queue": {
            "waiting": queue.waiting,
            "busy": queue.busy,
            "capacity": shared.queue.capacity(),
        },
        "sessions": {
            "count": shared.sessions.load(Ordering::Relaxed),
            "capacity": shared.limits.max_sessions,
        },
        "limits": shared.limits,
        "defaults": {
            "decoding": if defaults.do_sample { "nucleus" } else { "beam" },
            "num_beams": defaults.num_beams,
            "max_new_tokens": defaults.max_new_tokens,
            "min_new_tokens": defaults.min_new_tokens,
            "length_penalty": defaults.length_penalty,
            "repetition_penalty": defaults.repetition_penalty,
            "no_repeat_ngram_size": defaults.no_repeat_ngram_size,
            "temperature": defaults.temperature,
            "top_p": defaults.top_p,
            "top_k": defaults.top_k,
        },
    }))
}

async fn api_not_found(OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no API endpoint at {}; the endpoints are POST /api/caption, /api/ask, /api/embed, \
             /api/match and GET /api/health",
            uri.path()
        ),
    )
}

async fn method_not_allowed(method: Method, OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} is not allowed on {}; /api/health takes GET, the other endpoints POST",
            method,
            uri.path()
        ),
    )
}

impl AppState {
    fn require_language_model(&self, endpoint: &str) -> Result<(), ApiError> {
        if self.0.blip2.model().language_model().is_ok() {
            return Ok(());
        }
        Err(ApiError::wrong_model_kind(format!(
            "{endpoint} needs a captioning checkpoint (one with a language model, such as \
             Salesforce/blip2-opt-2.7b), but this server runs {}, an image-text retrieval \
             checkpoint; start the server with --model set to a captioning checkpoint",
            self.0.model.name
        )))
    }

    fn require_retrieval(&self, what: &str) -> Result<(), ApiError> {
        if self.0.blip2.model().retrieval_heads().is_ok() {
            return Ok(());
        }
        Err(ApiError::wrong_model_kind(format!(
            "{what} needs an image-text retrieval checkpoint (one with projection and matching \
             heads, such as Salesforce/blip2-itm-vit-g), but this server runs {}, a captioning \
             checkpoint; start the server with --model set to a retrieval checkpoint",
            self.0.model.name
        )))
    }

    /// Queues `work` and responds with its result: JSON, or server-sent events when
    /// `stream` is set. Errors found before any text was generated get their own status
    /// in both modes; later ones arrive as an `error` event.
    async fn respond(&self, work: Result<Work, ApiError>, stream: bool) -> Response {
        let work = match work {
            Ok(work) => work,
            Err(error) => {
                tracing::info!(%error, "rejected a request");
                return error.into_response();
            }
        };
        let shared = &self.0;
        let (events, mut receiver) = mpsc::unbounded_channel();
        let ticket = Ticket::default();
        let enqueued = Instant::now();
        let deadline = enqueued + shared.limits.request_timeout;
        let job = Job {
            id: shared.next_job_id.fetch_add(1, Ordering::Relaxed),
            work,
            ticket: ticket.clone(),
            events,
            stream,
            enqueued,
            deadline,
        };
        if let Err(error) = shared.queue.submit(job) {
            tracing::warn!(%error, "rejected a request");
            return error.into_response();
        }
        let cancel_on_drop = CancelOnDrop(ticket.clone());

        let first = tokio::time::timeout_at(deadline.into(), receiver.recv()).await;
        let first = match first {
            Ok(event) => event,
            // The worker may have started the job at the last moment; then it runs to its end.
            Err(_) if !ticket.try_cancel() => receiver.recv().await,
            Err(_) => {
                let error = shared.queue.timeout_error(shared.limits.request_timeout);
                tracing::warn!(%error, "a request timed out in the queue");
                return error.into_response();
            }
        };
        match first {
            Some(JobEvent::Finished(Err(error))) => error.into_response(),
            Some(event) if stream => event_stream(event, receiver, cancel_on_drop),
            Some(JobEvent::Finished(Ok(json))) => json_response(json),
            Some(JobEvent::Text(_)) => loop {
                // Not sent for JSON requests; skipped should that change.
                match receiver.recv().await {
                    Some(JobEvent::Text(_)) => {}
                    Some(JobEvent::Finished(Ok(json))) => break json_response(json),
                    Some(JobEvent::Finished(Err(error))) => break error.into_response(),
                    None => break worker_gone().into_response(),
                }
            },
            None => worker_gone().into_response(),
        }
    }
}

/// Wraps a body that is JSON already in a response.
fn json_response(json: String) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        json,
    )
        .into_response()
}

fn worker_gone() -> ApiError {
    ApiError::internal("the model worker stopped before sending a result; check the server log")
}

/// Server-sent events: `text` events (`{"text": piece}`) as the text is generated, then
/// `done` with the JSON result, or `error` with the JSON error.
fn event_stream(
    first: JobEvent,
    receiver: mpsc::UnboundedReceiver<JobEvent>,
    cancel_on_drop: CancelOnDrop,
) -> Response {
    struct StreamState {
        pending: Option<JobEvent>,
        receiver: mpsc::UnboundedReceiver<JobEvent>,
        finished: bool,
        _cancel_on_drop: CancelOnDrop,
    }
    let state = StreamState {
        pending: Some(first),
        receiver,
        finished: false,
        _cancel_on_drop: cancel_on_drop,
    };
    let events = futures_util::stream::unfold(state, |mut state| async move {
        if state.finished {
            return None;
        }
        let next = match state.pending.take() {
            Some(event) => Some(event),
            None => state.receiver.recv().await,
        };
        let event = match next {
            Some(JobEvent::Text(text)) => Event::default()
                .event("text")
                .json_data(json!({ "text": text })),
            Some(JobEvent::Finished(Ok(json))) => {
                state.finished = true;
                Ok(Event::default().event("done").data(json))
            }
            Some(JobEvent::Finished(Err(error))) => {
                state.finished = true;
                Event::default().event("error").json_data(error.body())
            }
            None => {
                state.finished = true;
                Event::default()
                    .event("error")
                    .json_data(worker_gone().body())
            }
        };
        Some((event, state))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
