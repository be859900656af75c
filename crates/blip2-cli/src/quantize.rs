//! `blip2 quantize`: quantize a checkpoint's language model once, save it, and measure
//! what quantization costs against the float32 model.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use blip2_pipeline::{Blip2, LoadOptions, parse_quantization};
use clap::Args;

use crate::args::{DEFAULT_CAPTION_MODEL, ImageArgs, set_threads};

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// A captioning checkpoint directory or hub id (default: Salesforce/blip2-opt-2.7b).
    #[arg(long)]
    pub model: Option<String>,

    /// Code width: q8 (8 bits per weight) or q4 (4 bits).
    #[arg(long, default_value = "q4", value_parser = ["q8", "q4"])]
    pub kind: String,

    /// Write the quantized layers to this safetensors file; other commands then load it
    /// with `--quantize FILE` instead of quantizing at every start.
    #[arg(long, short)]
    pub output: Option<PathBuf>,

    /// Photos to measure the quality cost on: for each, the quantized model's next-token
    /// logits are compared with the float32 model's along the float32 greedy caption.
    pub images: Vec<PathBuf>,

    /// Caption positions compared per photo.
    #[arg(long, default_value_t = 32)]
    pub positions: usize,

    /// Number of CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,

    #[command(flatten)]
    pub image: ImageArgs,
}

/// Runs `blip2 quantize`; exits with failure when a photo could not be read.
pub fn run(args: QuantizeArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.output.is_some() || !args.images.is_empty(),
        "nothing to do: give --output FILE to save the quantized layers, photos to measure \
         the quality cost, or both"
    );
    anyhow::ensure!(args.positions > 0, "--positions must be at least 1");
    set_threads(args.threads)?;
    let model = args.model.as_deref().unwrap_or(DEFAULT_CAPTION_MODEL);
    let kind = parse_quantization(&args.kind)?;
    let options = LoadOptions {
        quantize: Some(kind),
        ..LoadOptions::default()
    };
    let mut quantized = Blip2::from_pretrained(model, &options)
        .with_context(|| format!("cannot load model {model}"))?;
    if let Some(output) = &args.output {
        let layers = quantized.save_quantized_language_model(output)?;
        let bytes = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
        println!(
            "wrote {}: {layers} {} layers, {:.1} MB",
            output.display(),
            args.kind,
            bytes as f64 / 1e6
        );
    }
    if args.images.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }

    let load_options = args.image.load_options();
    let mut photos = Vec::new();
    let mut failures = 0;
    for path in &args.images {
        match blip2_image::load_image(path, &load_options) {
            Ok(photo) => photos.push(photo),
            Err(error) => {
                eprintln!("skipped: {error}");
                failures += 1;
            }
        }
    }
    if !photos.is_empty() {
        // The float32 model reads the same mapped checkpoint, so its weights share memory
        // with the first load's vision encoder and Q-Former.
        let reference = Blip2::from_pretrained(model, &LoadOptions::default())
            .with_context(|| format!("cannot load model {model}"))?;
        let agreement = reference.compare_language_models(&quantized, &photos, args.positions)?;
        println!(
            "{} against float32 over {} positions ({} photos): greedy agreement {:.1}% ({}/{}); \
             logit error max {:.4}, mean {:.4}; float32 logits reach {:.2}, and their top two are \
             {:.4} apart on average",
            args.kind,
            agreement.positions,
            photos.len(),
            100.0 * agreement.greedy_agreement(),
            agreement.same_top_token,
            agreement.positions,
            agreement.max_abs_error,
            agreement.mean_abs_error(),
            agreement.max_abs_logit,
            agreement.mean_top_gap()
        );
    }
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
