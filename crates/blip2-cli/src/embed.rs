//! `blip2 embed`: save image (and text) features to a safetensors or NPY file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use candle_core::{DType, Tensor};
use clap::Args;

use crate::args::{DEFAULT_RETRIEVAL_MODEL, ImageArgs, ModelArgs};

/// Arguments of `blip2 embed`.
#[derive(Debug, Args)]
#[command(
    after_help = "Tensors (names as transformers calls them): pixel_values [n, 3, H, W]; \
vision_last_hidden_state [n, tokens, width]; qformer_last_hidden_state [n, queries, hidden]; with a \
retrieval checkpoint also image_embeds [n, queries, dim] (normalised) and, for --text, text_embeds \
[texts, dim] (normalised). A .safetensors file holds them all, with the image paths and texts in its \
metadata; a .npy path writes one NPY file per tensor next to it (features.npy -> \
features.pixel_values.npy, ...) and features.inputs.json with the image paths and texts."
)]
pub struct EmbedArgs {
    /// Image files.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,

    /// Output file: NAME.safetensors, or NAME.npy for one NPY file per tensor.
    #[arg(short, long)]
    pub output: PathBuf,

    /// Texts to embed as well (needs a retrieval checkpoint); may be repeated.
    #[arg(long)]
    pub text: Vec<String>,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub image_args: ImageArgs,
}

enum Format {
    Safetensors,
    Npy,
}

fn output_format(path: &Path) -> anyhow::Result<Format> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => Ok(Format::Safetensors),
        Some("npy") => Ok(Format::Npy),
        _ => anyhow::bail!(
            "--output {} must end in .safetensors or .npy",
            path.display()
        ),
    }
}

/// Runs `blip2 embed`; fails when any image could not be read or any text is empty (the
/// others are saved).
pub fn run(args: EmbedArgs) -> anyhow::Result<ExitCode> {
    let format = output_format(&args.output)?;
    let blip2 = args.model.load(DEFAULT_RETRIEVAL_MODEL)?;
    let has_projections = blip2.model().retrieval_heads().is_ok();
    if !args.text.is_empty() {
        blip2
            .model()
            .retrieval_heads()
            .context("--text needs text embeddings")?;
    }

    let mut pixels = Vec::new();
    let mut embedded = Vec::new();
    let mut failures = 0;
    let mut texts: Vec<&str> = Vec::new();
    for (i, text) in args.text.iter().enumerate() {
        if text.trim().is_empty() {
            failures += 1;
            eprintln!(
                "error: --text {} ({text:?}) is empty; give words to embed",
                i + 1
            );
        } else {
            texts.push(text);
        }
    }
    for path in &args.images {
        let loaded = args
            .image_args
            .load(path)
            .and_then(|image| Ok(blip2_image::preprocess(&image, blip2.image_config())?));
        match loaded {
            Ok(values) => {
                pixels.push(values);
                embedded.push(path.display().to_string());
            }
            Err(error) => {
                failures += 1;
                eprintln!("error: {}", crate::error_message(&error));
            }
        }
    }
    anyhow::ensure!(!pixels.is_empty(), "no image could be read");

    let pixel_values = blip2.stack_pixels(&pixels)?;
    let features = blip2.encode_images(&pixel_values)?;
    let mut tensors: Vec<(&str, Tensor)> = vec![
        ("pixel_values", pixel_values),
        ("vision_last_hidden_state", features.vision.clone()),
        ("qformer_last_hidden_state", features.queries.clone()),
    ];
    if has_projections {
        tensors.push(("image_embeds", blip2.image_embeds(&features)?));
    }
    if !texts.is_empty() {
        tensors.push(("text_embeds", blip2.text_embeds(&texts)?));
    }
    let tensors: Vec<(&str, Tensor)> = tensors
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_dtype(DType::F32)?)))
        .collect::<anyhow::Result<_>>()?;

    match format {
        Format::Safetensors => {
            let metadata = HashMap::from([
                ("images".to_string(), serde_json::to_string(&embedded)?),
                ("texts".to_string(), serde_json::to_string(&texts)?),
            ]);
            blip2_pipeline::write_safetensors(
                tensors.iter().map(|(n, t)| (*n, t)),
                Some(metadata),
                &args.output,
            )
            .with_context(|| format!("cannot write {}", args.output.display()))?;
            eprintln!(
                "wrote {} tensors to {}",
                tensors.len(),
                args.output.display()
            );
        }
        Format::Npy => {
            let stem = args.output.with_extension("");
            for (name, tensor) in &tensors {
                let path = PathBuf::from(format!("{}.{name}.npy", stem.display()));
                let values = tensor.flatten_all()?.to_vec1::<f32>()?;
                blip2_pipeline::index::write_f32_npy(&path, tensor.dims(), &values)?;
                eprintln!("wrote {}", path.display());
            }
            // NPY files carry no metadata, so the images and texts behind the rows (the
            // safetensors output's metadata) go to a file of their own.
            let path = PathBuf::from(format!("{}.inputs.json", stem.display()));
            let inputs = serde_json::json!({ "images": embedded, "texts": texts });
            std::fs::write(&path, format!("{inputs}\n"))
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(if failures > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
