use blip2_nn::Weights;
use blip2_nn::{
    Activation, LayerNorm, Linear, additive_mask_value, linear, scaled_dot_product_attention,
};
use candle_core::{DType, Module, Result, Tensor};

use crate::QFormerSettings;

/// BERT attention followed by its output block: `LayerNorm(dense(attention) + input)`.
#[derive(Debug, Clone)]
struct AttentionBlock {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    layer_norm: LayerNorm,
    num_heads: usize,
    scale: f64,
}

impl AttentionBlock {
    /// `key_width` is the hidden size for self-attention and the image feature width
    /// for cross-attention.
    fn load(settings: &QFormerSettings, key_width: usize, vb: Weights) -> Result<Self> {
        let hidden = settings.hidden_size;
        let head_dim = hidden / settings.num_heads;
        Ok(Self {
            query: linear(hidden, hidden, vb.pp("attention.query"))?,
            key: linear(key_width, hidden, vb.pp("attention.key"))?,
            value: linear(key_width, hidden, vb.pp("attention.value"))?,
            dense: linear(hidden, hidden, vb.pp("output.dense"))?,
            layer_norm: LayerNorm::load(
                vb.pp("output.LayerNorm"),
                hidden,
                settings.layer_norm_eps,
            )?,
            num_heads: settings.num_heads,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    fn split_heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (batch, tokens, hidden) = xs.dims3()?;
        xs.reshape((batch, tokens, self.num_heads, hidden / self.num_heads))?
            .transpose(1, 2)
    }

    /// `hidden_states` `[batch, tokens, hidden]` attends to `context` `[batch, context_len,
    /// key_width]` under an additive `mask` broadcastable to `[batch, heads, tokens, context_len]`.
    fn forward(
        &self,
        hidden_states: &Tensor,
        context: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (batch, tokens, hidden) = hidden_states.dims3()?;
        let query = self.split_heads(&self.query.forward(hidden_states)?)?;
        let key = self.split_heads(&self.key.forward(context)?)?;
        let value = self.split_heads(&self.value.forward(context)?)?;
        let attended = scaled_dot_product_attention(&query, &key, &value, mask, self.scale)?;
        let merged = attended.transpose(1, 2)?.reshape((batch, tokens, hidden))?;
        self.layer_norm
            .forward(&(self.dense.forward(&merged)? + hidden_states)?)
    }
}

/// BERT feed-forward: `LayerNorm(dense2(act(dense1(x))) + x)`.
#[derive(Debug, Clone)]
struct FeedForward {
    intermediate: Linear,
    output: Linear,
    layer_norm: LayerNorm,
    activation: Activation,
}

impl FeedForward {
    /// Loads `{prefix}.dense` and `{output_prefix}.dense` / `.LayerNorm`.
    fn load(
        settings: &QFormerSettings,
        vb: Weights,
        intermediate: &str,
        output: &str,
    ) -> Result<Self> {
        Ok(Self {
            intermediate: linear(
                settings.hidden_size,
                settings.intermediate_size,
                vb.pp(intermediate).pp("dense"),
            )?,
            output: linear(
                settings.intermediate_size,
                settings.hidden_size,
                vb.pp(output).pp("dense"),
            )?,
            layer_norm: LayerNorm::load(
                vb.pp(output).pp("LayerNorm"),
                settings.hidden_size,
                settings.layer_norm_eps,
            )?,
            activation: settings.activation,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let hidden = self.activation.forward(&self.intermediate.forward(xs)?)?;
        self.layer_norm
            .forward(&(self.output.forward(&hidden)? + xs)?)
    }
}

/// One Q-Former layer.
#[derive(Debug, Clone)]
struct Layer {
    self_attention: AttentionBlock,
    cross_attention: Option<AttentionBlock>,
    query_feed_forward: FeedForward,
    text_feed_forward: Option<FeedForward>,
}

impl Layer {
    fn load(settings: &QFormerSettings, index: usize, vb: Weights) -> Result<Self> {
        let cross_attention = if settings.has_cross_attention(index) {
            Some(AttentionBlock::load(
                settings,
                settings.encoder_hidden_size,
                vb.pp("crossattention"),
            )?)
        } else {
            None
        };
        let text_feed_forward = if settings.has_text_feed_forward {
            Some(FeedForward::load(
                settings,
                vb.clone(),
                "intermediate",
                "output",
            )?)
        } else {
            None
        };
        Ok(Self {
            self_attention: AttentionBlock::load(
                settings,
                settings.hidden_size,
                vb.pp("attention"),
            )?,
            cross_attention,
            query_feed_forward: FeedForward::load(
                settings,
                vb.clone(),
                "intermediate_query",
                "output_query",
            )?,
            text_feed_forward,
        })
    }

    fn text_feed_forward(&self) -> Result<&FeedForward> {
        self.text_feed_forward.as_ref().ok_or_else(|| {
            candle_core::Error::Msg(
                "this Q-Former has no text feed-forward weights (use_qformer_text_input is false); \
                 text inputs need an image-text retrieval checkpoint"
                    .into(),
            )
        })
    }

    /// The first `query_length` tokens are queries, the rest text.
    fn forward(
        &self,
        xs: &Tensor,
        query_length: usize,
        self_mask: Option<&Tensor>,
        image_embeds: Option<&Tensor>,
    ) -> Result<Tensor> {
        let attended = self.self_attention.forward(xs, xs, self_mask)?;
        let total = attended.dim(1)?;
        if query_length == 0 {
            return self.text_feed_forward()?.forward(&attended);
        }

        let mut queries = attended.narrow(1, 0, query_length)?;
        if let Some(cross) = &self.cross_attention {
            let image = image_embeds.ok_or_else(|| {
                candle_core::Error::Msg(
                    "Q-Former cross-attention layers need image features".into(),
                )
            })?;
            queries = cross.forward(&queries, image, None)?;
        }
        let queries = self.query_feed_forward.forward(&queries)?;
        if total == query_length {
            return Ok(queries);
        }
        let text = attended.narrow(1, query_length, total - query_length)?;
        let text = self.text_feed_forward()?.forward(&text)?;
        Tensor::cat(&[&queries, &text], 1)
    }
}

/// The Q-Former encoder (`Blip2QFormerModel` in transformers).
///
/// The reference keeps the Q-Former in `f32` whatever the model dtype, so callers load
/// it from an `f32` [`VarBuilder`]; inputs of other dtypes are converted.
#[derive(Debug, Clone)]
pub struct QFormer {
    layer_norm: LayerNorm,
    layers: Vec<Layer>,
    settings: QFormerSettings,
    dtype: DType,
}

impl QFormer {
    /// Loads the weights under `vb` (usually the `qformer` prefix).
    pub fn load(settings: &QFormerSettings, vb: Weights) -> Result<Self> {
        let _span = tracing::debug_span!("load_qformer", layers = settings.num_layers).entered();
        let layers = (0..settings.num_layers)
            .map(|i| Layer::load(settings, i, vb.pp(format!("encoder.layer.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layer_norm: LayerNorm::load(
                vb.pp("layernorm"),
                settings.hidden_size,
                settings.layer_norm_eps,
            )?,
            layers,
            settings: settings.clone(),
            dtype: vb.dtype(),
        })
    }

    /// The settings the model was built from.
    pub fn settings(&self) -> &QFormerSettings {
        &self.settings
    }

    /// Runs the encoder on `embeddings` `[batch, tokens, hidden]` (queries first, then
    /// text), returning `[batch, tokens, hidden]`.
    ///
    /// `attention_mask` `[batch, tokens]` holds 1 for real tokens and 0 for padding; it
    /// masks keys in self-attention. `image_embeds` `[batch, patches, width]` feed the
    /// cross-attention layers and are required when `query_length > 0`.
    pub fn forward(
        &self,
        embeddings: &Tensor,
        query_length: usize,
        attention_mask: Option<&Tensor>,
        image_embeds: Option<&Tensor>,
    ) -> Result<Tensor> {
        let dtype = self.dtype;
        let mut xs = self
            .layer_norm
            .forward(&embeddings.to_dtype(dtype)?.contiguous()?)?;
        let image_embeds = image_embeds.map(|t| t.to_dtype(dtype)).transpose()?;
        let self_mask = attention_mask.map(padding_mask).transpose()?;
        for layer in &self.layers {
            xs = layer.forward(&xs, query_length, self_mask.as_ref(), image_embeds.as_ref())?;
        }
        Ok(xs)
    }

    /// The query outputs for a batch of images: `query_tokens` `[1, queries, hidden]`
    /// are broadcast over the batch of `image_embeds` `[batch, patches, width]`.
    pub fn query_features(&self, query_tokens: &Tensor, image_embeds: &Tensor) -> Result<Tensor> {
        let _span = tracing::debug_span!("qformer", shape = ?image_embeds.dims()).entered();
        let batch = image_embeds.dim(0)?;
        let (_, queries, hidden) = query_tokens.dims3()?;
        let queries_batch = query_tokens.expand((batch, queries, hidden))?;
        self.forward(&queries_batch, queries, None, Some(image_embeds))
    }
}

/// `[batch, tokens]` of 0/1 → additive `[batch, 1, 1, tokens]` in `f32`.
fn padding_mask(mask: &Tensor) -> Result<Tensor> {
    let (batch, tokens) = mask.dims2()?;
    let keep = mask.to_dtype(DType::F32)?;
    let masked = ((1.0 - keep)? * additive_mask_value() as f64)?;
    masked.reshape((batch, 1, 1, tokens))
}
