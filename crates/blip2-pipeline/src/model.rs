//! The BLIP-2 network: vision encoder and Q-Former, then either a language model
//! (captioning checkpoints) or retrieval heads (image-text matching checkpoints).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use blip2_lm::{LanguageModel, OptModel, T5Model, TextConfig};
use blip2_nn::{ConfigError, Linear};
use blip2_nn::{MappedTensors, Weights};
use blip2_qformer::{QFormer, QFormerSettings, TextEmbeddings};
use blip2_vision::{EvaVisionModel, VisionEncoder};
use candle_core::{DType, Device, Module, Tensor};

use crate::{Blip2Config, Error, Result};

/// What the image side produces for a batch.
#[derive(Debug, Clone)]
pub struct ImageFeatures {
    /// Vision encoder output `[batch, 1 + patches, vision_width]` (after its final layer norm).
    pub vision: Tensor,
    /// Q-Former query outputs `[batch, queries, qformer_width]`, in `f32`.
    pub queries: Tensor,
    /// The language projection's output `[batch, queries, text_hidden_size]`
    /// (captioning checkpoints only).
    pub projection: Option<Tensor>,
    /// Queries projected into the language model's input space
    /// `[batch, queries, embedding_size]`, in the model dtype (captioning checkpoints only).
    pub language_inputs: Option<Tensor>,
}

/// The language model and the projection that feeds it the queries.
struct LanguageHead {
    projection: Linear,
    model: Box<dyn LanguageModel>,
}

/// The parts of an image-text retrieval checkpoint (`Blip2ForImageTextRetrieval`).
#[derive(Debug, Clone)]
pub struct RetrievalHeads {
    /// Word and position embeddings of the Q-Former's text input.
    pub embeddings: TextEmbeddings,
    /// Query outputs → the shared embedding space.
    pub vision_projection: Linear,
    /// Text `[CLS]` output → the shared embedding space.
    pub text_projection: Linear,
    /// Query outputs (after reading the text) → logits of "no match", "match".
    pub itm_head: Linear,
}

impl RetrievalHeads {
    fn load(
        settings: &QFormerSettings,
        embed_dim: usize,
        vb: Weights,
    ) -> candle_core::Result<Self> {
        let hidden = settings.hidden_size;
        Ok(Self {
            embeddings: TextEmbeddings::load(settings, vb.pp("embeddings"))?,
            vision_projection: blip2_nn::linear(hidden, embed_dim, vb.pp("vision_projection"))?,
            text_projection: blip2_nn::linear(hidden, embed_dim, vb.pp("text_projection"))?,
            itm_head: blip2_nn::linear(hidden, 2, vb.pp("itm_head"))?,
        })
    }
}

/// The stages whose fully connected layers are quantized right after loading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuantizedStages {
    /// The vision encoder, 8 bits per output row.
    pub vision: bool,
    /// The language model, at load or from a file.
    pub language: bool,
}

/// A loaded BLIP-2 checkpoint: `Blip2ForConditionalGeneration` (with a language model)
/// or `Blip2ForImageTextRetrieval` (with retrieval heads).
pub struct Blip2Model {
    vision: Box<dyn VisionEncoder>,
    query_tokens: Tensor,
    qformer: QFormer,
    language: Option<LanguageHead>,
    retrieval: Option<RetrievalHeads>,
    config: Blip2Config,
    dtype: DType,
    images_encoded: AtomicUsize,
    mapped: Option<std::sync::Arc<MappedTensors>>,
    release_after_use: bool,
}

impl std::fmt::Debug for Blip2Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blip2Model")
            .field(
                "language_model",
                &self
                    .language
                    .as_ref()
                    .map(|_| self.config.text_config.model_type()),
            )
            .field("retrieval_heads", &self.retrieval.is_some())
            .field("num_query_tokens", &self.config.num_query_tokens)
            .field("dtype", &self.dtype)
            .finish_non_exhaustive()
    }
}

