//! Google's T5 and Flan-T5 encoder-decoder (`T5ForConditionalGeneration` in transformers).
//!
//! In BLIP-2 the image queries and the prompt form the encoder input; the decoder
//! starts from `decoder_start_token_id` and cross-attends to the encoder output.
//!
//! Precision: in `f16` the feed-forward output projections (`wo`) stay in `f32`, as
//! transformers keeps them (`_keep_in_fp32_modules`); their `f32` output makes the
//! residual stream `f32` from then on, which is what keeps Flan-T5 from overflowing.

use blip2_nn::{Activation, LayerNorm, Linear, additive_mask_value, linear_no_bias};
use blip2_nn::{TokenEmbedding, Weights};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::Embedding;

use crate::{DecodeSession, KvCache, LanguageModel, T5Settings};

/// Largest finite `f16` minus the margin transformers leaves when it clamps activations.
const F16_CLAMP: f64 = 65504.0 - 1000.0;

/// The relative position bucket of `relative_position` (key index minus query index),
/// computed as transformers' `T5Attention._relative_position_bucket` does in `f32`.
pub fn relative_position_bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut num_buckets = num_buckets as i64;
    let mut bucket = 0i64;
    let distance = if bidirectional {
        num_buckets /= 2;
        if relative_position > 0 {
            bucket += num_buckets;
        }
        relative_position.abs()
    } else {
        -relative_position.min(0)
    };
    let max_exact = num_buckets / 2;
    if distance < max_exact {
        return (bucket + distance) as usize;
    }
    let log_ratio = (distance as f32 / max_exact as f32).ln()
        / ((max_distance as f64 / max_exact as f64).ln() as f32);
    let large = max_exact + (log_ratio * (num_buckets - max_exact) as f32) as i64;
    (bucket + large.min(num_buckets - 1)) as usize
}

/// Adds two residual-stream tensors with PyTorch's type promotion: mixed dtypes meet in `f32`.
fn residual_add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dtype() == b.dtype() {
        blip2_nn::elementwise::add(a, b)
    } else {
        blip2_nn::elementwise::add(&a.to_dtype(DType::F32)?, &b.to_dtype(DType::F32)?)
    }
}

/// transformers clamps `f16` activations away from infinity after every sub-layer.
fn clamp_f16(xs: Tensor) -> Result<Tensor> {
    if xs.dtype() != DType::F16 {
        return Ok(xs);
    }
    let has_inf = xs
        .to_dtype(DType::F32)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?
        .is_infinite();
    if has_inf {
        xs.clamp(-F16_CLAMP, F16_CLAMP)
    } else {
        Ok(xs)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    num_heads: usize,
    d_kv: usize,
    relative_attention_bias: Option<Embedding>,
}

impl Attention {
    fn load(settings: &T5Settings, has_relative_bias: bool, vb: Weights) -> Result<Self> {
        let inner = settings.num_heads * settings.d_kv;
        let relative_attention_bias = if has_relative_bias {
            Some(
                vb.pp("relative_attention_bias")
                    .embedding(settings.num_buckets, settings.num_heads)?,
            )
        } else {
            None
        };
        Ok(Self {
            q: linear_no_bias(settings.d_model, inner, vb.pp("q"))?,
            k: linear_no_bias(settings.d_model, inner, vb.pp("k"))?,
            v: linear_no_bias(settings.d_model, inner, vb.pp("v"))?,
            o: linear_no_bias(inner, settings.d_model, vb.pp("o"))?,
            num_heads: settings.num_heads,
            d_kv: settings.d_kv,
            relative_attention_bias,
        })
    }

    /// `[rows, tokens, d_model]` → `[rows, heads, tokens, d_kv]`.
    fn split_heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (rows, tokens, _) = xs.dims3()?;
        xs.reshape((rows, tokens, self.num_heads, self.d_kv))?
            .transpose(1, 2)
    }

    fn keys_values(&self, xs: &Tensor) -> Result<(Tensor, Tensor)> {
        let [keys, values] = &Linear::forward_many(&[&self.k, &self.v], xs)?[..] else {
            unreachable!("two layers give two products")
        };
        Ok((self.split_heads(keys)?, self.split_heads(values)?))
    }

    /// The learned bias `[1, heads, queries, keys]` in `f32` for queries at
    /// `query_offset..query_offset + queries` and keys at `0..keys`.
    fn position_bias(
        &self,
        settings: &T5Settings,
        queries: usize,
        keys: usize,
        query_offset: usize,
        bidirectional: bool,
        device: &Device,
    ) -> Result<Tensor> {
        let table = self.relative_attention_bias.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("this attention layer has no relative position bias".into())
        })?;
        let mut buckets = Vec::with_capacity(queries * keys);
        for query in 0..queries {
            for key in 0..keys {
                let relative = key as i64 - (query + query_offset) as i64;
                buckets.push(relative_position_bucket(
                    relative,
                    bidirectional,
                    settings.num_buckets,
                    settings.max_distance,
                ) as u32);
            }
        }
        let buckets = Tensor::from_vec(buckets, (queries, keys), device)?;
        let values = table.forward(&buckets)?.to_dtype(DType::F32)?;
        values.permute((2, 0, 1))?.unsqueeze(0)
    }

    /// T5 attention has no `1/sqrt(d)` scaling; `bias` (position bias plus mask, `f32`)
    /// is added to the scores.
    fn attend(
        &self,
        hidden: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        bias: &Tensor,
    ) -> Result<Tensor> {
        let (rows, tokens, _) = hidden.dims3()?;
        let query = self.split_heads(&self.q.forward(hidden)?)?;
        let attended =
            blip2_nn::scaled_dot_product_attention(&query, keys, values, Some(bias), 1.0)?;
        let merged =
            attended
                .transpose(1, 2)?
                .reshape((rows, tokens, self.num_heads * self.d_kv))?;
        self.o.forward(&merged)
    }
}

