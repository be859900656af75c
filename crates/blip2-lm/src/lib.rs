//! Language models that read BLIP-2 query embeddings, and the decoding loop.
//!
//! A [`LanguageModel`] takes input embeddings (the projected Q-Former queries followed by
//! the prompt's token embeddings) and returns next-token logits; a [`DecodeSession`]
//! holds its KV cache while tokens are generated one at a time. The [`generation`]
//! module implements greedy search, beam search and sampling on top of that trait,
//! with the logits processors of Hugging Face's `generate`, so any model behind the
//! trait decodes exactly like the reference.
//!
//! Adapters: [`OptModel`] (decoder-only) and [`T5Model`] (encoder-decoder, for the
//! Flan-T5 checkpoints). The text config in a BLIP-2 `config.json`
//! is parsed into [`TextConfig`], tagged by its `model_type`.

#![warn(missing_docs)]

mod cache;
mod config;
pub mod generation;
mod opt;
mod quantized_file;
mod t5;

pub use cache::KvCache;
pub use config::{OptConfig, OptSettings, T5Config, T5Settings, TextConfig};
pub use opt::OptModel;
pub use quantized_file::{is_quantized_file, load_quantized, save_quantized, write_safetensors};
pub use t5::{T5Model, relative_position_bucket};

pub use blip2_nn::Linear;
pub use blip2_nn::kernels::quant::QuantKind;
use candle_core::{DType, Device, Result, Tensor};

/// What [`LanguageModel::quantize`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuantizationReport {
    /// Layers quantized.
    pub quantized: usize,
    /// Layers left dense (input width not a multiple of 32).
    pub left_dense: usize,
    /// Weight bytes of the fully connected layers before.
    pub bytes_before: usize,
    /// Weight bytes of the fully connected layers after.
    pub bytes_after: usize,
}

/// Quantizes every layer of `linears`, counting what happened.
fn quantize_all(
    linears: Vec<(String, &mut Linear)>,
    kind: QuantKind,
) -> Result<QuantizationReport> {
    let mut report = QuantizationReport::default();
    for (_, linear) in linears {
        report.bytes_before += linear.weight_bytes();
        if linear.quantize(kind)? {
            report.quantized += 1;
        } else {
            report.left_dense += 1;
        }
        report.bytes_after += linear.weight_bytes();
    }
    Ok(report)
}

/// A language model that BLIP-2 can condition on image queries.
pub trait LanguageModel: Send + Sync {
    /// Looks up token embeddings: `input_ids` `[batch, tokens]` (u32) →
    /// `[batch, tokens, embedding_size]` in the model dtype.
    fn embed_tokens(&self, input_ids: &Tensor) -> Result<Tensor>;

    /// Width of the input embeddings the model accepts.
    fn embedding_size(&self) -> usize;

    /// Number of rows of the output logits.
    fn vocab_size(&self) -> usize;

    /// Dtype of the weights and of the embeddings.
    fn dtype(&self) -> DType;

    /// Device the weights live on.
    fn device(&self) -> &Device;

    /// Longest sequence (prompt plus generated tokens) the model can attend over, if
    /// it has a hard limit such as learned position embeddings.
    fn max_sequence_length(&self) -> Option<usize>;

    /// Whether the model is an encoder-decoder (the prompt goes to the encoder and
    /// generation starts from a decoder start token).
    fn is_encoder_decoder(&self) -> bool;

    /// The token the decoder starts from, for encoder-decoder models.
    fn decoder_start_token_id(&self) -> Option<u32> {
        None
    }

    /// Every fully connected layer (the output layer included) with its name in the
    /// checkpoint, without the `language_model.` prefix and the `.weight` suffix.
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)>;

    /// Quantizes the weights of the fully connected layers (the output layer included)
    /// to 8 or 4 bits. Layers whose input width is not a multiple of 32 stay as they are.
    fn quantize(&mut self, kind: QuantKind) -> Result<QuantizationReport> {
        quantize_all(self.linears_mut(), kind)
    }

    /// Runs the prompt and opens a decoding session.
    ///
    /// `inputs_embeds` is `[batch, tokens, embedding_size]`; `attention_mask` `[batch,
    /// tokens]` (u32 or f32) holds 1 for real positions and 0 for padding. `capacity` is
    /// the number of tokens the session will be asked to generate at most, so caches
    /// can be sized once. Returns the session and the `f32` logits `[batch, vocab]` of the
    /// first generated token.
    fn start<'a>(
        &'a self,
        inputs_embeds: &Tensor,
        attention_mask: &Tensor,
        capacity: usize,
    ) -> Result<(Box<dyn DecodeSession + 'a>, Tensor)>;
}

/// The state of an ongoing generation: caches and masks for each row.
pub trait DecodeSession {
    /// Feeds one token per row and returns the `f32` logits `[rows, vocab]` of the next one.
    fn step(&mut self, tokens: &[u32]) -> Result<Tensor>;

    /// Rebuilds the rows so that new row `i` is old row `rows[i]` (beam search
    /// reordering and expansion); the number of rows may change.
    fn select_rows(&mut self, rows: &[usize]) -> Result<()>;
}