impl Blip2Model {
    /// Builds the model from `config` and the safetensors `weights`.
    ///
    /// The parts present in the weights decide the kind: `language_projection.weight`
    /// means a captioning checkpoint, `itm_head.weight` a retrieval checkpoint. The
    /// vision encoder, language projection and language model are converted to `dtype`;
    /// the query tokens, the Q-Former and the retrieval heads stay in `f32` (transformers
    /// keeps the Q-Former in `f32` for `f16`; this does it for `bf16` too).
    pub fn load(
        config: &Blip2Config,
        config_path: &Path,
        weights: &[PathBuf],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::load_to_quantize(
            config,
            config_path,
            weights,
            dtype,
            device,
            QuantizedStages::default(),
        )
    }

    /// Loads like [`Blip2Model::load`], for stages quantized next (the language model at
    /// load or from a file, the vision encoder per row). Their fully connected layers read
    /// the file's float32 values in place until the quantized weights replace them, so no
    /// converted copy is ever made.
    pub fn load_to_quantize(
        config: &Blip2Config,
        config_path: &Path,
        weights: &[PathBuf],
        dtype: DType,
        device: &Device,
        stages: QuantizedStages,
    ) -> Result<Self> {
        let dir = weights
            .first()
            .and_then(|p| p.parent())
            .unwrap_or(Path::new("."))
            .to_owned();
        let invalid = |source: ConfigError, section: &str| Error::InvalidConfig {
            path: config_path.to_owned(),
            source: source.within(section),
        };
        let vision_settings = config
            .vision_config
            .resolve()
            .map_err(|e| invalid(e, "vision_config"))?;
        let qformer_settings = config
            .qformer_config
            .resolve(vision_settings.hidden_size)
            .map_err(|e| invalid(e, "qformer_config"))?;

        let weights_error = |source: candle_core::Error| Error::Weights {
            dir: dir.clone(),
            source,
        };
        // SAFETY: the files are memory-mapped read-only. candle copies small tensors out
        // at load time; in f32 the fully connected layers read their matrices in place,
        // so the checkpoint files must not be modified while the model is loaded (as
        // with PyTorch's memory-mapped safetensors loading).
        let var_builder =
            unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(weights, dtype, device) }
                .map_err(weights_error)?;
        // In f32 the fully connected layers read their matrices from this mapping; in
        // bf16 they are packed from it.
        let mapped = if device.is_cpu() {
            // SAFETY: as above.
            Some(std::sync::Arc::new(
                unsafe { MappedTensors::open(weights) }.map_err(weights_error)?,
            ))
        } else {
            None
        };
        let vb = Weights::new(var_builder, mapped.clone());

        let has_language = vb.contains_tensor("language_projection.weight");
        let has_retrieval = vb.contains_tensor("itm_head.weight");
        if !has_language && !has_retrieval {
            return Err(Error::Unsupported {
                path: config_path.to_owned(),
                message: format!(
                    "the weights in {} have neither a language model (language_projection.weight) nor \
                     image-text retrieval heads (itm_head.weight); BLIP-2 Blip2ForConditionalGeneration and \
                     Blip2ForImageTextRetrieval checkpoints are supported",
                    dir.display()
                ),
            });
        }

        let in_place = |quantized: bool| {
            if quantized {
                vb.clone().with_matrices_in_place()
            } else {
                vb.clone()
            }
        };
        let vision =
            EvaVisionModel::load(&vision_settings, in_place(stages.vision).pp("vision_model"))
                .map_err(weights_error)?;
        let f32_vb = vb.clone().set_dtype(DType::F32);
        let qformer_width = qformer_settings.hidden_size;
        let query_tokens = f32_vb
            .get((1, config.num_query_tokens, qformer_width), "query_tokens")
            .map_err(weights_error)?;
        let qformer =
            QFormer::load(&qformer_settings, f32_vb.pp("qformer")).map_err(weights_error)?;

