//! A web demo and HTTP API for BLIP-2: caption a photo, chat about it, embed it and match
//! it with texts, from a browser or with `curl`.
//!
//! ```no_run
//! use std::sync::Arc;
//! use blip2_pipeline::{Blip2, LoadOptions};
//! use blip2_server::{Server, ServerConfig};
//!
//! # async fn serve() -> Result<(), Box<dyn std::error::Error>> {
//! let blip2 = Blip2::from_pretrained("Salesforce/blip2-opt-2.7b", &LoadOptions::default())?;
//! let config = ServerConfig::new("Salesforce/blip2-opt-2.7b");
//! let server = Server::bind(Arc::new(blip2), config).await?;
//! println!("open http://{}", server.local_addr());
//! server.run(blip2_server::shutdown_signal()).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # How requests run
//!
//! HTTP is served on the tokio runtime. The model runs on one dedicated thread (the
//! worker), which takes jobs from a bounded queue one at a time. A request that finds the
//! queue full gets `503 Service Unavailable` with a `Retry-After` header. A job that has
//! waited longer than [`Limits::request_timeout`] is not started. Image decoding also runs
//! on the worker, so the memory held by decoded images is bounded by one image at a time.
//!
//! Conversations (`/api/ask`) are kept on the worker as sessions: the encoded image and
//! the questions and answers so far, so a follow-up question reuses the image features.
//! At most [`Limits::max_sessions`] are kept; the least recently used one is evicted.
//!
//! # Untrusted input
//!
//! Every request is checked against [`Limits`] before it is queued, and every rejection
//! is a JSON error (`{"error": {"code", "message", "limit", "value"}}`) with a 4xx status.
//! Nothing from a request is used as a path: the page and its example photos are compiled
//! into the binary. Panics inside a job are caught and reported as `500` errors, so one bad
//! request cannot stop the worker.

#![warn(missing_docs)]

mod api;
mod assets;
mod decoding;
mod error;
mod form;
mod limits;
mod queue;
mod results;
mod server;
mod sessions;
mod worker;

pub use error::{ApiError, Error};
pub use limits::{
    DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_NEW_TOKENS_LIMIT, DEFAULT_MAX_NUM_BEAMS,
    DEFAULT_MAX_SESSIONS, DEFAULT_MAX_TEXT_CHARS, DEFAULT_MAX_TEXTS, DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_QUEUE_SIZE, DEFAULT_REQUEST_TIMEOUT, Limits,
};
pub use queue::{QueueStatus, WorkerPause};
pub use server::{DEFAULT_PORT, Server, ServerConfig, ServerHandle, shutdown_signal};
