use blip2_nn::Weights;
use candle_core::{Result, Tensor};
use candle_nn::{Embedding, Module};

use crate::QFormerSettings;

/// Word plus absolute position embeddings of the Q-Former's text path
/// (`Blip2TextEmbeddings` in transformers; it has no layer norm of its own, the
/// Q-Former's input layer norm follows).
#[derive(Debug, Clone)]
pub struct TextEmbeddings {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    max_positions: usize,
}

impl TextEmbeddings {
    /// Loads `word_embeddings` and `position_embeddings` under `vb` (usually `embeddings`).
    pub fn load(settings: &QFormerSettings, vb: Weights) -> Result<Self> {
        let hidden = settings.hidden_size;
        Ok(Self {
            word_embeddings: vb
                .pp("word_embeddings")
                .embedding(settings.vocab_size, hidden)?,
            position_embeddings: vb
                .pp("position_embeddings")
                .embedding(settings.max_position_embeddings, hidden)?,
            max_positions: settings.max_position_embeddings,
        })
    }

    /// Longest token sequence the position embeddings cover.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// `input_ids` `[batch, tokens]` (u32) → `[batch, tokens, hidden]`, positions 0, 1, ….
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_, tokens) = input_ids.dims2()?;
        if tokens > self.max_positions {
            candle_core::bail!(
                "the text has {tokens} tokens but the Q-Former has only {} position embeddings",
                self.max_positions
            );
        }
        let positions = Tensor::arange(0u32, tokens as u32, input_ids.device())?;
        let words = self.word_embeddings.forward(input_ids)?;
        words.broadcast_add(&self.position_embeddings.forward(&positions)?.unsqueeze(0)?)
    }
}