#[derive(Debug, Clone)]
struct FeedForward {
    wi_0: Linear,
    wi_1: Option<Linear>,
    wo: Linear,
    activation: Activation,
    norm: LayerNorm,
}

impl FeedForward {
    /// `wo_vb` may have another dtype than `vb` (`f32` when the model runs in `f16`).
    fn load(settings: &T5Settings, vb: Weights, wo_vb: Weights) -> Result<Self> {
        let dense = vb.pp("DenseReluDense");
        let (wi_0, wi_1) = if settings.gated {
            (
                linear_no_bias(settings.d_model, settings.d_ff, dense.pp("wi_0"))?,
                Some(linear_no_bias(
                    settings.d_model,
                    settings.d_ff,
                    dense.pp("wi_1"),
                )?),
            )
        } else {
            (
                linear_no_bias(settings.d_model, settings.d_ff, dense.pp("wi"))?,
                None,
            )
        };
        Ok(Self {
            wi_0,
            wi_1,
            wo: linear_no_bias(
                settings.d_ff,
                settings.d_model,
                wo_vb.pp("DenseReluDense").pp("wo"),
            )?,
            activation: settings.activation,
            norm: LayerNorm::rms(
                vb.pp("layer_norm"),
                settings.d_model,
                settings.layer_norm_eps,
            )?,
        })
    }

    fn forward(&self, xs: &Tensor, dtype: DType) -> Result<Tensor> {
        let normed = self.norm.forward(xs)?.to_dtype(dtype)?;
        let hidden = match &self.wi_1 {
            // Gated: both input projections read the same input, so they share one pass.
            Some(wi_1) => {
                let [gate, linear] = &Linear::forward_many(&[&self.wi_0, wi_1], &normed)?[..]
                else {
                    unreachable!("two layers give two products")
                };
                (self.activation.forward(gate)? * linear)?
            }
            None => self.activation.forward(&self.wi_0.forward(&normed)?)?,
        };
        let wo_dtype = self.wo.dtype();
        let output = self.wo.forward(&hidden.to_dtype(wo_dtype)?)?;
        residual_add(xs, &output)
    }
}

#[derive(Debug, Clone)]
struct Block {
    self_attention: Attention,
    self_norm: LayerNorm,
    cross_attention: Option<(Attention, LayerNorm)>,
    feed_forward: FeedForward,
}

