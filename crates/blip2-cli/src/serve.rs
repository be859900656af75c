//! `blip2 serve`: the web demo and HTTP API (see the blip2-server crate).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use blip2_server::{Limits, Server, ServerConfig};
use clap::Args;

use crate::args::{LanguageModelArgs, ModelArgs};

/// Arguments of `blip2 serve`.
#[derive(Debug, Args)]
#[command(
    after_help = "Open the printed address in a browser for the demo page; the README lists the \
HTTP endpoints. The server has no authentication: it listens on 127.0.0.1 unless --host says \
otherwise, and warns when the address is reachable from other machines. Ctrl-C or SIGTERM stops \
it after the requests in flight have finished."
)]
pub struct ServeArgs {
    /// Address to listen on (127.0.0.1 or localhost is this machine only; 0.0.0.0 or :: is
    /// every network interface).
    #[arg(long, default_value = "127.0.0.1", value_parser = parse_host)]
    pub host: IpAddr,

    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = blip2_server::DEFAULT_PORT)]
    pub port: u16,

    /// Maximum request body in bytes, image included.
    #[arg(long, default_value_t = blip2_server::DEFAULT_MAX_UPLOAD_BYTES, value_parser = at_least_one())]
    pub max_upload_bytes: usize,

    /// Maximum image size in pixels (width × height), checked before it is decoded.
    #[arg(long, default_value_t = blip2_server::DEFAULT_MAX_IMAGE_PIXELS, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_image_pixels: u64,

    /// Maximum length of a question, prompt, template or text, in characters.
    #[arg(long, default_value_t = blip2_server::DEFAULT_MAX_TEXT_CHARS, value_parser = at_least_one())]
    pub max_text_chars: usize,

    /// Maximum max_new_tokens a request may set.
    #[arg(long, default_value_t = blip2_server::DEFAULT_MAX_NEW_TOKENS_LIMIT, value_parser = at_least_one())]
    pub max_new_tokens_limit: usize,

    /// Maximum num_beams a request may set.
    #[arg(long, default_value_t = blip2_server::DEFAULT_MAX_NUM_BEAMS, value_parser = at_least_one())]
    pub max_num_beams: usize,

    /// Maximum number of `text` fields in one /api/embed or /api/match request.
    #[arg(long, default_value_t = blip2_server::DEFAULT_MAX_TEXTS, value_parser = at_least_one())]
    pub max_texts: usize,

    /// Seconds a request may wait for the model before it is dropped with a 503 error (a
    /// request the model has started runs to its end and is answered).
    #[arg(long, default_value_t = blip2_server::DEFAULT_REQUEST_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout_secs: u64,

    /// Maximum number of requests waiting for the model; more get 503 with a Retry-After
    /// header.
    #[arg(long, default_value_t = blip2_server::DEFAULT_QUEUE_SIZE, value_parser = at_least_one())]
    pub queue_size: usize,

    /// Maximum number of conversations kept for follow-up questions; the least recently
    /// used is dropped.
    #[arg(long, default_value_t = blip2_server::DEFAULT_MAX_SESSIONS, value_parser = at_least_one())]
    pub max_sessions: usize,

    /// Ignore the EXIF orientation tag of uploaded photos (the reference implementation
    /// ignores it; by default photos are turned the way a viewer shows them).
    #[arg(long)]
    pub no_exif_orientation: bool,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub language: LanguageModelArgs,
}

/// Parses a limit, which must let at least one request through.
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..)
}

/// Parses `--host`: an IP address, or `localhost` for 127.0.0.1. Other names are refused
/// rather than looked up, so the address the server binds is the one given.
fn parse_host(value: &str) -> Result<IpAddr, String> {
    if value.eq_ignore_ascii_case("localhost") {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    value.parse().map_err(|_| {
        format!("{value:?} is not an IP address; give one such as 127.0.0.1, ::1 or 0.0.0.0, or localhost")
    })
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
    let blip2 = Arc::new(
        args.model
            .load_with(&args.language, crate::args::DEFAULT_CAPTION_MODEL)?,
    );
    let config = ServerConfig {
        addr,
        limits: args.limits(),
        model_name,
        apply_exif_orientation: !args.no_exif_orientation,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_addresses_or_localhost() {
        assert_eq!(parse_host("localhost"), Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        assert_eq!(parse_host("::1"), Ok("::1".parse().unwrap()));
        assert!(
            parse_host("example.com")
                .unwrap_err()
                .contains("example.com")
        );
    }
}
