//! `blip2 caption`: one caption (or prompt continuation) per image.

use std::path::PathBuf;
use std::process::ExitCode;

use blip2_pipeline::{Blip2, Caption, GenerationOptions};
use clap::Args;
use serde::Serialize;

use crate::args::{DecodingArgs, ImageArgs, LanguageModelArgs, ModelArgs};
use crate::output::{OutputError, batch_status, out};

/// Arguments of `blip2 caption`.
#[derive(Debug, Args)]
pub struct CaptionArgs {
    /// Image files (JPEG, PNG, WebP, GIF, BMP, TIFF).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,

    /// Text the caption continues, for example "a photo of" or
    /// "Question: what is in the picture? Answer:".
    #[arg(long, default_value = "")]
    pub prompt: String,

    /// Images encoded and decoded together (larger batches use more memory).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    pub batch_size: u16,

    /// Print one JSON object per image (JSON Lines) with the text and the generated token ids.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub language: LanguageModelArgs,

    #[command(flatten)]
    pub decoding: DecodingArgs,

    #[command(flatten)]
    pub image: ImageArgs,
}

/// One line of `--json` output.
#[derive(Debug, Serialize)]
struct JsonLine<'a> {
    image: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    caption: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_ids: Option<&'a [u32]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ended_with_eos: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    score: Option<f32>,
    /// All returned texts when more than one was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    alternatives: Option<Vec<JsonAlternative<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct JsonAlternative<'a> {
    caption: &'a str,
    token_ids: &'a [u32],
    score: Option<f32>,
}

fn print_result(
    path: &std::path::Path,
    result: &Result<Vec<Caption>, String>,
    json: bool,
    several: bool,
) -> Result<(), OutputError> {
    let image = path.display().to_string();
    match (result, json) {
        (Ok(captions), true) => {
            let best = &captions[0];
            let line = JsonLine {
                image,
                caption: Some(&best.text),
                token_ids: Some(&best.token_ids),
                ended_with_eos: Some(best.ended_with_eos),
                score: best.score,
                alternatives: (captions.len() > 1).then(|| {
                    captions
                        .iter()
                        .map(|c| JsonAlternative {
                            caption: &c.text,
                            token_ids: &c.token_ids,
                            score: c.score,
                        })
                        .collect()
                }),
                error: None,
            };
            out!("{}", serde_json::to_string(&line).unwrap_or_default())?;
        }
        (Err(error), true) => {
            let line = JsonLine {
                image,
                caption: None,
                token_ids: None,
                ended_with_eos: None,
                score: None,
                alternatives: None,
                error: Some(error.clone()),
            };
            out!("{}", serde_json::to_string(&line).unwrap_or_default())?;
        }
        (Ok(captions), false) => {
            for caption in captions {
                if several {
                    out!("{image}: {}", caption.text)?;
                } else {
                    out!("{}", caption.text)?;
                }
            }
        }
        (Err(error), false) => eprintln!("error: {error}"),
    }
    Ok(())
}

/// Captions one batch, with one result per image: an image that cannot be read gets its
/// own error. An error of the model itself would be the same for every image, so it is
/// returned as the error of the whole run instead.
fn caption_batch(
    blip2: &Blip2,
    paths: &[PathBuf],
    prompt: &str,
    options: &GenerationOptions,
    image_args: &ImageArgs,
) -> anyhow::Result<Vec<Result<Vec<Caption>, String>>> {
    let load_options = image_args.load_options();
    let mut results: Vec<Option<Result<Vec<Caption>, String>>> = vec![None; paths.len()];
    let mut good = Vec::new();
    let mut pixels = Vec::new();
    for (i, path) in paths.iter().enumerate() {
        let loaded = blip2_image::load_image(path, &load_options)
            .map_err(|e| e.to_string())
            .and_then(|image| {
                blip2_image::preprocess(&image, blip2.image_config()).map_err(|e| e.to_string())
            });
        match loaded {
            Ok(values) => {
                good.push(i);
                pixels.push(values);
            }
            Err(error) => results[i] = Some(Err(error)),
        }
    }
    if !good.is_empty() {
        let prompts = vec![prompt; good.len()];
        let tensor = blip2.stack_pixels(&pixels)?;
        let captions = blip2.generate(&tensor, &prompts, options)?;
        for (i, captions) in good.iter().zip(captions) {
            results[*i] = Some(Ok(captions));
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err("not processed".into())))
        .collect())
}

/// Runs `blip2 caption`; exits with failure when any image could not be captioned.
pub fn run(args: CaptionArgs) -> anyhow::Result<ExitCode> {
    // Only whitespace would be fed to the model as a prompt, which is surely not meant.
    anyhow::ensure!(
        args.prompt.is_empty() || !args.prompt.trim().is_empty(),
        "--prompt {:?} is only whitespace; give words for the caption to continue, or leave \
         --prompt out for a plain caption",
        args.prompt
    );
    let blip2 = args
        .model
        .load_with(&args.language, crate::args::DEFAULT_CAPTION_MODEL)?;
    let options = args.decoding.options(&blip2)?;
    // Checked once here: a checkpoint without a language model, or a prompt and
    // --max-new-tokens that do not fit its positions, would fail every image alike.
    blip2.model().language_model()?;
    blip2.check_prompt_fits(&args.prompt, &options)?;
    let several = args.images.len() > 1;
    let progress = (several && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
        let bar = indicatif::ProgressBar::new(args.images.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} images, {elapsed} elapsed, ~{eta} left",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });

    let mut failures = 0usize;
    for chunk in args.images.chunks(args.batch_size as usize) {
        let results = caption_batch(&blip2, chunk, &args.prompt, &options, &args.image)
            .inspect_err(|_| {
                if let Some(bar) = &progress {
                    bar.finish_and_clear();
                }
            })?;
        for (path, result) in chunk.iter().zip(&results) {
            failures += usize::from(result.is_err());
            let print = || print_result(path, result, args.json, several);
            let printed = match &progress {
                Some(bar) => bar.suspend(print),
                None => print(),
            };
            if printed.is_err()
                && let Some(bar) = &progress
            {
                bar.finish_and_clear();
            }
            printed?;
        }
        if let Some(bar) = &progress {
            bar.inc(chunk.len() as u64);
        }
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    Ok(batch_status(
        failures,
        args.images.len(),
        "images",
        "captioned",
    ))
}