impl Block {
    fn load(
        settings: &T5Settings,
        index: usize,
        decoder: bool,
        vb: Weights,
        wo_vb: Weights,
    ) -> Result<Self> {
        let layer = |i: usize| vb.pp(format!("layer.{i}"));
        let self_attention = Attention::load(settings, index == 0, layer(0).pp("SelfAttention"))?;
        let self_norm = LayerNorm::rms(
            layer(0).pp("layer_norm"),
            settings.d_model,
            settings.layer_norm_eps,
        )?;
        let (cross_attention, ff_index) = if decoder {
            let attention = Attention::load(settings, false, layer(1).pp("EncDecAttention"))?;
            let norm = LayerNorm::rms(
                layer(1).pp("layer_norm"),
                settings.d_model,
                settings.layer_norm_eps,
            )?;
            (Some((attention, norm)), 2)
        } else {
            (None, 1)
        };
        let feed_forward = FeedForward::load(
            settings,
            layer(ff_index),
            wo_vb.pp(format!("layer.{ff_index}")),
        )?;
        Ok(Self {
            self_attention,
            self_norm,
            cross_attention,
            feed_forward,
        })
    }
}

/// Encoder outputs and cached cross-attention keys/values for a decoding session.
struct CrossContext {
    /// Per decoder layer: keys and values of the encoder output.
    keys_values: Vec<(Tensor, Tensor)>,
    /// Additive mask `[rows, 1, 1, encoder_len]` hiding encoder padding.
    mask: Tensor,
}

/// The T5 encoder-decoder with its language-model head.
#[derive(Debug, Clone)]
pub struct T5Model {
    shared: TokenEmbedding,
    encoder: Vec<Block>,
    encoder_norm: LayerNorm,
    decoder: Vec<Block>,
    decoder_norm: LayerNorm,
    lm_head: Linear,
    settings: T5Settings,
    device: Device,
    dtype: DType,
}

impl T5Model {
    /// Loads `shared`, `encoder.*`, `decoder.*` and `lm_head.weight` under `vb` (the
    /// `language_model` prefix of a BLIP-2 checkpoint).
    ///
    /// Without `lm_head.weight` the output layer reuses the shared embeddings.
    pub fn load(settings: &T5Settings, vb: Weights) -> Result<Self> {
        let _span = tracing::debug_span!(
            "load_t5",
            encoder = settings.encoder_layers,
            decoder = settings.decoder_layers
        )
        .entered();
        let dtype = vb.dtype();
        let wo_vb = if dtype == DType::F16 {
            vb.clone().set_dtype(DType::F32)
        } else {
            vb.clone()
        };
        let shared_name = if vb.contains_tensor("shared.weight") {
            "shared"
        } else {
            "encoder.embed_tokens"
        };
        let shared = vb
            .pp(shared_name)
            .token_embedding(settings.vocab_size, settings.d_model)?;
        let stack = |name: &str, layers: usize, decoder: bool| -> Result<Vec<Block>> {
            (0..layers)
                .map(|i| {
                    Block::load(
                        settings,
                        i,
                        decoder,
                        vb.pp(format!("{name}.block.{i}")),
                        wo_vb.pp(format!("{name}.block.{i}")),
                    )
                })
                .collect()
        };
        let lm_head = if vb.contains_tensor("lm_head.weight") {
            linear_no_bias(settings.d_model, settings.vocab_size, vb.pp("lm_head"))?
        } else {
            shared.as_linear()
        };
        Ok(Self {
            encoder: stack("encoder", settings.encoder_layers, false)?,
            encoder_norm: LayerNorm::rms(
                vb.pp("encoder.final_layer_norm"),
                settings.d_model,
                settings.layer_norm_eps,
            )?,
            decoder: stack("decoder", settings.decoder_layers, true)?,
            decoder_norm: LayerNorm::rms(
                vb.pp("decoder.final_layer_norm"),
                settings.d_model,
                settings.layer_norm_eps,
            )?,
            shared,
            device: vb.var_device(),
            lm_head,
            settings: settings.clone(),
            dtype,
        })
    }

