//! Meta's OPT decoder (`OPTForCausalLM` in transformers).

use blip2_nn::elementwise::add;
use blip2_nn::{
    Activation, LayerNorm, Linear, additive_mask_value, linear_no_bias,
    scaled_dot_product_attention,
};
use blip2_nn::{TokenEmbedding, Weights};
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::Embedding;

use crate::config::{OPT_LAYER_NORM_EPS, OPT_POSITION_OFFSET};
use crate::{DecodeSession, KvCache, LanguageModel, OptSettings};

fn linear_maybe_bias(input: usize, output: usize, bias: bool, vb: Weights) -> Result<Linear> {
    if bias {
        blip2_nn::linear(input, output, vb)
    } else {
        linear_no_bias(input, output, vb)
    }
}

fn layer_norm(settings: &OptSettings, vb: Weights) -> Result<LayerNorm> {
    if settings.layer_norm_affine {
        LayerNorm::load(vb, settings.hidden_size, OPT_LAYER_NORM_EPS)
    } else {
        Ok(LayerNorm::without_affine(OPT_LAYER_NORM_EPS))
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    scaling: f64,
}

impl Attention {
    fn load(settings: &OptSettings, vb: Weights) -> Result<Self> {
        let (hidden, bias) = (settings.hidden_size, settings.bias);
        Ok(Self {
            q_proj: linear_maybe_bias(hidden, hidden, bias, vb.pp("q_proj"))?,
            k_proj: linear_maybe_bias(hidden, hidden, bias, vb.pp("k_proj"))?,
            v_proj: linear_maybe_bias(hidden, hidden, bias, vb.pp("v_proj"))?,
            out_proj: linear_maybe_bias(hidden, hidden, bias, vb.pp("out_proj"))?,
            num_heads: settings.num_heads,
            scaling: ((hidden / settings.num_heads) as f64).powf(-0.5),
        })
    }

    fn split_heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (rows, tokens, hidden) = xs.dims3()?;
        xs.reshape((rows, tokens, self.num_heads, hidden / self.num_heads))?
            .transpose(1, 2)
    }

    /// `xs` `[rows, tokens, hidden]`; `mask` additive `[rows, 1, tokens, cached + tokens]`.
    fn forward(&self, xs: &Tensor, mask: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (rows, tokens, hidden) = xs.dims3()?;
        // OPT scales the queries before the product, not the scores after it.
        let [query, key, value] =
            &Linear::forward_many(&[&self.q_proj, &self.k_proj, &self.v_proj], xs)?[..]
        else {
            unreachable!("three layers give three products")
        };
        let query = self.split_heads(&(query * self.scaling)?)?;
        let key = self.split_heads(key)?;
        let value = self.split_heads(value)?;
        let (key, value) = cache.append(&key, &value)?;
        let attended = scaled_dot_product_attention(&query, &key, &value, Some(mask), 1.0)?;
        let merged = attended.transpose(1, 2)?.reshape((rows, tokens, hidden))?;
        self.out_proj.forward(&merged)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    final_layer_norm: LayerNorm,
    activation: Activation,
    layer_norm_before: bool,
}

impl DecoderLayer {
    fn load(settings: &OptSettings, vb: Weights) -> Result<Self> {
        let (hidden, ffn, bias) = (settings.hidden_size, settings.ffn_dim, settings.bias);
        Ok(Self {
            self_attn: Attention::load(settings, vb.pp("self_attn"))?,
            self_attn_layer_norm: layer_norm(settings, vb.pp("self_attn_layer_norm"))?,
            fc1: linear_maybe_bias(hidden, ffn, bias, vb.pp("fc1"))?,
            fc2: linear_maybe_bias(ffn, hidden, bias, vb.pp("fc2"))?,
            final_layer_norm: layer_norm(settings, vb.pp("final_layer_norm"))?,
            activation: settings.activation,
            layer_norm_before: settings.layer_norm_before,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let attention_input = if self.layer_norm_before {
            self.self_attn_layer_norm.forward(xs)?
        } else {
            xs.clone()
        };
        let mut xs = add(&self.self_attn.forward(&attention_input, mask, cache)?, xs)?;
        if !self.layer_norm_before {
            xs = self.self_attn_layer_norm.forward(&xs)?;
        }

        let ffn_input = if self.layer_norm_before {
            self.final_layer_norm.forward(&xs)?
        } else {
            xs.clone()
        };
        let ffn_out = self
            .fc2
            .forward(&self.activation.forward(&self.fc1.forward(&ffn_input)?)?)?;
        let mut xs = add(&ffn_out, &xs)?;
        if !self.layer_norm_before {
            xs = self.final_layer_norm.forward(&xs)?;
        }
        Ok(xs)
    }
}

/// The OPT decoder with its language-model head.
#[derive(Debug, Clone)]
pub struct OptModel {
    embed_tokens: TokenEmbedding,
    embed_positions: Embedding,
    project_in: Option<Linear>,
    project_out: Option<Linear>,
    layers: Vec<DecoderLayer>,
    final_layer_norm: Option<LayerNorm>,
    lm_head: Linear,
    settings: OptSettings,
    dtype: DType,
    device: Device,
}

impl OptModel {
    /// Loads `model.decoder.*` and `lm_head.weight` under `vb` (the `language_model`
    /// prefix of a BLIP-2 checkpoint).
    ///
    /// When `lm_head.weight` is absent and `tie_word_embeddings` is set, the output
    /// projection reuses the token embeddings, as transformers does (it saves tied
    /// weights once).
    pub fn load(settings: &OptSettings, vb: Weights) -> Result<Self> {
        let _span = tracing::debug_span!("load_opt", layers = settings.num_layers).entered();
        let decoder = vb.pp("model.decoder");
        let embed_tokens = decoder
            .pp("embed_tokens")
            .token_embedding(settings.vocab_size, settings.embedding_size)?;
        let embed_positions = decoder.pp("embed_positions").embedding(
            settings.max_positions + OPT_POSITION_OFFSET,
            settings.hidden_size,
        )?;
        let (project_in, project_out) = if settings.embedding_size != settings.hidden_size {
            (
                Some(linear_no_bias(
                    settings.embedding_size,
                    settings.hidden_size,
                    decoder.pp("project_in"),
                )?),
                Some(linear_no_bias(
                    settings.hidden_size,
                    settings.embedding_size,
                    decoder.pp("project_out"),
                )?),
            )
        } else {
            (None, None)
        };
        let layers = (0..settings.num_layers)
            .map(|i| DecoderLayer::load(settings, decoder.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = if settings.final_layer_norm {
            Some(layer_norm(settings, decoder.pp("final_layer_norm"))?)
        } else {
            None
        };
        let lm_head = if vb.contains_tensor("lm_head.weight") || !settings.tie_word_embeddings {
            linear_no_bias(
                settings.embedding_size,
                settings.vocab_size,
                vb.pp("lm_head"),
            )?
        } else {
            embed_tokens.as_linear()
        };
        Ok(Self {
            dtype: vb.dtype(),
            device: embed_positions.embeddings().device().clone(),
            lm_head,
            embed_tokens,
            embed_positions,
            project_in,
            project_out,
            layers,
            final_layer_norm,
            settings: settings.clone(),
        })
    }

    /// Every fully connected layer, the output layer included, with its checkpoint name.
    fn named_linears(&mut self) -> Vec<(String, &mut Linear)> {
        let mut linears = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let prefix = format!("model.decoder.layers.{i}");
            let attention = &mut layer.self_attn;
            for (name, linear) in [
                ("self_attn.q_proj", &mut attention.q_proj),
                ("self_attn.k_proj", &mut attention.k_proj),
                ("self_attn.v_proj", &mut attention.v_proj),
                ("self_attn.out_proj", &mut attention.out_proj),
                ("fc1", &mut layer.fc1),
                ("fc2", &mut layer.fc2),
            ] {
                linears.push((format!("{prefix}.{name}"), linear));
            }
        }
        if let Some(linear) = self.project_in.as_mut() {
            linears.push(("model.decoder.project_in".to_owned(), linear));
        }
        if let Some(linear) = self.project_out.as_mut() {
            linears.push(("model.decoder.project_out".to_owned(), linear));
        }
        linears.push(("lm_head".to_owned(), &mut self.lm_head));
        linears
    }

    /// The settings the model was built from.
    pub fn settings(&self) -> &OptSettings {
        &self.settings
    }

    /// Runs the decoder over `inputs_embeds` `[rows, tokens, embedding_size]` at
    /// `positions` `[rows, tokens]` (u32, already offset) and returns the next-token
    /// logits of the last position, `[rows, vocab]` in `f32`.
    fn forward(
        &self,
        inputs_embeds: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        caches: &mut [KvCache],
    ) -> Result<Tensor> {
        let mut xs = inputs_embeds.clone();
        if let Some(project_in) = &self.project_in {
            xs = project_in.forward(&xs)?;
        }
        xs = (xs + self.embed_positions.forward(positions)?)?;
        for (layer, cache) in self.layers.iter().zip(caches.iter_mut()) {
            xs = layer.forward(&xs, mask, cache)?;
        }

        let tokens = xs.dim(1)?;
        let mut last = xs.i((.., tokens - 1..tokens, ..))?.contiguous()?;
        if let Some(norm) = &self.final_layer_norm {
            last = norm.forward(&last)?;
        }
        if let Some(project_out) = &self.project_out {
            last = project_out.forward(&last)?;
        }
        let logits = self.lm_head.forward(&last.squeeze(1)?)?;
        logits.to_dtype(DType::F32)
    }
}

impl LanguageModel for OptModel {
    fn embed_tokens(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.forward(input_ids)?.to_dtype(self.dtype)
    }

    fn embedding_size(&self) -> usize {
        self.settings.embedding_size
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
        Some(self.settings.max_positions)
    }

    fn is_encoder_decoder(&self) -> bool {
        false
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

        // Positions count real tokens only, so left padding does not shift them;
        // padding slots read row `OFFSET - 1`, as transformers' cumsum formula gives.
        let mut positions = Vec::with_capacity(rows * tokens);
        let mut real_counts = Vec::with_capacity(rows);
        for row in &mask {
            let mut seen = 0u32;
            for &keep in row {
                if keep == 1 {
                    positions.push(seen + OPT_POSITION_OFFSET as u32);
                    seen += 1;
                } else {
                    positions.push(OPT_POSITION_OFFSET as u32 - 1);
                }
            }
            real_counts.push(seen);
        }
        let longest = *real_counts.iter().max().unwrap_or(&0) as usize;
        // The last generated token is never fed back, so it needs no position.
        if longest + capacity.saturating_sub(1) > self.settings.max_positions {
            candle_core::bail!(
                "the prompt ({longest} positions including the image queries) plus {capacity} new tokens \
                 exceeds the model's {} positions",
                self.settings.max_positions
            );
        }
        let device = self.device();
        let positions = Tensor::from_vec(positions, (rows, tokens), device)?;
        let causal = prefill_mask(&mask, device)?;

        let template = Tensor::zeros(
            (
                rows,
                self.settings.num_heads,
                0,
                self.settings.hidden_size / self.settings.num_heads,
            ),
            self.dtype(),
            device,
        )?;
        let mut caches = (0..self.layers.len())
            .map(|_| KvCache::new(&template, tokens + capacity))
            .collect::<Result<Vec<_>>>()?;
        let logits = self.forward(
            &inputs_embeds.to_dtype(self.dtype())?,
            &positions,
            &causal,
            &mut caches,
        )?;
        let session = OptSession {
            model: self,
            caches,
            mask,
            real_counts,
        };
        Ok((Box::new(session), logits))
    }
}

/// Causal plus padding mask `[rows, 1, tokens, tokens]` for the prompt pass.
fn prefill_mask(mask: &[Vec<u8>], device: &Device) -> Result<Tensor> {
    let rows = mask.len();
    let tokens = mask.first().map_or(0, Vec::len);
    let blocked = additive_mask_value();
    let mut values = Vec::with_capacity(rows * tokens * tokens);
    for row in mask {
        for query in 0..tokens {
            for (key, &keep) in row.iter().enumerate() {
                let visible = key <= query && keep == 1;
                values.push(if visible { 0.0 } else { blocked });
            }
        }
    }
    Tensor::from_vec(values, (rows, 1, tokens, tokens), device)
}

/// A running OPT generation: one KV cache per layer and the mask of every row.
struct OptSession<'a> {
    model: &'a OptModel,
    caches: Vec<KvCache>,
    mask: Vec<Vec<u8>>,
    real_counts: Vec<u32>,
}

impl DecodeSession for OptSession<'_> {
    fn step(&mut self, tokens: &[u32]) -> Result<Tensor> {
        let rows = self.mask.len();
        if tokens.len() != rows {
            candle_core::bail!(
                "expected one token for each of the {rows} rows, got {}",
                tokens.len()
            );
        }
        let device = self.model.device();
        let ids = Tensor::from_vec(tokens.to_vec(), (rows, 1), device)?;
        let embeds = self.model.embed_tokens(&ids)?;
        let positions: Vec<u32> = self
            .real_counts
            .iter()
            .map(|&n| n + OPT_POSITION_OFFSET as u32)
            .collect();
        let positions = Tensor::from_vec(positions, (rows, 1), device)?;

        for row in &mut self.mask {
            row.push(1);
        }
        for count in &mut self.real_counts {
            *count += 1;
        }
        let length = self.mask[0].len();
        let blocked = additive_mask_value();
        let values: Vec<f32> = self
            .mask
            .iter()
            .flat_map(|row| {
                row.iter()
                    .map(move |&keep| if keep == 1 { 0.0 } else { blocked })
            })
            .collect();
        let mask = Tensor::from_vec(values, (rows, 1, 1, length), device)?;
        self.model
            .forward(&embeds, &positions, &mask, &mut self.caches)
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
        self.mask = rows.iter().map(|&r| self.mask[r].clone()).collect();
        self.real_counts = rows.iter().map(|&r| self.real_counts[r]).collect();
        Ok(())
    }
}
