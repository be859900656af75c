use candle_core::{D, DType, Result, Tensor};

/// The value added to attention scores at masked positions.
///
/// It is finite on purpose: a fully masked row (a padding query) then gets a
/// uniform distribution instead of NaN, and NaN would leak into other rows through
/// `0 * NaN` in the value product. PyTorch reference code uses the same
/// `torch.finfo(float32).min`.
pub fn additive_mask_value() -> f32 {
    f32::MIN
}

/// Scaled dot-product attention.
///
/// Shapes: `query` `[batch, heads, q_len, head_dim]`, `key` and `value`
/// `[batch, heads, kv_len, head_dim]`; `mask` is additive, in `f32`, and broadcasts to
/// `[batch, heads, q_len, kv_len]`. Scores and softmax are computed in `f32` whatever
/// the input dtype; the result has the dtype of `value`, shape `[batch, heads, q_len,
/// head_dim]`.
pub fn scaled_dot_product_attention(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let scores = query.contiguous()?.matmul(&matmul_operand(&key.t()?)?)?;
    let mut scores = scores.to_dtype(DType::F32)?;
    if scale != 1.0 {
        scores = (scores * scale)?;
    }
    if let Some(mask) = mask {
        scores = scores.broadcast_add(mask)?;
    }
    let weights = candle_nn::ops::softmax_last_dim(&scores)?;
    weights
        .to_dtype(value.dtype())?
        .matmul(&matmul_operand(value)?)
}

/// Returns `xs` itself when the CPU matmul reads its layout as it is (any strides
/// within a matrix, batch dimensions that collapse to one stride), else a contiguous
/// copy. A decoding step then reads the KV cache in place instead of copying it.
fn matmul_operand(xs: &Tensor) -> Result<Tensor> {
    let readable = match (xs.dims(), xs.stride()) {
        _ if !xs.device().is_cpu() => false,
        ([d0, d1, _, _], [s0, s1, _, _]) => *d0 == 1 || *d1 == 1 || *s0 == s1 * d1,
        (dims, _) => dims.len() <= 3,
    };
    if readable {
        Ok(xs.clone())
    } else {
        xs.contiguous()
    }
}

/// Softmax over the last dimension in `f32`, returned in `f32`.
pub fn softmax_f32(xs: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(&xs.to_dtype(DType::F32)?, D::Minus1)
}