    /// Every fully connected layer, the output layer included, with its checkpoint name.
    fn named_linears(&mut self) -> Vec<(String, &mut Linear)> {
        let mut linears = Vec::new();
        let stacks = [
            ("encoder", &mut self.encoder),
            ("decoder", &mut self.decoder),
        ];
        for (stack, blocks) in stacks {
            for (i, block) in blocks.iter_mut().enumerate() {
                let prefix = format!("{stack}.block.{i}.layer");
                // The feed-forward sublayer follows the attention ones.
                let ff_index = if block.cross_attention.is_some() {
                    2
                } else {
                    1
                };
                let mut attentions = vec![("0.SelfAttention", &mut block.self_attention)];
                if let Some((cross, _)) = block.cross_attention.as_mut() {
                    attentions.push(("1.EncDecAttention", cross));
                }
                for (name, attention) in attentions {
                    for (part, linear) in [
                        ("q", &mut attention.q),
                        ("k", &mut attention.k),
                        ("v", &mut attention.v),
                        ("o", &mut attention.o),
                    ] {
                        linears.push((format!("{prefix}.{name}.{part}"), linear));
                    }
                }
                let ff_prefix = format!("{prefix}.{ff_index}.DenseReluDense");
                let ff = &mut block.feed_forward;
                match ff.wi_1.as_mut() {
                    Some(wi_1) => {
                        linears.push((format!("{ff_prefix}.wi_0"), &mut ff.wi_0));
                        linears.push((format!("{ff_prefix}.wi_1"), wi_1));
                    }
                    None => linears.push((format!("{ff_prefix}.wi"), &mut ff.wi_0)),
                }
                linears.push((format!("{ff_prefix}.wo"), &mut ff.wo));
            }
        }
        linears.push(("lm_head".to_owned(), &mut self.lm_head));
        linears
    }

    /// The settings the model was built from.
    pub fn settings(&self) -> &T5Settings {
        &self.settings
    }

    /// Runs the encoder: `inputs_embeds` `[rows, tokens, d_model]`, `mask` one 0/1 row
    /// per input; returns `[rows, tokens, d_model]` in the model dtype.
    pub fn encode(&self, inputs_embeds: &Tensor, mask: &[Vec<u8>]) -> Result<Tensor> {
        let (_, tokens, _) = inputs_embeds.dims3()?;
        let device = inputs_embeds.device();
        let first = &self.encoder[0].self_attention;
        let position_bias = first.position_bias(&self.settings, tokens, tokens, 0, true, device)?;
        let bias = position_bias.broadcast_add(&padding_mask(mask, device)?)?;

        let mut hidden = inputs_embeds.to_dtype(self.dtype)?;
        for block in &self.encoder {
            let normed = block.self_norm.forward(&hidden)?.to_dtype(self.dtype)?;
            let (keys, values) = block.self_attention.keys_values(&normed)?;
            let attended = block
                .self_attention
                .attend(&normed, &keys, &values, &bias)?;
            hidden = clamp_f16(residual_add(&hidden, &attended)?)?;
            hidden = clamp_f16(block.feed_forward.forward(&hidden, self.dtype)?)?;
        }
        self.encoder_norm.forward(&hidden)?.to_dtype(self.dtype)
    }

