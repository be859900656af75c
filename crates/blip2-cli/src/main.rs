//! `blip2`: caption images and answer questions about them with BLIP-2 checkpoints.

mod args;
mod ask;
mod caption;
mod chat;
mod embed;
mod matching;
mod output;
mod photos;
mod quantize;
mod serve;

use clap::{Parser, Subcommand};

/// BLIP-2 vision-language models on the CPU: caption photos, answer questions about them,
/// match them with texts and search photo collections.
#[derive(Debug, Parser)]
#[command(name = "blip2", version, about, long_about = None)]
struct Cli {
    /// Log more: -v for progress information, -vv for debugging details.
    /// RUST_LOG overrides this (for example RUST_LOG=blip2_pipeline=debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Caption images (or continue a prompt about each image).
    Caption(caption::CaptionArgs),
    /// Answer a question about an image.
    Ask(ask::AskArgs),
    /// Hold a conversation about an image, one question per line of standard input.
    Chat(chat::ChatArgs),
    /// Save image (and text) features and embeddings to a file.
    Embed(embed::EmbedArgs),
    /// Score how well texts describe an image (matching probability and similarity).
    Match(matching::MatchArgs),
    /// Score labels against images, for sorting and moderation.
    Classify(matching::ClassifyArgs),
    /// Build or update a searchable index of a photo folder.
    Index(photos::IndexArgs),
    /// Find photos in an index by a text description.
    Search(photos::SearchArgs),
    /// Serve the web demo and the HTTP API.
    Serve(serve::ServeArgs),
    /// Quantize a checkpoint's language model once, save it, and measure the quality cost.
    Quantize(quantize::QuantizeArgs),
}

fn init_logging(verbose: u8, serving: bool) {
    let default = match verbose {
        // A server logs its starts, stops and request errors by default.
        0 if serving => "warn,blip2_server=info",
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose, matches!(cli.command, Command::Serve(_)));
    let result = match cli.command {
        Command::Caption(args) => caption::run(args),
        Command::Ask(args) => ask::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Embed(args) => embed::run(args),
        Command::Match(args) => matching::run_match(args),
        Command::Classify(args) => matching::run_classify(args),
        Command::Index(args) => photos::run_index(args),
        Command::Search(args) => photos::run_search(args),
        Command::Serve(args) => serve::run(args),
        Command::Quantize(args) => quantize::run(args),
    };
    match result {
        Ok(code) => code,
        // No message, and the status a process ended by SIGPIPE gets, as with other tools,
        // because the items after the last one written were not processed.
        Err(error) if output::is_closed_pipe(&error) => std::process::ExitCode::from(141),
        Err(error) => {
            eprintln!("error: {}", error_message(&error));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Returns the error and its causes, joined by colons. A cause whose text the message already
/// contains is left out: many errors quote their cause, and the chain would repeat it.
pub(crate) fn error_message(error: &anyhow::Error) -> String {
    let mut message = error.to_string();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    message
}

#[cfg(test)]
mod tests {
    use super::error_message;

    #[test]
    fn quoted_causes_are_not_repeated() {
        let cause = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let quoting = anyhow::Error::new(cause).context("cannot read a.png: no such file");
        assert_eq!(error_message(&quoting), "cannot read a.png: no such file");

        let cause = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let plain = anyhow::Error::new(cause).context("cannot read a.png");
        assert_eq!(error_message(&plain), "cannot read a.png: no such file");
    }
}
