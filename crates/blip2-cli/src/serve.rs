//! `blip2 serve`: the web demo and HTTP API (see the blip2-server crate).

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use blip2_server::{Limits, Server, ServerConfig};
use clap::Args;

use crate::args::{ImageArgs, ModelArgs};

/// Arguments of `blip2 serve`.
#[derive(Debug, Args)]
#[command(
    after_help = "Open the printed address in a browser for the demo page; the README lists the \
HTTP endpoints. The server has no authentication: it listens on 127.0.0.1 unless --host says \
otherwise, and warns when the address is reachable from other machines. Ctrl-C or SIGTERM stops \
it after the requests in flight have finished."
)]
pub struct ServeArgs {
    /// Address to listen on (127.0.0.1 is this machine only; 0.0.0.0 or :: is every network
    /// interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,

    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = blip2_server::DEFAULT_PORT)]
    pub port: u16,

    /// Maximum request body in bytes, image included.
    #[arg(long, default_value_t = blip2_server::DEFAULT_MAX_UPLOAD_BYTES)]
    pub max_upload_bytes: usize,

    /// Maximum image size in pixels (width × height), checked before it is decoded.
    #[arg(long, default_value_t = blip2_server::DEFAULT_MAX_IMAGE_PIXELS)]
    pub max_image_pixels: u64,

    /// Maximum length of a question, prompt, template or text, in characters.
    #[arg(long, default_value_t = blip2_server::DEFAULT_MAX_TEXT_CHARS)]
    pub max_text_chars: usize,

    /// Maximum max_new_tokens a request may set.
    #[arg(long, default_value_t = blip2_server::DEFAULT_MAX_NEW_TOKENS_LIMIT)]
    pub max_new_tokens_limit: usize,

    /// Maximum num_beams a request may set.
    #[arg(long, default_value_t = blip2_server::DEFAULT_MAX_NUM_BEAMS)]
    pub max_num_beams: usize,

    /// Maximum number of `text` fields in one /api/embed or /api/match request.
    #[arg(long, default_value_t = blip2_server::DEFAULT_MAX_TEXTS)]
    pub max_texts: usize,

    /// Seconds a request may wait for the model before it is dropped with a 503 error (a
    /// request the model has started runs to its end and is answered).
    #[arg(long, default_value_t = blip2_server::DEFAULT_REQUEST_TIMEOUT.as_secs())]
    pub request_timeout_secs: u64,

    /// Maximum number of requests waiting for the model; more get 503 with a Retry-After
    /// header.
    #[arg(long, default_value_t = blip2_server::DEFAULT_QUEUE_SIZE)]
    pub queue_size: usize,

    /// Maximum number of conversations kept for follow-up questions; the least recently
    /// used is dropped.
    #[arg(long, default_value_t = blip2_server::DEFAULT_MAX_SESSIONS)]
    pub max_sessions: usize,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub image_args: ImageArgs,
}

impl ServeArgs {
    fn limits(&self) -> Limits {
        Limits {
            max_upload_bytes: self.max_upload_bytes,
            max_image_pixels: self.max_image_pixels,
            max_text_chars: self.max_text_chars,
            max_new_tokens_limit: self.max_new_tokens_limit,
            max_num_beams: self.max_num_beams,
            max_texts: self.max_texts,
            request_timeout: Duration::from_secs(self.request_timeout_secs),
            queue_size: self.queue_size,
            max_sessions: self.max_sessions,
        }
    }
}

/// Runs `blip2 serve` until Ctrl-C or SIGTERM.
pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let addr = SocketAddr::new(args.host, args.port);
    // Bound before the model loads, so a port in use is reported at once.
    let listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    let model_name = args
        .model
        .name(crate::args::DEFAULT_CAPTION_MODEL)
        .to_owned();
    // Loaded before the runtime starts, because loading sets the thread count through an
    // environment variable, which is only sound while no other thread runs.
    let blip2 = Arc::new(args.model.load(crate::args::DEFAULT_CAPTION_MODEL)?);
    let config = ServerConfig {
        addr,
        limits: args.limits(),
        model_name,
        apply_exif_orientation: args.image_args.load_options().apply_exif_orientation,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("blip2-http")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let server = Server::from_listener(blip2, listener, config)?;
        eprintln!(
            "Serving the BLIP-2 demo on http://{}/ (Ctrl-C stops it)",
            server.local_addr()
        );
        server.run(blip2_server::shutdown_signal()).await
    })?;
    Ok(ExitCode::SUCCESS)
}