        let language_vb = in_place(stages.language);
        let language = if has_language {
            Some(
                load_language(config, config_path, qformer_width, &language_vb).map_err(
                    |e| match e {
                        LoadError::Config(source, section) => invalid(source, section),
                        LoadError::Weights(source) => weights_error(source),
                        LoadError::Other(error) => error,
                    },
                )?,
            )
        } else {
            None
        };
        let retrieval = if has_retrieval {
            if !qformer_settings.has_text_feed_forward {
                return Err(invalid(
                    ConfigError::new(
                        "use_qformer_text_input",
                        "must be true for an image-text retrieval checkpoint (its Q-Former reads text)",
                    ),
                    "qformer_config",
                ));
            }
            Some(
                RetrievalHeads::load(&qformer_settings, config.image_text_hidden_size, f32_vb)
                    .map_err(weights_error)?,
            )
        } else {
            None
        };
        tracing::info!(
            ?dtype,
            language_model = language.as_ref().map(|_| config.text_config.model_type()),
            retrieval = retrieval.is_some(),
            "loaded BLIP-2 weights"
        );
        Ok(Self {
            vision: Box::new(vision),
            query_tokens,
            qformer,
            language,
            retrieval,
            config: config.clone(),
            dtype,
            images_encoded: AtomicUsize::new(0),
            mapped,
            release_after_use: false,
        })
    }

    /// Runs the image side on `pixel_values` `[batch, 3, height, width]`: the vision
    /// encoder, the Q-Former, and (captioning checkpoints) the language projection.
    pub fn encode_images(&self, pixel_values: &Tensor) -> Result<ImageFeatures> {
        let batch = pixel_values.dim(0)?;
        self.images_encoded.fetch_add(batch, Ordering::Relaxed);
        let vision = self.vision.encode(&pixel_values.to_dtype(self.dtype)?)?;
        self.release("vision_model.");
        let queries = self.qformer.query_features(&self.query_tokens, &vision)?;
        self.release("qformer.");
        let (projection, language_inputs) = match &self.language {
            Some(head) => {
                let projection = head.projection.forward(&queries.to_dtype(self.dtype)?)?;
                let inputs = fit_to_embeddings(&projection, head.model.embedding_size())?;
                (Some(projection), Some(inputs))
            }
            None => (None, None),
        };
        Ok(ImageFeatures {
            vision,
            queries,
            projection,
            language_inputs,
        })
    }

    /// Quantizes the language model's fully connected layers (see
    /// [`LanguageModel::quantize`]).
    pub fn quantize_language_model(
        &mut self,
        kind: blip2_lm::QuantKind,
    ) -> Result<blip2_lm::QuantizationReport> {
        let report = self.language_model_mut("quantize")?.quantize(kind)?;
        if report.quantized == 0 {
            return Err(Error::Quantized(format!(
                "none of the language model's {} fully connected layers can be quantized: \
                 quantization works in blocks of {} weights, and no layer's input width is a \
                 multiple of that",
                report.left_dense,
                blip2_nn::kernels::quant::BLOCK
            )));
        }
        warn_left_dense(&report);
        // Quantizing read every float32 matrix through the mapping; those pages are no
        // longer used (the quantized copies are), so they need not stay in memory.
        if let Some(mapped) = &self.mapped {
            mapped.release("language_model.");
        }
        tracing::info!(
            ?kind,
            layers = report.quantized,
            left_dense = report.left_dense,
            megabytes_before = report.bytes_before / 1_000_000,
            megabytes_after = report.bytes_after / 1_000_000,
            "quantized the language model"
        );
        Ok(report)
    }

    /// Quantizes the vision encoder's fully connected layers to 8 bits per output row
    /// (see [`VisionEncoder::quantize_per_row`]).
    pub fn quantize_vision_encoder(&mut self) -> Result<usize> {
        let layers = self.vision.quantize_per_row()?;
        if layers == 0 {
            return Err(Error::Quantized(
                "this vision encoder has no layers that can be quantized to 8 bits per row; \
                 load it without --vision-int8 (LoadOptions::vision_int8)"
                    .into(),
            ));
        }
        // As for the language model: the float32 pages were read once and are not used again.
        if let Some(mapped) = &self.mapped {
            mapped.release("vision_model.");
        }
        tracing::info!(layers, "quantized the vision encoder to 8 bits per row");
        Ok(layers)
    }

    /// Gives each of the language model's fully connected layers a copy of its weights
    /// in 8 bits per row for prompts (see [`Linear::add_int8_for_many_rows`]). Decoding
    /// keeps the current weights. Returns how many layers have a copy.
    pub fn add_int8_prompt_weights(&mut self) -> Result<usize> {
        let mut layers = 0;
        for (_, linear) in self
            .language_model_mut("add int8 prompt weights to")?
            .linears_mut()
        {
            layers += usize::from(linear.add_int8_for_many_rows()?);
        }
        tracing::info!(layers, "added 8-bit prompt weights to the language model");
        Ok(layers)
    }

    /// Reads the language model's quantized layers from `path` (written by
    /// [`Blip2Model::save_quantized_language_model`]).
    pub fn load_quantized_language_model(
        &mut self,
        path: &Path,
    ) -> Result<blip2_lm::QuantizationReport> {
        let model = self.language_model_mut("read quantized weights for")?;
        let report = blip2_lm::load_quantized(model, path).map_err(quantized_error)?;
        warn_left_dense(&report);
        tracing::info!(
            path = %path.display(),
            layers = report.quantized,
            megabytes = report.bytes_after / 1_000_000,
            "read the quantized language model"
        );
        Ok(report)
    }

    /// Writes the language model's quantized layers to `path`; fails when it is not
    /// quantized.
    pub fn save_quantized_language_model(&mut self, path: &Path) -> Result<usize> {
        let model = self.language_model_mut("save")?;
        blip2_lm::save_quantized(model, path).map_err(quantized_error)
    }

    fn language_model_mut(&mut self, action: &str) -> Result<&mut dyn LanguageModel> {
        match self.language.as_mut() {
            Some(head) => Ok(head.model.as_mut()),
            None => Err(Error::InvalidRequest(format!(
                "only a captioning checkpoint has a language model to {action}"
            ))),
        }
    }

    /// Whether to keep peak memory near the language model's size (see
    /// [`crate::LoadOptions::low_memory`]): the vision encoder drops each layer's weights
    /// as soon as it has run, and the Q-Former its weights after each image. Only weights
    /// read in place (`f32` on the CPU) can be dropped.
    pub fn set_release_weights_after_use(&mut self, release: bool) {
        self.release_after_use = release;
        self.vision.set_release_layers_after_use(release);
    }

    fn release(&self, prefix: &str) {
        if let (true, Some(mapped)) = (self.release_after_use, &self.mapped) {
            mapped.release(prefix);
        }
    }

    /// How many images the vision encoder has processed since loading.
    pub fn images_encoded(&self) -> usize {
        self.images_encoded.load(Ordering::Relaxed)
    }

    /// The language model, or an error naming the checkpoint kind when there is none.
    pub fn language_model(&self) -> Result<&dyn LanguageModel> {
        self.language
            .as_ref()
            .map(|head| head.model.as_ref())
            .ok_or_else(|| {
                Error::InvalidRequest(
                "this is an image-text retrieval checkpoint without a language model; captions and \
                 answers need a captioning checkpoint such as Salesforce/blip2-opt-2.7b"
                    .into(),
            )
            })
    }

    /// The retrieval heads, or an error naming the checkpoint kind when there are none.
    pub fn retrieval_heads(&self) -> Result<&RetrievalHeads> {
        self.retrieval.as_ref().ok_or_else(|| {
            Error::InvalidRequest(
                "this captioning checkpoint has no projection heads (vision_projection, text_projection, \
                 itm_head), so it gives no image or text embeddings and no matching scores; its Q-Former \
                 features still work. Use an image-text retrieval checkpoint such as \
                 Salesforce/blip2-itm-vit-g"
                    .into(),
            )
        })
    }

    /// The vision encoder.
    pub fn vision_encoder(&self) -> &dyn VisionEncoder {
        self.vision.as_ref()
    }

    /// The Q-Former.
    pub fn qformer(&self) -> &QFormer {
        &self.qformer
    }

    /// The learned queries `[1, queries, qformer_width]`.
    pub fn query_tokens(&self) -> &Tensor {
        &self.query_tokens
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &Blip2Config {
        &self.config
    }

    /// Dtype of the vision encoder and the language model.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

enum LoadError {
    Config(ConfigError, &'static str),
    Weights(candle_core::Error),
    Other(Error),
}

impl From<candle_core::Error> for LoadError {
    fn from(error: candle_core::Error) -> Self {
        Self::Weights(error)
    }
}

/// Keeps the message of a quantized-weights failure, which names the file, without the
/// "model computation failed" of other tensor errors.
fn quantized_error(error: candle_core::Error) -> Error {
    match error {
        candle_core::Error::Msg(message) => Error::Quantized(message),
        candle_core::Error::WithBacktrace { inner, .. } => quantized_error(*inner),
        other => Error::Compute(other),
    }
}

/// Warns about layers that stay in their float dtype because their width does not fit
/// quantization blocks.
fn warn_left_dense(report: &blip2_lm::QuantizationReport) {
    if report.left_dense > 0 {
        tracing::warn!(
            quantized = report.quantized,
            left_dense = report.left_dense,
            "some of the language model's fully connected layers stay unquantized: their input \
             widths are not multiples of {}",
            blip2_nn::kernels::quant::BLOCK
        );
    }
}

fn load_language(
    config: &Blip2Config,
    config_path: &Path,
    qformer_width: usize,
    vb: &Weights,
) -> std::result::Result<LanguageHead, LoadError> {
    let text_hidden = config.text_config.hidden_size();
    let projection = blip2_nn::linear(qformer_width, text_hidden, vb.pp("language_projection"))?;
    let model: Box<dyn LanguageModel> = match &config.text_config {
        TextConfig::Opt(opt) => {
            let settings = opt
                .resolve()
                .map_err(|e| LoadError::Config(e, "text_config"))?;
            Box::new(OptModel::load(&settings, vb.pp("language_model"))?)
        }
        TextConfig::T5(t5) => {
            let settings = t5
                .resolve()
                .map_err(|e| LoadError::Config(e, "text_config"))?;
            Box::new(T5Model::load(&settings, vb.pp("language_model"))?)
        }
    };
    let embedding_size = model.embedding_size();
    if text_hidden < embedding_size {
        return Err(LoadError::Other(Error::Unsupported {
            path: config_path.to_owned(),
            message: format!(
                "the language projection outputs {text_hidden} values per query (text_config.hidden_size) \
                 but the language model's embeddings are {embedding_size} wide"
            ),
        }));
    }
    if text_hidden != embedding_size {
        tracing::warn!(
            text_hidden,
            embedding_size,
            "text_config.word_embed_proj_dim differs from text_config.hidden_size; like transformers, each \
             image's projected queries are read as a flat sequence to fill the embedding slots"
        );
    }
    Ok(LanguageHead { projection, model })
}

/// Reads `[batch, queries, hidden]` projections into `[batch, queries, width]`.
///
/// When the two widths are equal this is the identity. Otherwise transformers'
/// `masked_scatter` fills the query slots with the first `queries × width` values of the
/// flattened projection; this does the same, one image at a time, so that batching
/// never mixes images.
fn fit_to_embeddings(projected: &Tensor, width: usize) -> Result<Tensor> {
    let (batch, queries, hidden) = projected.dims3()?;
    if hidden == width {
        return Ok(projected.clone());
    }
    let flat = projected.reshape((batch, queries * hidden))?;
    Ok(flat
        .narrow(1, 0, queries * width)?
        .reshape((batch, queries, width))?)
}
