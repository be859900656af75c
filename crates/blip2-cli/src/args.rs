//! Options shared by the subcommands: which model, how to decode, how to read images.

use std::path::PathBuf;

use anyhow::Context;
use blip2_pipeline::{
    Blip2, EarlyStopping, GenerationOptions, LoadOptions, parse_dtype, parse_quantization,
};
use clap::Args;

/// Which checkpoint to load and how.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A checkpoint directory, or a Hugging Face hub id that is downloaded into the
    /// standard cache (HF_HOME, HF_ENDPOINT and HF_HUB_OFFLINE are honoured). Default:
    /// Salesforce/blip2-opt-2.7b for caption, ask and chat; Salesforce/blip2-itm-vit-g
    /// for embed, match, classify and index; the index's own model for search.
    #[arg(long)]
    pub model: Option<String>,

    /// Dtype of the vision encoder and language model: f32, bf16 or f16 (the Q-Former
    /// always runs in f32). Weights are converted once at load time.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    pub dtype: String,

    /// Number of CPU threads for the model, 1 to 1024 (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,

    /// Drop the vision encoder's f32 weights from memory layer by layer as it runs, and
    /// the Q-Former's after each image, so that peak memory is about the language
    /// model's size alone. Each image reads them back from the file cache.
    #[arg(long)]
    pub low_memory: bool,

    /// Quantize the vision encoder's fully connected layers to 8 bits per output row at
    /// load, and their inputs to 8 bits per token as they run. Faster on CPUs with AVX-512
    /// VNNI; the image features change slightly (the README gives the measured cost).
    #[arg(long)]
    pub vision_int8: bool,
}

/// How to load the language model, for the commands that generate text.
#[derive(Debug, Default, Args)]
pub struct LanguageModelArgs {
    /// Quantize the language model's fully connected layers to 8 or 4 bits. `q8` or `q4`
    /// quantizes when loading, and a file path reads the layers `blip2 quantize` saved.
    /// Decoding gets faster and the layers take about a quarter or an eighth of the
    /// memory. The README gives the measured quality cost.
    #[arg(long, value_name = "q8|q4|FILE")]
    pub quantize: Option<String>,

    /// Give the language model a second copy of its weights in 8 bits per row for
    /// prompts, whose inputs are then quantized per token. Prompts run faster on CPUs
    /// with AVX-512 VNNI, for about one more byte of memory per weight. Decoding keeps
    /// the weights --dtype and --quantize chose.
    #[arg(long)]
    pub prompt_int8: bool,
}

impl ModelArgs {
    /// The checkpoint to load: `--model`, else `default`.
    pub fn name<'a>(&'a self, default: &'a str) -> &'a str {
        self.model.as_deref().unwrap_or(default)
    }

    /// Sets the thread count and loads `--model`, or `default` without it.
    pub fn load(&self, default: &str) -> anyhow::Result<Blip2> {
        self.load_with(&LanguageModelArgs::default(), default)
    }

    /// Like [`ModelArgs::load`], with the language model options in `language`.
    pub fn load_with(&self, language: &LanguageModelArgs, default: &str) -> anyhow::Result<Blip2> {
        let model = self.name(default);
        set_threads(self.threads)?;
        let mut options = LoadOptions {
            dtype: parse_dtype(&self.dtype)?,
            low_memory: self.low_memory,
            vision_int8: self.vision_int8,
            prompt_int8: language.prompt_int8,
            ..LoadOptions::default()
        };
        match language.quantize.as_deref() {
            Some(name @ ("q8" | "q4")) => options.quantize = Some(parse_quantization(name)?),
            Some(path) => {
                let file = PathBuf::from(path);
                anyhow::ensure!(
                    file.is_file(),
                    "--quantize {path:?}: expected q8, q4 or a file written by `blip2 quantize`, \
                     and {}",
                    if file.is_dir() {
                        "this is a directory"
                    } else {
                        "no such file exists"
                    }
                );
                options.quantized_weights = Some(file);
            }
            None => {}
        }
        Blip2::from_pretrained(model, &options)
            .with_context(|| format!("cannot load model {model}"))
    }
}

/// The largest `--threads` value accepted: each thread reserves a stack, and far more
/// threads than cores exhaust memory before they help.
const MAX_THREADS: usize = 1024;

