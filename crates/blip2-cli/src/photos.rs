//! `blip2 index` and `blip2 search`: a searchable index of a photo folder.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use blip2_pipeline::IndexEvent;
use blip2_pipeline::index::PhotoIndex;
use clap::Args;

use crate::args::{DEFAULT_RETRIEVAL_MODEL, ImageArgs, ModelArgs};
use crate::output::{out, plural};

/// Arguments of `blip2 index`.
#[derive(Debug, Args)]
#[command(
    after_help = "Running it again on the same folder encodes only new or changed photos, \
drops deleted ones, and continues an interrupted run. The index is a directory: index.json (the \
model, a local checkpoint directory as an absolute path, and the shape), embeddings.npy (float32 \
[rows, queries, dim], numpy-readable) and entries.jsonl (which photo is in which row). Exit status \
1 when some photos could not be read (the rest are indexed)."
)]
pub struct IndexArgs {
    /// The photo folder (searched recursively for JPEG, PNG, WebP, GIF, BMP and TIFF files).
    pub folder: PathBuf,

    /// The index directory (created if it does not exist).
    #[arg(short, long)]
    pub output: PathBuf,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub image_args: ImageArgs,
}

/// Arguments of `blip2 search`.
#[derive(Debug, Args)]
#[command(
    after_help = "Without --model, the checkpoint recorded in the index is loaded. A relative \
path there (indexes made by earlier versions store the path as typed) is taken relative to the \
folder that contains the index. With --rerank, a candidate photo that can no longer be read is \
reported (in --json as {\"path\": ..., \"error\": ...}) and left out, and the exit status is 1."
)]
pub struct SearchArgs {
    /// The index directory made by `blip2 index`.
    pub index: PathBuf,

    /// What to look for, for example "a cat on a red blanket".
    pub query: String,

    /// Number of results.
    #[arg(long, default_value_t = 10)]
    pub top_k: usize,

    /// Re-rank the best matches with the image-text matching head (slower: each
    /// candidate photo is read and encoded again).
    #[arg(long)]
    pub rerank: bool,

    /// Candidates to re-rank, at least --top-k (default: four times --top-k).
    #[arg(long, requires = "rerank")]
    pub candidates: Option<usize>,

    /// Print one JSON object per result (JSON Lines).
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub image_args: ImageArgs,
}

/// Returns the message of an error about the photo at `path`, with the path in front unless
/// the message names it already, as image errors do.
fn photo_error(path: &Path, error: &str) -> String {
    let path_text = path.display().to_string();
    if error.contains(&path_text) {
        error.to_owned()
    } else {
        format!("{path_text}: {error}")
    }
}

/// Runs `blip2 index`.
pub fn run_index(args: IndexArgs) -> anyhow::Result<ExitCode> {
    let model = args.model.name(DEFAULT_RETRIEVAL_MODEL).to_owned();
    let blip2 = args.model.load(DEFAULT_RETRIEVAL_MODEL)?;
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut done = 0usize;
    let mut total = 0usize;
    let mut on_event = |event: IndexEvent<'_>| {
        match event {
            IndexEvent::Planned { found, to_encode } => {
                total = to_encode;
                eprintln!(
                    "{found} photo{} found, {to_encode} to encode",
                    plural(found)
                );
                if interactive {
                    let progress = indicatif::ProgressBar::new(to_encode as u64);
                    progress.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{bar:40} {pos}/{len} photos, {elapsed} elapsed, ~{eta} left",
                        )
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                    );
                    bar = Some(progress);
                }
            }
            IndexEvent::Encoded { path } => {
                done += 1;
                match &bar {
                    Some(progress) => progress.inc(1),
                    None => eprintln!("[{done}/{total}] {}", path.display()),
                }
            }
            IndexEvent::Skipped { path, error } => {
                done += 1;
                let message = format!(
                    "error: {} (left out of the index)",
                    photo_error(path, &error.to_string())
                );
                match &bar {
                    Some(progress) => {
                        progress.suspend(|| eprintln!("{message}"));
                        progress.inc(1);
                    }
                    None => eprintln!("{message}"),
                }
            }
        }
        ControlFlow::Continue(())
    };
    let report = blip2.index_photos(
        &model,
        &args.folder,
        &args.output,
        &args.image_args.load_options(),
        &mut on_event,
    )?;
    if let Some(progress) = bar {
        progress.finish_and_clear();
    }
    eprintln!(
        "{} photo{} in {}: {} encoded, {} unchanged, {} removed, {} skipped",
        report.indexed,
        plural(report.indexed),
        args.output.display(),
        report.encoded,
        report.unchanged,
        report.removed,
        report.skipped.len()
    );
    Ok(if report.skipped.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs `blip2 search`; fails when a photo to re-rank could not be read (the others are
/// ranked).
pub fn run_search(args: SearchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.top_k > 0, "--top-k must be at least 1");
    if let Some(candidates) = args.candidates {
        anyhow::ensure!(
            candidates >= args.top_k,
            "--candidates {candidates} is below --top-k {}: re-ranking picks the results among \
             the candidates, so give --candidates at least {} (or leave it out for four times \
             --top-k)",
            args.top_k,
            args.top_k
        );
    }
    anyhow::ensure!(
        !args.query.trim().is_empty(),
        "the search text QUERY ({:?}) is empty; describe the photos to find, for example \
         \"a cat on a red blanket\"",
        args.query
    );
    let mut index = PhotoIndex::open(&args.index)?;
    let indexed_model = index.model_location();
    let blip2 = args.model.load(&indexed_model)?;
    let candidates = args
        .rerank
        .then(|| args.candidates.unwrap_or(args.top_k.saturating_mul(4)));
    let outcome = blip2.search_photos(
        &mut index,
        &args.query,
        args.top_k,
        candidates,
        &args.image_args.load_options(),
    )?;
    for (rank, result) in outcome.results.iter().enumerate() {
        if args.json {
            let line = serde_json::json!({
                "rank": rank + 1,
                "path": result.path.display().to_string(),
                "itc_similarity": result.itc_similarity,
                "itm_probability": result.itm_probability,
                "rerank_score": result.rerank_score,
            });
            out!("{line}")?;
        } else {
            match (result.rerank_score, result.itm_probability) {
                (Some(score), Some(probability)) => out!(
                    "{:>3}. {:>8.4} (ITM {probability:.4}, ITC {:.4})  {}",
                    rank + 1,
                    score,
                    result.itc_similarity,
                    result.path.display()
                )?,
                _ => out!(
                    "{:>3}. {:>8.4}  {}",
                    rank + 1,
                    result.itc_similarity,
                    result.path.display()
                )?,
            }
        }
    }
    for (path, error) in &outcome.left_out {
        if args.json {
            let line = serde_json::json!({
                "path": path.display().to_string(),
                "error": error,
            });
            out!("{line}")?;
        } else {
            eprintln!(
                "error: {} (left out of the re-ranking)",
                photo_error(path, error)
            );
        }
    }
    if outcome.results.is_empty() && outcome.left_out.is_empty() {
        eprintln!("the index is empty");
    }
    Ok(if outcome.left_out.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
