//! The high-level API: load a checkpoint once, then caption images or answer prompts.

use std::path::{Path, PathBuf};

use blip2_image::{ImageProcessorConfig, PixelValues, RgbImage};
use blip2_lm::generation::{self, GenerationConfig, GenerationOptions, PromptInput};
use candle_core::{DType, Device, Tensor};

use crate::checkpoint::CheckpointFiles;
use crate::model::{Blip2Model, ImageFeatures, QuantizedStages};
use crate::tokenizer::TextTokenizer;
use crate::{Blip2Config, Error, Result};

/// Captions get at most this many new tokens unless the checkpoint's
/// `generation_config.json` or the caller says otherwise (LAVIS uses 30 for captions).
pub const DEFAULT_MAX_NEW_TOKENS: usize = 30;

/// How to load a checkpoint.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Dtype of the vision encoder and the language model (`f32`, `bf16` or `f16`);
    /// the Q-Former always runs in `f32`.
    pub dtype: DType,
    /// Where the weights live.
    pub device: Device,
    /// Quantize the language model's fully connected layers to 8 or 4 bits after
    /// loading (CPU only); the vision encoder and the Q-Former stay as they are.
    pub quantize: Option<blip2_lm::QuantKind>,
    /// Read the language model's quantized layers from a file written by
    /// [`Blip2::save_quantized_language_model`] (`blip2 quantize`) instead of quantizing
    /// at load. Cannot be combined with `quantize`.
    pub quantized_weights: Option<PathBuf>,
    /// Keep the image side's weights out of this process's memory once they have run:
    /// the vision encoder drops each layer's weights right after the layer, the Q-Former
    /// its weights after each image. The language model stays resident. Applies to `f32`
    /// weights read in place from the checkpoint. Peak memory falls to about the language
    /// model's size. Every image reads the image side's weights back from the operating
    /// system's file cache as page faults, which cost little next to the products.
    pub low_memory: bool,
    /// Quantize the vision encoder's fully connected layers to 8 bits per output row,
    /// with their inputs quantized per token as they run (CPU only). Faster on CPUs with
    /// AVX-512 VNNI; it changes the image features slightly (see the README).
    pub vision_int8: bool,
    /// Give the language model's fully connected layers a second copy of their weights
    /// in 8 bits per row, used with inputs quantized per token for prompts (CPU only).
    /// Prompts run faster on CPUs with AVX-512 VNNI, for about one more byte of memory
    /// per weight. Decoding keeps the weights `dtype` and `quantize` chose.
    pub prompt_int8: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            quantize: None,
            quantized_weights: None,
            low_memory: false,
            vision_int8: false,
            prompt_int8: false,
        }
    }
}

/// Parses `q8` or `q4`.
pub fn parse_quantization(name: &str) -> Result<blip2_lm::QuantKind> {
    blip2_lm::QuantKind::from_name(name).ok_or_else(|| {
        Error::InvalidRequest(format!("unknown quantization {name:?}; expected q8 or q4"))
    })
}

/// Parses `f32`, `bf16` or `f16`.
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => Err(Error::InvalidRequest(format!(
            "unknown dtype {other:?}; expected f32, bf16 or f16"
        ))),
    }
}

/// One generated text.
#[derive(Debug, Clone, PartialEq)]
pub struct Caption {
    /// The decoded text, special tokens removed and surrounding whitespace trimmed
    /// (the BLIP-2 OPT checkpoints end captions with a newline token).
    pub text: String,
    /// The generated token ids, including the end-of-sequence token when one ended it.
    pub token_ids: Vec<u32>,
    /// Whether an end-of-sequence token ended the text (rather than the length limit).
    pub ended_with_eos: bool,
    /// Beam search score (length-normalised log-probability), when beams were used.
    pub score: Option<f32>,
}

/// A loaded BLIP-2 checkpoint with its tokenizer and processor settings.
#[derive(Debug)]
pub struct Blip2 {
    model: Blip2Model,
    tokenizer: TextTokenizer,
    image_config: ImageProcessorConfig,
    generation_config: GenerationConfig,
    files: CheckpointFiles,
    device: Device,
}

impl Blip2 {
    /// Loads a checkpoint from a local directory or, for an `owner/name` id that names
    /// nothing on disk, from the Hugging Face hub (see [`crate::hub`]).
    pub fn from_pretrained(model: &str, options: &LoadOptions) -> Result<Self> {
        let path = Path::new(model);
        // An existing file such as `dir/model.safetensors` also looks like an `owner/name`
        // id, so it is reported as a file rather than looked up on the hub.
        if path.exists() || !crate::hub::looks_like_repo_id(model) {
            return Self::from_dir(path, options);
        }
        let dir = crate::hub::fetch_checkpoint(model)?;
        Self::from_dir(&dir, options)
    }

