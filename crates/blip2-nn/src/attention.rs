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
/// head_dim]`. A single query on the CPU (a decoding step) takes one fused pass that
/// also keeps the products in `f32`. Many queries without a mask (the vision encoder)
/// go head by head through the packed bfloat16 kernel on a CPU with AVX-512 BF16, or in
/// `f32` through the AVX-512 float32 kernel.
pub fn scaled_dot_product_attention(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    if let Some(attended) =
        crate::single_query::single_query_attention(query, key, value, mask, scale)?
    {
        return Ok(attended);
    }
    if let Some(attended) =
        crate::packed_attention::packed_attention(query, key, value, mask, scale)?
    {
        return Ok(attended);
    }
    attention_by_tensor_ops(query, key, value, mask, scale)
}

/// Computes scores, softmax and value product with tensor operations (the general path).
fn attention_by_tensor_ops(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::max_abs_difference;
    use candle_core::{Device, IndexOp};

    #[test]
    fn packed_attention_matches_f32_tensor_ops() {
        if !crate::kernels::cpu_features().avx512_bf16 {
            return;
        }
        let device = Device::Cpu;
        // An odd number of keys and a head size that is not a multiple of 32.
        let (batch, heads, positions, head_dim) = (2, 3, 37, 24);
        let shape = (batch, heads, positions, head_dim);
        let [query, key, value] = [0, 1, 2].map(|_| {
            Tensor::randn(0f32, 1.0, shape, &device)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
        });

        let packed = crate::packed_attention::packed_attention(&query, &key, &value, None, 0.2)
            .unwrap()
            .expect("the packed path applies");
        assert_eq!(packed.dims(), &[batch, heads, positions, head_dim]);
        assert_eq!(packed.dtype(), DType::BF16);

        let [query, key, value] = [query, key, value].map(|t| t.to_dtype(DType::F32).unwrap());
        let expected = attention_by_tensor_ops(&query, &key, &value, None, 0.2).unwrap();
        let difference = max_abs_difference(&packed.to_dtype(DType::F32).unwrap(), &expected);
        // Rounding the weights and the output to bfloat16.
        assert!(difference < 2e-2, "difference {difference}");

        // A mask or few queries leave it to the other paths.
        let mask = Tensor::zeros((1, 1, positions, positions), DType::F32, &device).unwrap();
        let bf16 = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let (query, key, value) = (bf16(&query), bf16(&key), bf16(&value));
        for (query, mask) in [
            (&query, Some(&mask)),
            (&query.narrow(2, 0, 3).unwrap(), None),
        ] {
            let result =
                crate::packed_attention::packed_attention(query, &key, &value, mask, 0.2).unwrap();
            assert!(result.is_none());
        }
    }

    #[test]
    fn f32_head_attention_matches_tensor_ops() {
        if !crate::kernels::cpu_features().avx512 {
            return;
        }
        let device = Device::Cpu;
        let shape = (2, 3, 37, 24);
        let [query, key, value] =
            [0, 1, 2].map(|_| Tensor::randn(0f32, 1.0, shape, &device).unwrap());
        let by_head = crate::packed_attention::packed_attention(&query, &key, &value, None, 0.2)
            .unwrap()
            .expect("the head-by-head path applies");
        assert_eq!(by_head.dtype(), DType::F32);
        let expected = attention_by_tensor_ops(&query, &key, &value, None, 0.2).unwrap();
        let difference = max_abs_difference(&by_head, &expected);
        assert!(difference < 1e-5, "difference {difference}");
    }

    #[test]
    fn single_query_matches_tensor_ops() {
        let device = Device::Cpu;
        let (batch, heads, allocated, head_dim) = (2, 3, 12, 20);
        // Keys and values are views into a larger buffer, as a cache returns them.
        let cache = Tensor::randn(0f32, 1.0, (batch, heads, allocated, head_dim), &device).unwrap();
        let query = Tensor::randn(0f32, 1.0, (batch, heads, 1, head_dim), &device).unwrap();
        let mut mask = vec![0f32; batch * 9];
        mask[9] = additive_mask_value(); // the second row's first position is padding
        let mask = Tensor::from_vec(mask, (batch, 1, 1, 9), &device).unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let cache = cache.to_dtype(dtype).unwrap();
            let key = cache.i((.., .., 0..9, ..)).unwrap();
            let value = cache.i((.., .., 3..12, ..)).unwrap();
            let query = query.to_dtype(dtype).unwrap();
            for mask in [None, Some(&mask)] {
                let fused =
                    crate::single_query::single_query_attention(&query, &key, &value, mask, 0.3)
                        .unwrap()
                        .expect("the single-query pass applies");
                let general = attention_by_tensor_ops(&query, &key, &value, mask, 0.3).unwrap();
                assert_eq!(fused.dims(), general.dims());
                assert_eq!(fused.dtype(), dtype);
                let tolerance = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
                let difference = max_abs_difference(
                    &fused.to_dtype(DType::F32).unwrap(),
                    &general.to_dtype(DType::F32).unwrap(),
                );
                assert!(difference < tolerance, "{dtype:?}: difference {difference}");
            }
        }
    }
}