    /// One decoder step for every row: `tokens` are the previous tokens, `position` their
    /// index in the decoder sequence. Returns `f32` logits `[rows, vocab]`.
    fn decode_step(
        &self,
        tokens: &[u32],
        position: usize,
        caches: &mut [KvCache],
        cross: &CrossContext,
    ) -> Result<Tensor> {
        let device = &self.device;
        let ids = Tensor::from_vec(tokens.to_vec(), (tokens.len(), 1), device)?;
        let mut hidden = self.shared.forward(&ids)?.to_dtype(self.dtype)?;
        let first = &self.decoder[0].self_attention;
        // Causal masking is implicit: the cache holds only positions up to this one.
        let self_bias =
            first.position_bias(&self.settings, 1, position + 1, position, false, device)?;

        for (layer, (block, cache)) in self.decoder.iter().zip(caches.iter_mut()).enumerate() {
            let normed = block.self_norm.forward(&hidden)?.to_dtype(self.dtype)?;
            let (keys, values) = block.self_attention.keys_values(&normed)?;
            let (keys, values) = cache.append(&keys, &values)?;
            let attended = block
                .self_attention
                .attend(&normed, &keys, &values, &self_bias)?;
            hidden = clamp_f16(residual_add(&hidden, &attended)?)?;

            let (cross_attention, cross_norm) = block
                .cross_attention
                .as_ref()
                .expect("decoder blocks have cross-attention");
            let normed = cross_norm.forward(&hidden)?.to_dtype(self.dtype)?;
            let (cross_keys, cross_values) = &cross.keys_values[layer];
            let attended =
                cross_attention.attend(&normed, cross_keys, cross_values, &cross.mask)?;
            hidden = clamp_f16(residual_add(&hidden, &attended)?)?;

            hidden = clamp_f16(block.feed_forward.forward(&hidden, self.dtype)?)?;
        }
        let mut output = self.decoder_norm.forward(&hidden)?.to_dtype(self.dtype)?;
        if self.settings.scale_decoder_outputs {
            output = (output * (self.settings.d_model as f64).powf(-0.5))?;
        }
        let logits = self.lm_head.forward(&output.squeeze(1)?)?;
        logits.to_dtype(DType::F32)
    }
}

/// 0/1 rows → additive `[rows, 1, 1, tokens]` in `f32`.
fn padding_mask(mask: &[Vec<u8>], device: &Device) -> Result<Tensor> {
    let rows = mask.len();
    let tokens = mask.first().map_or(0, Vec::len);
    let blocked = additive_mask_value();
    let values: Vec<f32> = mask
        .iter()
        .flatten()
        .map(|&keep| if keep == 1 { 0.0 } else { blocked })
        .collect();
    Tensor::from_vec(values, (rows, 1, 1, tokens), device)
}

impl LanguageModel for T5Model {
    fn embed_tokens(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.shared.forward(input_ids)?.to_dtype(self.dtype)
    }

    fn embedding_size(&self) -> usize {
        self.settings.d_model
    }

    fn vocab_size(&self) -> usize {
        self.settings.vocab_size
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn max_sequence_length(&self) -> Option<usize> {
        None
    }

    fn is_encoder_decoder(&self) -> bool {
        true
    }

    fn decoder_start_token_id(&self) -> Option<u32> {
        Some(self.settings.decoder_start_token_id)
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        self.named_linears()
    }

    fn start<'a>(
        &'a self,
        inputs_embeds: &Tensor,
        attention_mask: &Tensor,
        capacity: usize,
    ) -> Result<(Box<dyn DecodeSession + 'a>, Tensor)> {
        let (rows, tokens, _) = inputs_embeds.dims3()?;
        let mask: Vec<Vec<u8>> = attention_mask
            .to_dtype(DType::U32)?
            .to_vec2::<u32>()?
            .into_iter()
            .map(|row| row.into_iter().map(|v| u8::from(v != 0)).collect())
            .collect();
        if mask.len() != rows || mask.iter().any(|row| row.len() != tokens) {
            candle_core::bail!("attention_mask must be [{rows}, {tokens}] to match inputs_embeds");
        }
        let encoded = self.encode(inputs_embeds, &mask)?;
        let keys_values = self
            .decoder
            .iter()
            .map(|block| {
                let attention = &block
                    .cross_attention
                    .as_ref()
                    .expect("decoder blocks have cross-attention")
                    .0;
                let (keys, values) = attention.keys_values(&encoded)?;
                Ok((keys.contiguous()?, values.contiguous()?))
            })
            .collect::<Result<Vec<_>>>()?;
        let cross = CrossContext {
            keys_values,
            mask: padding_mask(&mask, self.device())?,
        };

        let template = Tensor::zeros(
            (rows, self.settings.num_heads, 0, self.settings.d_kv),
            self.dtype,
            self.device(),
        )?;
        let mut caches = (0..self.decoder.len())
            .map(|_| KvCache::new(&template, capacity + 1))
            .collect::<Result<Vec<_>>>()?;
        let start = vec![self.settings.decoder_start_token_id; rows];
        let logits = self.decode_step(&start, 0, &mut caches, &cross)?;
        let session = T5Session {
            model: self,
            caches,
            cross,
            position: 1,
        };
        Ok((Box::new(session), logits))
    }
}