    /// Loads the checkpoint in `dir`.
    pub fn from_dir(dir: &Path, options: &LoadOptions) -> Result<Self> {
        let files = CheckpointFiles::discover(dir)?;
        let config = Blip2Config::from_file(&files.config)?;
        let image_config = ImageProcessorConfig::from_json_file(&files.image_processor)?;
        let generation_config: GenerationConfig = match &files.generation_config {
            Some(path) => crate::config::read_json(path)?,
            None => GenerationConfig::default(),
        };
        for field in generation_config.unsupported_fields() {
            tracing::warn!(
                field,
                "generation_config.json sets a field this crate ignores"
            );
        }
        let bos = config.text_config.bos_token_id();
        let tokenizer =
            TextTokenizer::load(&files.tokenizer, files.tokenizer_config.as_deref(), bos)?;
        let stages = QuantizedStages {
            vision: options.vision_int8,
            language: options.quantize.is_some() || options.quantized_weights.is_some(),
        };
        let mut model = Blip2Model::load_to_quantize(
            &config,
            &files.config,
            &files.weights,
            options.dtype,
            &options.device,
            stages,
        )?;
        if options.vision_int8 {
            model.quantize_vision_encoder()?;
        }
        match (options.quantize, &options.quantized_weights) {
            (Some(_), Some(_)) => {
                return Err(Error::InvalidRequest(
                    "quantize at load or read quantized weights from a file, not both".into(),
                ));
            }
            (Some(kind), None) => {
                model.quantize_language_model(kind)?;
            }
            (None, Some(path)) => {
                model.load_quantized_language_model(path)?;
            }
            (None, None) => {}
        }
        if options.prompt_int8 {
            model.add_int8_prompt_weights()?;
        }
        model.set_release_weights_after_use(options.low_memory);
        Ok(Self {
            model,
            tokenizer,
            image_config,
            generation_config,
            files,
            device: options.device.clone(),
        })
    }