/// Sets the number of threads the model uses, before any model code runs.
pub fn set_threads(threads: Option<usize>) -> anyhow::Result<()> {
    if let Some(threads) = threads {
        anyhow::ensure!(
            (1..=MAX_THREADS).contains(&threads),
            "--threads {threads} is out of range: use 1 to {MAX_THREADS} (more threads than \
             CPU cores only adds overhead)"
        );
        // candle sizes its thread pools from this variable when they are first used,
        // which is after this point; no other thread exists yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    }
    Ok(())
}

/// The default checkpoint of the commands that generate text.
pub const DEFAULT_CAPTION_MODEL: &str = "Salesforce/blip2-opt-2.7b";
/// The default checkpoint of the commands that embed and match.
pub const DEFAULT_RETRIEVAL_MODEL: &str = "Salesforce/blip2-itm-vit-g";

/// Decoding settings; unset ones come from the checkpoint's generation_config.json.
#[derive(Debug, Args)]
pub struct DecodingArgs {
    /// Beam search with this many beams (1 is greedy search).
    #[arg(long)]
    pub num_beams: Option<usize>,

    /// Most tokens to generate (default: generation_config.json's max_new_tokens, else 30).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,

    /// Fewest tokens to generate before an end-of-sequence token is allowed.
    #[arg(long)]
    pub min_new_tokens: Option<usize>,

    /// Penalty on tokens already present (1.0 disables; 1.5 is a strong penalty).
    #[arg(long)]
    pub repetition_penalty: Option<f32>,

    /// Exponent of beam search's length normalisation (above 0 favours longer texts).
    #[arg(long, allow_negative_numbers = true)]
    pub length_penalty: Option<f32>,

    /// Forbid repeating any n-gram of this many tokens (0 disables).
    #[arg(long)]
    pub no_repeat_ngram_size: Option<usize>,

    /// Number of texts to return per image (at most --num-beams).
    #[arg(long)]
    pub num_return_sequences: Option<usize>,

    /// Beam search stops an image once --num-beams texts are finished.
    #[arg(long)]
    pub early_stopping: bool,

    /// Sample tokens instead of searching (nucleus sampling with --top-p, --top-k,
    /// --temperature; seeded by --seed, so runs repeat).
    #[arg(long)]
    pub sample: bool,

    /// Softmax temperature when sampling (below 1 is more conservative).
    #[arg(long, requires = "sample")]
    pub temperature: Option<f32>,

    /// Sample only among the this many most likely tokens (0 disables; default 50).
    #[arg(long, requires = "sample")]
    pub top_k: Option<usize>,

    /// Sample only among the most likely tokens whose probabilities add up to this (0 to 1).
    #[arg(long, requires = "sample")]
    pub top_p: Option<f32>,

    /// Seed of the sampler's random numbers.
    #[arg(long, default_value_t = 0, requires = "sample")]
    pub seed: u64,
}

impl DecodingArgs {
    /// The model's defaults with these overrides applied.
    pub fn options(&self, blip2: &Blip2) -> anyhow::Result<GenerationOptions> {
        let mut options = blip2.default_generation_options();
        if let Some(v) = self.num_beams {
            options.num_beams = v;
        }
        if let Some(v) = self.max_new_tokens {
            options.max_new_tokens = v;
        }
        if let Some(v) = self.min_new_tokens {
            options.min_new_tokens = v;
        }
        if let Some(v) = self.repetition_penalty {
            options.repetition_penalty = v;
        }
        if let Some(v) = self.length_penalty {
            options.length_penalty = v;
        }
        if let Some(v) = self.no_repeat_ngram_size {
            options.no_repeat_ngram_size = v;
        }
        if let Some(v) = self.num_return_sequences {
            options.num_return_sequences = v;
        }
        if self.early_stopping {
            options.early_stopping = EarlyStopping::Always;
        }
        if self.sample {
            options.do_sample = true;
            options.seed = self.seed;
        }
        if let Some(v) = self.temperature {
            options.temperature = v;
        }
        if let Some(v) = self.top_k {
            options.top_k = v;
        }
        if let Some(v) = self.top_p {
            options.top_p = v;
        }
        options
            .validate()
            .map_err(|message| anyhow::anyhow!("invalid decoding options: {message}"))?;
        Ok(options)
    }
}

/// The prompt around questions.
#[derive(Debug, Args)]
pub struct QuestionArgs {
    /// Prompt template; `{}` is replaced by the question.
    #[arg(long, default_value = blip2_pipeline::DEFAULT_QUESTION_TEMPLATE)]
    pub template: String,
}

impl QuestionArgs {
    /// The checked template.
    pub fn template(&self) -> anyhow::Result<blip2_pipeline::QuestionTemplate> {
        Ok(blip2_pipeline::QuestionTemplate::new(&self.template)?)
    }
}

/// How images are read.
#[derive(Debug, Args)]
pub struct ImageArgs {
    /// Ignore the EXIF orientation tag (the reference implementation ignores it; by
    /// default photos are turned the way a viewer shows them).
    #[arg(long)]
    pub no_exif_orientation: bool,

    /// Largest image accepted, in pixels (width × height), checked on the file's header
    /// before it is decoded; the default is where Pillow raises DecompressionBombError.
    /// Raise it only for trusted files.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 2 * blip2_image::PIL_MAX_IMAGE_PIXELS,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub max_pixels: u64,
}

impl ImageArgs {
    /// Decoding options for the image crate.
    pub fn load_options(&self) -> blip2_image::LoadOptions {
        blip2_image::LoadOptions {
            apply_exif_orientation: !self.no_exif_orientation,
            max_pixels: self.max_pixels,
        }
    }

    /// Decodes one image file.
    pub fn load(&self, path: &std::path::Path) -> anyhow::Result<blip2_image::RgbImage> {
        Ok(blip2_image::load_image(path, &self.load_options())?)
    }
}
