//! `blip2 quantize`: quantize a checkpoint's language model once, save it, and measure
//! what quantization costs against the float32 model.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use blip2_pipeline::{Blip2, LoadOptions, parse_quantization};
use clap::Args;

use crate::args::{DEFAULT_CAPTION_MODEL, ImageArgs, set_threads};
use crate::output::{out, plural};

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// A captioning checkpoint directory or hub id (default: Salesforce/blip2-opt-2.7b).
    #[arg(long)]
    pub model: Option<String>,

    /// Code width: q8 (8 bits per weight) or q4 (4 bits).
    #[arg(long, default_value = "q4", value_parser = ["q8", "q4"])]
    pub kind: String,

    /// Write the quantized layers to this safetensors file; other commands then load it
    /// with `--quantize FILE` instead of quantizing at every start. An existing file is
    /// replaced only if it is an earlier output of this command.
    #[arg(long, short)]
    pub output: Option<PathBuf>,

    /// Photos to measure the quality cost on: for each, the quantized model's next-token
    /// logits are compared with the float32 model's along the float32 greedy caption.
    pub images: Vec<PathBuf>,

    /// Also quantize the vision encoder to 8 bits per row (as `--vision-int8` does) in the
    /// measured model, so the figures include its cost. The saved file contains the
    /// language model only.
    #[arg(long)]
    pub vision_int8: bool,

    /// Also give the measured model 8-bit prompt weights (as `--prompt-int8` does), so
    /// the figures include their cost.
    #[arg(long)]
    pub prompt_int8: bool,

    /// Caption positions compared per photo.
    #[arg(long, default_value_t = 32)]
    pub positions: usize,

    /// Number of CPU threads, 1 to 1024 (default: all cores).
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
    if let Some(output) = &args.output {
        check_output(output, &args.images)?;
    }
    set_threads(args.threads)?;
    let model = args.model.as_deref().unwrap_or(DEFAULT_CAPTION_MODEL);
    let kind = parse_quantization(&args.kind)?;
    let options = LoadOptions {
        quantize: Some(kind),
        vision_int8: args.vision_int8,
        prompt_int8: args.prompt_int8,
        ..LoadOptions::default()
    };
    let mut quantized = Blip2::from_pretrained(model, &options)
        .with_context(|| format!("cannot load model {model}"))?;
    if let Some(output) = &args.output {
        let layers = quantized.save_quantized_language_model(output)?;
        let bytes = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
        out!(
            "wrote {}: {} {} layer{}, {}",
            output.display(),
            layers,
            kind.name(),
            plural(layers),
            human_size(bytes)
        )?;
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
        let agreement = reference
            .compare_language_models(&quantized, &photos, args.positions)
            .with_context(|| format!("cannot compare over --positions {}", args.positions))?;
        out!(
            "{} against float32 over {} position{} ({} photo{}): greedy agreement {:.1}% ({}/{}); \
             logit error max {:.4}, mean {:.4}; float32 logits reach {:.2}, and their top two are \
             {:.4} apart on average",
            measured_name(kind.name(), args.vision_int8, args.prompt_int8),
            agreement.positions,
            plural(agreement.positions),
            photos.len(),
            plural(photos.len()),
            100.0 * agreement.greedy_agreement(),
            agreement.same_top_token,
            agreement.positions,
            agreement.max_abs_error,
            agreement.mean_abs_error(),
            agreement.max_abs_logit,
            agreement.mean_top_gap()
        )?;
    }
    if photos.is_empty() {
        eprintln!("no photo could be read, so nothing was measured");
    }
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Returns the name of what was measured: the code width, and the 8-bit stages if any.
fn measured_name(kind: &str, vision_int8: bool, prompt_int8: bool) -> String {
    let mut name = kind.to_owned();
    if vision_int8 {
        name.push_str(" with int8 vision");
    }
    if prompt_int8 {
        name.push_str(if vision_int8 {
            " and int8 prompts"
        } else {
            " with int8 prompts"
        });
    }
    name
}

/// Refuses an output path whose file must not be replaced: anything but a new file or an
/// earlier file of quantized layers (a checkpoint's weights, a photo, a device, a link).
fn check_output(output: &Path, images: &[PathBuf]) -> anyhow::Result<()> {
    let given = output.display();
    if output.as_os_str().to_string_lossy().ends_with('/') || output.is_dir() {
        let folder = given.to_string();
        anyhow::bail!(
            "--output {given} is a directory; give a file name such as {}/model.q4.safetensors",
            folder.trim_end_matches('/')
        );
    }
    let parent = match output.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    anyhow::ensure!(
        parent.is_dir(),
        "--output {given}: directory {} does not exist",
        parent.display()
    );
    let Ok(metadata) = std::fs::symlink_metadata(output) else {
        return Ok(());
    };
    anyhow::ensure!(
        metadata.file_type().is_file(),
        "--output {given} exists and is not a regular file (a link, device or pipe); give \
         another name"
    );
    let output_canonical = output.canonicalize().ok();
    if images
        .iter()
        .any(|image| image.canonicalize().ok() == output_canonical)
    {
        anyhow::bail!("--output {given} is one of the photos to measure; give another name");
    }
    anyhow::ensure!(
        blip2_pipeline::is_quantized_file(output),
        "--output {given} exists and is not a file of quantized layers; remove it or give \
         another name (this command replaces only its own earlier output)"
    );
    Ok(())
}

/// `bytes` in the largest unit that keeps the number at least 1.
fn human_size(bytes: u64) -> String {
    match bytes {
        0..1_000 => format!("{bytes} bytes"),
        1_000..1_000_000 => format!("{:.1} kB", bytes as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", bytes as f64 / 1e6),
        _ => format!("{:.2} GB", bytes as f64 / 1e9),
    }
}