    /// The network.
    pub fn model(&self) -> &Blip2Model {
        &self.model
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// The image processor settings.
    pub fn image_config(&self) -> &ImageProcessorConfig {
        &self.image_config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The checkpoint's files.
    pub fn files(&self) -> &CheckpointFiles {
        &self.files
    }

    /// Decoding options from the checkpoint's `generation_config.json`, with at most
    /// [`DEFAULT_MAX_NEW_TOKENS`] new tokens when the file sets no limit.
    pub fn default_generation_options(&self) -> GenerationOptions {
        let mut options =
            GenerationOptions::from_config(&self.generation_config, DEFAULT_MAX_NEW_TOKENS);
        if options.eos_token_ids.is_empty() {
            options
                .eos_token_ids
                .extend(self.model.config().text_config.eos_token_id());
        }
        options
    }

    /// Preprocesses decoded images into `pixel_values` `[batch, 3, height, width]`.
    pub fn pixel_values(&self, images: &[RgbImage]) -> Result<Tensor> {
        let items = images
            .iter()
            .map(|image| blip2_image::preprocess(image, &self.image_config))
            .collect::<std::result::Result<Vec<PixelValues>, _>>()?;
        self.stack_pixels(&items)
    }

    /// Stacks preprocessed images into one tensor.
    pub fn stack_pixels(&self, items: &[PixelValues]) -> Result<Tensor> {
        let batch = blip2_image::PixelBatch::stack(items)?;
        Ok(Tensor::from_vec(
            batch.data,
            batch.shape.to_vec(),
            &self.device,
        )?)
    }

    /// Runs the image side (vision encoder, Q-Former, projection).
    pub fn encode_images(&self, pixel_values: &Tensor) -> Result<ImageFeatures> {
        self.model.encode_images(pixel_values)
    }

    /// The prompt's token ids. Without a prompt, transformers starts decoder-only models
    /// from BOS alone; an encoder-decoder has no BOS and encodes the empty text (its
    /// end-of-sequence token).
    fn prompt_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        match self.model.config().text_config.bos_token_id() {
            Some(bos)
                if prompt.is_empty() && !self.model.language_model()?.is_encoder_decoder() =>
            {
                Ok(vec![bos])
            }
            _ => self.tokenizer.encode(prompt),
        }
    }

    /// Checks that a prompt of `prompt_tokens` tokens, the image queries and
    /// `max_new_tokens` fit the language model's positions.
    fn check_length(&self, prompt_tokens: usize, options: &GenerationOptions) -> Result<()> {
        let Some(limit) = self.model.language_model()?.max_sequence_length() else {
            return Ok(());
        };
        let queries = self.model.config().num_query_tokens;
        let needed = queries + prompt_tokens + options.max_new_tokens.saturating_sub(1);
        if needed > limit {
            return Err(Error::InvalidRequest(format!(
                "the prompt has {}; with the {queries} image queries and max_new_tokens {} \
                 the model would need {needed} positions but has {limit}; shorten the prompt or lower max_new_tokens",
                counted(prompt_tokens, "token"),
                options.max_new_tokens
            )));
        }
        Ok(())
    }

    /// Checks that `prompt` fits the language model's positions with `options`.
    pub fn check_prompt_fits(&self, prompt: &str, options: &GenerationOptions) -> Result<()> {
        self.check_length(self.prompt_ids(prompt)?.len(), options)
    }

    /// Generates for one encoded image (a batch of one) and `prompt`, passing the text
    /// to `on_text` as it is decoded; beam search, which settles the text only at the
    /// end, passes it in one piece.
    pub fn generate_streaming(
        &self,
        features: &ImageFeatures,
        prompt: &str,
        options: &GenerationOptions,
        mut on_text: Option<&mut dyn FnMut(&str)>,
    ) -> Result<Caption> {
        let batch = language_inputs(features)?.dim(0)?;
        if batch != 1 {
            return Err(Error::InvalidRequest(format!(
                "streaming takes one image, got {batch}"
            )));
        }
        let mut streamer = crate::chat::TextStreamer::new(&self.tokenizer);
        let mut stream_error = None;
        let mut streamed = false;
        let mut on_token = |_item: usize, token: u32| match streamer.push(token) {
            Ok(Some(piece)) => {
                streamed = true;
                if let Some(callback) = on_text.as_deref_mut() {
                    callback(&piece);
                }
            }
            Ok(None) => {}
            Err(error) => stream_error = Some(error),
        };
        let mut results =
            self.generate_from_features(features, &[prompt], options, Some(&mut on_token))?;
        if let Some(error) = stream_error {
            return Err(error);
        }
        let caption = results
            .pop()
            .and_then(|mut sequences| (!sequences.is_empty()).then(|| sequences.remove(0)))
            .ok_or_else(|| Error::InvalidRequest("generation returned no sequence".into()))?;
        if let Some(callback) = on_text {
            if !streamed {
                callback(&caption.text);
            } else if let Some(rest) = streamer.finish()? {
                callback(&rest);
            }
        }
        Ok(caption)
    }

    /// Answers one question about `image`, wrapped in [`crate::DEFAULT_QUESTION_TEMPLATE`].
    pub fn ask(
        &self,
        image: &RgbImage,
        question: &str,
        options: &GenerationOptions,
    ) -> Result<crate::Answer> {
        crate::Conversation::new(self, image)?.ask(question, options, None)
    }

    /// Builds the language model input for one image: its projected queries followed
    /// by the embedded prompt, and the token sequence the reference's processors see.
    fn prompt_input(
        &self,
        language_inputs: &Tensor,
        prompt: &str,
        options: &GenerationOptions,
    ) -> Result<PromptInput> {
        let config = self.model.config();
        let lm = self.model.language_model()?;
        let ids = self.prompt_ids(prompt)?;
        let queries = language_inputs.dim(0)?;
        self.check_length(ids.len(), options)?;
        let token_ids = Tensor::from_vec(ids.clone(), (1, ids.len()), &self.device)?;
        let token_embeds = lm.embed_tokens(&token_ids)?.squeeze(0)?;
        let embeds = Tensor::cat(&[&language_inputs.to_dtype(lm.dtype())?, &token_embeds], 0)?;
        // The reference's logits processors see the decoder's tokens: the whole prompt (one
        // placeholder per image query) for decoder-only models, the start token otherwise.
        let sequence = match lm.decoder_start_token_id() {
            Some(start) => vec![start],
            None => {
                let mut sequence = Vec::with_capacity(queries + ids.len());
                if let Some(image_token) = config.image_token_index {
                    sequence.extend(std::iter::repeat_n(image_token, queries));
                }
                sequence.extend_from_slice(&ids);
                sequence
            }
        };
        Ok(PromptInput { embeds, sequence })
    }

    /// Generates text for a batch of images that are already encoded.
    ///
    /// `prompts` holds one prompt per image (an empty prompt captions), or is empty for
    /// plain captions of every image. Returns `num_return_sequences` texts per image.
    pub fn generate_from_features(
        &self,
        features: &ImageFeatures,
        prompts: &[&str],
        options: &GenerationOptions,
        on_token: Option<&mut generation::TokenCallback<'_>>,
    ) -> Result<Vec<Vec<Caption>>> {
        self.model.language_model()?;
        options.validate().map_err(Error::InvalidRequest)?;
        let batch = language_inputs(features)?.dim(0)?;
        if !prompts.is_empty() && prompts.len() != batch {
            return Err(Error::InvalidRequest(format!(
                "{} for {}",
                counted(prompts.len(), "prompt"),
                counted(batch, "image")
            )));
        }
        let inputs = (0..batch)
            .map(|i| {
                let prompt = prompts.get(i).copied().unwrap_or("");
                self.prompt_input(&language_inputs(features)?.get(i)?, prompt, options)
            })
            .collect::<Result<Vec<_>>>()?;
        generation::generate(self.model.language_model()?, &inputs, options, on_token)?
            .into_iter()
            .map(|sequences| {
                sequences
                    .into_iter()
                    .map(|g| self.to_caption(g))
                    .collect::<Result<Vec<_>>>()
            })
            .collect()
    }

    /// The `f32` logits `[batch, vocab]` of the first token the language model would
    /// generate for each image and prompt (an empty prompt for a plain caption).
    pub fn first_token_logits(&self, features: &ImageFeatures, prompts: &[&str]) -> Result<Tensor> {
        let batch = language_inputs(features)?.dim(0)?;
        if !prompts.is_empty() && prompts.len() != batch {
            return Err(Error::InvalidRequest(format!(
                "{} for {}",
                counted(prompts.len(), "prompt"),
                counted(batch, "image")
            )));
        }
        let options = GenerationOptions {
            max_new_tokens: 1,
            ..self.default_generation_options()
        };
        let inputs = (0..batch)
            .map(|i| {
                self.prompt_input(
                    &language_inputs(features)?.get(i)?,
                    prompts.get(i).copied().unwrap_or(""),
                    &options,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(generation::first_logits(
            self.model.language_model()?,
            &inputs,
        )?)
    }

    /// Writes the quantized layers of the language model to `path` (see
    /// [`LoadOptions::quantized_weights`]); returns how many layers were written.
    pub fn save_quantized_language_model(&mut self, path: &Path) -> Result<usize> {
        self.model.save_quantized_language_model(path)
    }

    /// Compares the next-token logits of `candidate` (typically this checkpoint with
    /// quantized stages) with this model's, over `positions` greedy steps captioning
    /// each image. Each model reads its own image features, so a quantized vision
    /// encoder's cost is included.
    pub fn compare_language_models(
        &self,
        candidate: &Blip2,
        images: &[RgbImage],
        positions: usize,
    ) -> Result<generation::LogitAgreement> {
        let options = self.default_generation_options();
        let mut agreement = generation::LogitAgreement::default();
        for image in images {
            let prompt = |model: &Blip2| -> Result<PromptInput> {
                let pixels = model.pixel_values(std::slice::from_ref(image))?;
                let features = model.encode_images(&pixels)?;
                model.prompt_input(&language_inputs(&features)?.get(0)?, "", &options)
            };
            let measured = generation::compare_greedy(
                self.model.language_model()?,
                candidate.model.language_model()?,
                &prompt(self)?,
                &prompt(candidate)?,
                positions,
            )?;
            agreement.merge(&measured);
        }
        Ok(agreement)
    }

    /// Captions (or, with prompts, continues the prompts for) a batch of pixel values.
    pub fn generate(
        &self,
        pixel_values: &Tensor,
        prompts: &[&str],
        options: &GenerationOptions,
    ) -> Result<Vec<Vec<Caption>>> {
        let features = self.encode_images(pixel_values)?;
        self.generate_from_features(&features, prompts, options, None)
    }

    /// Captions one decoded image, with an optional prompt; returns the best caption.
    pub fn caption(
        &self,
        image: &RgbImage,
        prompt: Option<&str>,
        options: &GenerationOptions,
    ) -> Result<Caption> {
        let pixels = self.pixel_values(std::slice::from_ref(image))?;
        let prompts: Vec<&str> = prompt.into_iter().collect();
        let mut results = self.generate(&pixels, &prompts, options)?;
        results
            .pop()
            .and_then(|mut sequences| (!sequences.is_empty()).then(|| sequences.remove(0)))
            .ok_or_else(|| Error::InvalidRequest("generation returned no sequence".into()))
    }

    fn to_caption(&self, generated: generation::Generated) -> Result<Caption> {
        let text = self.tokenizer.decode(&generated.tokens)?.trim().to_string();
        Ok(Caption {
            text,
            token_ids: generated.tokens,
            ended_with_eos: generated.ended_with_eos,
            score: generated.score,
        })
    }
}

/// The projected queries of a captioning checkpoint's image features.
fn language_inputs(features: &ImageFeatures) -> Result<&Tensor> {
    features.language_inputs.as_ref().ok_or_else(|| {
        Error::InvalidRequest(
            "these image features come from an image-text retrieval checkpoint, which has no language model"
                .into(),
        )
    })
}

/// Returns `count` and `noun`, with an `s` unless the count is one: "1 token", "2 tokens".
fn counted(count: usize, noun: &str) -> String {
    if count == 1 {
        format!("{count} {noun}")
    } else {
        format!("{count} {noun}s")
    }
}
