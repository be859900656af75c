use blip2_nn::Weights;
use blip2_nn::elementwise::add;
use blip2_nn::{
    Activation, LayerNorm, Linear, linear, linear_with_bias, scaled_dot_product_attention,
};
use candle_core::{DType, Module, Result, Tensor};

use crate::{VisionEncoder, VisionSettings, resize_position_grid};

/// Patch, class-token and position embeddings.
#[derive(Debug, Clone)]
struct Embeddings {
    /// Patch projection as a matrix `[hidden, 3 * patch * patch]`, transposed for matmul.
    patch_weight_t: Tensor,
    patch_bias: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    patch_size: usize,
    grid_size: usize,
    hidden_size: usize,
}

impl Embeddings {
    fn load(settings: &VisionSettings, vb: Weights) -> Result<Self> {
        let hidden = settings.hidden_size;
        let patch = settings.patch_size;
        let conv_weight = vb.get((hidden, 3, patch, patch), "patch_embedding.weight")?;
        Ok(Self {
            patch_weight_t: conv_weight
                .reshape((hidden, 3 * patch * patch))?
                .t()?
                .contiguous()?,
            patch_bias: vb.get(hidden, "patch_embedding.bias")?,
            class_embedding: vb.get((1, 1, hidden), "class_embedding")?,
            position_embedding: vb
                .get((1, settings.num_positions(), hidden), "position_embedding")?,
            patch_size: patch,
            grid_size: settings.grid_size(),
            hidden_size: hidden,
        })
    }

    /// Position embeddings for a `grid_height × grid_width` patch grid, `[1, 1 + patches, hidden]`.
    ///
    /// The trained grid is returned as is; any other grid is bicubically resized, as
    /// transformers does with `interpolate_pos_encoding=True`.
    fn positions_for(&self, grid_height: usize, grid_width: usize) -> Result<Tensor> {
        if grid_height == self.grid_size && grid_width == self.grid_size {
            return Ok(self.position_embedding.clone());
        }
        let dtype = self.position_embedding.dtype();
        let class_position = self.position_embedding.narrow(1, 0, 1)?;
        let grid = self
            .position_embedding
            .narrow(1, 1, self.grid_size * self.grid_size)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let resized = resize_position_grid(
            &grid,
            self.grid_size,
            self.hidden_size,
            grid_height,
            grid_width,
        );
        let resized = Tensor::from_vec(
            resized,
            (1, grid_height * grid_width, self.hidden_size),
            class_position.device(),
        )?
        .to_dtype(dtype)?;
        Tensor::cat(&[&class_position, &resized], 1)
    }