/// A running T5 generation: decoder self-attention caches and the encoder context.
struct T5Session<'a> {
    model: &'a T5Model,
    caches: Vec<KvCache>,
    cross: CrossContext,
    position: usize,
}

impl DecodeSession for T5Session<'_> {
    fn step(&mut self, tokens: &[u32]) -> Result<Tensor> {
        let logits =
            self.model
                .decode_step(tokens, self.position, &mut self.caches, &self.cross)?;
        self.position += 1;
        Ok(logits)
    }

    fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        let index = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            rows.len(),
            self.model.device(),
        )?;
        for cache in &mut self.caches {
            cache.select_rows(&index)?;
        }
        for (keys, values) in &mut self.cross.keys_values {
            *keys = keys.index_select(&index, 0)?;
            *values = values.index_select(&index, 0)?;
        }
        self.cross.mask = self.cross.mask.index_select(&index, 0)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_transformers() {
        // Values from transformers' T5Attention._relative_position_bucket (num_buckets=32,
        // max_distance=128) for relative positions -200, -64, -20, -9, -1, 0, 1, 9, 20, 64, 200.
        let positions = [-200i64, -64, -20, -9, -1, 0, 1, 9, 20, 64, 200];
        let bidirectional: Vec<usize> = positions
            .iter()
            .map(|&p| relative_position_bucket(p, true, 32, 128))
            .collect();
        let causal: Vec<usize> = positions
            .iter()
            .map(|&p| relative_position_bucket(p, false, 32, 128))
            .collect();
        assert_eq!(bidirectional, vec![15, 14, 10, 8, 1, 0, 17, 24, 26, 30, 31]);
        assert_eq!(causal, vec![31, 26, 17, 9, 1, 0, 0, 0, 0, 0, 0]);
    }
}

#[cfg(test)]
mod precision_tests {
    use super::*;
    use std::collections::HashMap;

    /// In f16 a feed-forward output of 200 000 overflows to infinity unless `wo` and
    /// the residual run in f32, which is what the f32 `wo` policy guarantees.
    #[test]
    fn f16_feed_forward_output_stays_finite() {
        let device = Device::Cpu;
        let settings = crate::T5Config {
            d_model: 4,
            d_ff: 8,
            feed_forward_proj: "relu".into(),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let mut tensors = HashMap::new();
        tensors.insert(
            "layer.DenseReluDense.wi.weight".to_string(),
            Tensor::ones((8, 4), DType::F32, &device).unwrap(),
        );
        tensors.insert(
            "layer.DenseReluDense.wo.weight".to_string(),
            (Tensor::ones((4, 8), DType::F32, &device).unwrap() * 5000.0).unwrap(),
        );
        tensors.insert(
            "layer.layer_norm.weight".to_string(),
            Tensor::ones(4, DType::F32, &device).unwrap(),
        );
        let vb = Weights::from_var_builder(candle_nn::VarBuilder::from_tensors(
            tensors,
            DType::F16,
            &device,
        ));
        let wo_vb = vb.clone().set_dtype(DType::F32);
        let feed_forward = FeedForward::load(&settings, vb.pp("layer"), wo_vb.pp("layer")).unwrap();

        let input = Tensor::ones((1, 1, 4), DType::F16, &device).unwrap();
        let output = feed_forward.forward(&input, DType::F16).unwrap();
        assert_eq!(
            output.dtype(),
            DType::F32,
            "the residual stream moves to f32"
        );
        let values = output.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // RMS norm of ones is ones; wi gives 4 per unit; wo sums 8 × 4 × 5000 = 160 000; plus the input 1.
        for value in values {
            assert!(
                (value - 160_001.0).abs() < 1.0,
                "feed-forward output {value}, expected 160001"
            );
        }
    }
}
