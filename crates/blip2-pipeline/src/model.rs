//! The BLIP-2 network: vision encoder, Q-Former, language projection and language model.

use std::path::Path;

use blip2_lm::{LanguageModel, OptModel, T5Model, TextConfig};
use blip2_nn::Linear;
use blip2_qformer::QFormer;
use blip2_vision::{EvaVisionModel, VisionEncoder};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::{Blip2Config, Error, Result};

/// What the image side produces for a batch.
#[derive(Debug, Clone)]
pub struct ImageFeatures {
    /// Vision encoder output `[batch, 1 + patches, vision_width]` (after its final layer norm).
    pub vision: Tensor,
    /// Q-Former query outputs `[batch, queries, qformer_width]`, in `f32`.
    pub queries: Tensor,
    /// The language projection's output `[batch, queries, text_hidden_size]`.
    pub projection: Tensor,
    /// Queries projected into the language model's input space
    /// `[batch, queries, embedding_size]`, in the model dtype.
    pub language_inputs: Tensor,
}

/// A loaded `Blip2ForConditionalGeneration`.
pub struct Blip2Model {
    vision: Box<dyn VisionEncoder>,
    query_tokens: Tensor,
    qformer: QFormer,
    language_projection: Linear,
    language_model: Box<dyn LanguageModel>,
    config: Blip2Config,
    dtype: DType,
    images_encoded: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Blip2Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blip2Model")
            .field("text_model", &self.config.text_config.model_type())
            .field("num_query_tokens", &self.config.num_query_tokens)
            .field("dtype", &self.dtype)
            .finish_non_exhaustive()
    }
}

impl Blip2Model {
    /// Builds the model from `config` and the safetensors `weights`.
    ///
    /// The vision encoder, language projection and language model are converted to
    /// `dtype`; the query tokens and the Q-Former stay in `f32`, as transformers keeps
    /// them (`_keep_in_fp32_modules`).
    pub fn load(
        config: &Blip2Config,
        config_path: &Path,
        weights: &[std::path::PathBuf],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let dir = weights
            .first()
            .and_then(|p| p.parent())
            .unwrap_or(Path::new("."))
            .to_owned();
        let invalid = |source: blip2_nn::ConfigError, section: &str| Error::InvalidConfig {
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

        // SAFETY: the files are memory-mapped read-only; candle copies each tensor out
        // at load time, so later changes to the files cannot alter loaded weights.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(weights, dtype, device) }.map_err(
            |source| Error::Weights {
                dir: dir.clone(),
                source,
            },
        )?;
        let weights_error = |source: candle_core::Error| Error::Weights {
            dir: dir.clone(),
            source,
        };

        let vision =
            EvaVisionModel::load(&vision_settings, vb.pp("vision_model")).map_err(weights_error)?;
        let f32_vb = vb.clone().set_dtype(DType::F32);
        let qformer_width = qformer_settings.hidden_size;
        let query_tokens = f32_vb
            .get((1, config.num_query_tokens, qformer_width), "query_tokens")
            .map_err(weights_error)?;
        let qformer =
            QFormer::load(&qformer_settings, f32_vb.pp("qformer")).map_err(weights_error)?;

        let text_hidden = config.text_config.hidden_size();
        let language_projection =
            blip2_nn::linear(qformer_width, text_hidden, vb.pp("language_projection"))
                .map_err(weights_error)?;
        let language_model: Box<dyn LanguageModel> = match &config.text_config {
            TextConfig::Opt(opt) => {
                let settings = opt.resolve().map_err(|e| invalid(e, "text_config"))?;
                Box::new(OptModel::load(&settings, vb.pp("language_model")).map_err(weights_error)?)
            }
            TextConfig::T5(t5) => {
                let settings = t5.resolve().map_err(|e| invalid(e, "text_config"))?;
                Box::new(T5Model::load(&settings, vb.pp("language_model")).map_err(weights_error)?)
            }
        };
        let embedding_size = language_model.embedding_size();
        if text_hidden < embedding_size {
            return Err(Error::Unsupported {
                path: config_path.to_owned(),
                message: format!(
                    "the language projection outputs {text_hidden} values per query (text_config.hidden_size) \
                     but the language model's embeddings are {embedding_size} wide"
                ),
            });
        }
        if text_hidden != embedding_size {
            tracing::warn!(
                text_hidden,
                embedding_size,
                "text_config.word_embed_proj_dim differs from text_config.hidden_size; like transformers, each \
                 image's projected queries are read as a flat sequence to fill the embedding slots"
            );
        }
        tracing::info!(
            ?dtype,
            text_model = config.text_config.model_type(),
            "loaded BLIP-2 weights"
        );
        Ok(Self {
            vision: Box::new(vision),
            query_tokens,
            qformer,
            language_projection,
            language_model,
            config: config.clone(),
            dtype,
            images_encoded: Default::default(),
        })
    }

    /// Runs the image side on `pixel_values` `[batch, 3, height, width]`.
    pub fn encode_images(&self, pixel_values: &Tensor) -> Result<ImageFeatures> {
        let batch = pixel_values.dim(0)?;
        self.images_encoded
            .fetch_add(batch, std::sync::atomic::Ordering::Relaxed);
        let vision = self.vision.encode(&pixel_values.to_dtype(self.dtype)?)?;
        let queries = self.qformer.query_features(&self.query_tokens, &vision)?;
        let projection = self
            .language_projection
            .forward(&queries.to_dtype(self.dtype)?)?;
        let language_inputs = self.fit_to_embeddings(&projection)?;
        Ok(ImageFeatures {
            vision,
            queries,
            projection,
            language_inputs,
        })
    }

    /// Reads `[batch, queries, hidden]` projections into `[batch, queries, embedding_size]`.
    ///
    /// When the two widths are equal this is the identity. Otherwise transformers'
    /// `masked_scatter` fills the query slots with the first `queries × embedding_size`
    /// values of the flattened projection; this does the same, one image at a time, so
    /// that batching never mixes images.
    fn fit_to_embeddings(&self, projected: &Tensor) -> Result<Tensor> {
        let (batch, queries, hidden) = projected.dims3()?;
        let width = self.language_model.embedding_size();
        if hidden == width {
            return Ok(projected.clone());
        }
        let flat = projected.reshape((batch, queries * hidden))?;
        Ok(flat
            .narrow(1, 0, queries * width)?
            .reshape((batch, queries, width))?)
    }

    /// How many images the vision encoder has processed since loading.
    pub fn images_encoded(&self) -> usize {
        self.images_encoded
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The language model.
    pub fn language_model(&self) -> &dyn LanguageModel {
        self.language_model.as_ref()
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