    /// `[batch, 3, height, width]` → `[batch, 1 + patches, hidden]`.
    fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (batch, channels, height, width) = pixel_values.dims4()?;
        if channels != 3 {
            candle_core::bail!("pixel_values must have 3 channels, got {channels}");
        }
        let p = self.patch_size;
        let (grid_height, grid_width) = (height / p, width / p);
        if grid_height == 0 || grid_width == 0 {
            candle_core::bail!("a {height}×{width} image is smaller than one {p}×{p} patch");
        }
        // A strided convolution without padding ignores the rows and columns that do not
        // fill a whole patch; so does this unfold.
        let pixels = pixel_values
            .to_dtype(self.patch_weight_t.dtype())?
            .narrow(2, 0, grid_height * p)?
            .narrow(3, 0, grid_width * p)?;
        let patches = pixels
            .reshape((batch, 3, grid_height, p, grid_width, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((batch * grid_height * grid_width, 3 * p * p))?;
        let patch_embeds = patches
            .matmul(&self.patch_weight_t)?
            .broadcast_add(&self.patch_bias)?
            .reshape((batch, grid_height * grid_width, self.hidden_size))?;

        let class_embeds = self.class_embedding.expand((batch, 1, self.hidden_size))?;
        let embeddings = Tensor::cat(&[&class_embeds, &patch_embeds], 1)?;
        embeddings.broadcast_add(&self.positions_for(grid_height, grid_width)?)
    }
}

/// Multi-head self-attention with one fused `qkv` projection.
#[derive(Debug, Clone)]
struct Attention {
    qkv: Linear,
    projection: Linear,
    num_heads: usize,
    scale: f64,
}

impl Attention {
    /// Loads the attention weights.
    ///
    /// Published checkpoints store the bias in one of two layouts: transformers 5 saves
    /// one `qkv.bias` `[3 * hidden]`; older checkpoints (and the original LAVIS weights)
    /// save `q_bias` and `v_bias`, the key part being zero by construction.
    fn load(settings: &VisionSettings, vb: Weights) -> Result<Self> {
        let hidden = settings.hidden_size;
        let bias = if vb.contains_tensor("qkv.bias") {
            Some(vb.get(3 * hidden, "qkv.bias")?)
        } else if vb.contains_tensor("q_bias") || vb.contains_tensor("v_bias") {
            let q_bias = vb.get(hidden, "q_bias")?;
            let v_bias = vb.get(hidden, "v_bias")?;
            Some(Tensor::cat(&[&q_bias, &q_bias.zeros_like()?, &v_bias], 0)?)
        } else if settings.qkv_bias {
            candle_core::bail!(
                "cannot find the attention bias of {}: expected `qkv.bias`, or `q_bias` and `v_bias` \
                 (qkv_bias is true in the config)",
                vb.prefix()
            );
        } else {
            None
        };
        let head_dim = hidden / settings.num_heads;
        Ok(Self {
            qkv: linear_with_bias(hidden, 3 * hidden, vb.pp("qkv"), bias)?,
            projection: linear(hidden, hidden, vb.pp("projection"))?,
            num_heads: settings.num_heads,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// `[batch, tokens, hidden]` → `[batch, tokens, hidden]`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (batch, tokens, hidden) = xs.dims3()?;
        let head_dim = hidden / self.num_heads;
        let qkv = self
            .qkv
            .forward(xs)?
            .reshape((batch, tokens, 3, self.num_heads, head_dim))?
            .permute((2, 0, 3, 1, 4))?;
        let (query, key, value) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
        let attended = scaled_dot_product_attention(&query, &key, &value, None, self.scale)?;
        let merged = attended.transpose(1, 2)?.reshape((batch, tokens, hidden))?;
        self.projection.forward(&merged)
    }
}

/// One pre-norm transformer layer.
#[derive(Debug, Clone)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl EncoderLayer {
    fn load(settings: &VisionSettings, vb: Weights) -> Result<Self> {
        let (hidden, eps) = (settings.hidden_size, settings.layer_norm_eps);
        Ok(Self {
            layer_norm1: LayerNorm::load(vb.pp("layer_norm1"), hidden, eps)?,
            self_attn: Attention::load(settings, vb.pp("self_attn"))?,
            layer_norm2: LayerNorm::load(vb.pp("layer_norm2"), hidden, eps)?,
            fc1: linear(hidden, settings.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: linear(settings.intermediate_size, hidden, vb.pp("mlp.fc2"))?,
            activation: settings.activation,
        })
    }

    fn release_mapped_pages(&self) {
        for linear in [
            &self.self_attn.qkv,
            &self.self_attn.projection,
            &self.fc1,
            &self.fc2,
        ] {
            linear.release_mapped_pages();
        }
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let attended = self.self_attn.forward(&self.layer_norm1.forward(xs)?)?;
        let xs = add(&attended, xs)?;

        let hidden = self.fc1.forward(&self.layer_norm2.forward(&xs)?)?;
        let mlp_out = self.fc2.forward(&self.activation.forward(&hidden)?)?;
        add(&mlp_out, &xs)
    }
}

/// The EVA ViT image encoder of BLIP-2 (`Blip2VisionModel` in transformers).
#[derive(Debug, Clone)]
pub struct EvaVisionModel {
    embeddings: Embeddings,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    settings: VisionSettings,
    release_layers_after_use: bool,
}

impl EvaVisionModel {
    /// Loads the weights under `vb` (usually the `vision_model` prefix), in `vb`'s dtype.
    pub fn load(settings: &VisionSettings, vb: Weights) -> Result<Self> {
        let _span =
            tracing::debug_span!("load_vision_model", layers = settings.num_layers).entered();
        let layers = (0..settings.num_layers)
            .map(|i| EncoderLayer::load(settings, vb.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: Embeddings::load(settings, vb.pp("embeddings"))?,
            layers,
            post_layernorm: LayerNorm::load(
                vb.pp("post_layernorm"),
                settings.hidden_size,
                settings.layer_norm_eps,
            )?,
            settings: settings.clone(),
            release_layers_after_use: false,
        })
    }

    /// The settings the model was built from.
    pub fn settings(&self) -> &VisionSettings {
        &self.settings
    }

    /// Dtype of the weights (and of the output).
    pub fn dtype(&self) -> DType {
        self.embeddings.patch_weight_t.dtype()
    }
}

impl VisionEncoder for EvaVisionModel {
    fn encode(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let _span = tracing::debug_span!("vision_encoder", shape = ?pixel_values.dims()).entered();
        let mut xs = self.embeddings.forward(pixel_values)?;
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
            if self.release_layers_after_use {
                layer.release_mapped_pages();
            }
        }
        self.post_layernorm.forward(&xs.contiguous()?)
    }

    fn hidden_size(&self) -> usize {
        self.settings.hidden_size
    }

    fn quantize_per_row(&mut self) -> Result<usize> {
        let mut quantized = 0;
        for layer in &mut self.layers {
            for linear in [
                &mut layer.self_attn.qkv,
                &mut layer.self_attn.projection,
                &mut layer.fc1,
                &mut layer.fc2,
            ] {
                quantized += usize::from(linear.quantize_per_row()?);
            }
        }
        Ok(quantized)
    }

    fn set_release_layers_after_use(&mut self, release: bool) {
        self.release_layers_after_use = release;
    }
}
