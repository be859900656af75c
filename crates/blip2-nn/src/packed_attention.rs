//! Attention of many queries in bfloat16 on the CPU, head by head with the packed
//! bfloat16 kernel, as the vision encoder needs it.
//!
//! Through tensor operations the scores take candle's bfloat16 product, are rounded to
//! bfloat16, and pass through separate conversion, scaling and softmax operations over
//! the whole `[batch, heads, queries, keys]` array. Here each head is one task: its keys
//! and values are packed once, its scores stay in `f32` from the product through the
//! softmax, and only the softmax weights are rounded to bfloat16 for the product with
//! the values.

use candle_core::{DType, Result, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::convert::Element;
use crate::convert::bf16_values;
use crate::kernels::packed_bf16::PackedBf16;
use crate::kernels::{cpu_features, vectorized};

/// Queries from which the packed path pays for packing each head's keys and values.
const MIN_QUERIES: usize = 16;

/// Computes `softmax(scale · q·kᵀ) · v` for bfloat16 `[batch, heads, positions,
/// head_dim]` operands without a mask, or returns `None` where this path does not apply
/// (another device or dtype, a mask, few queries, no AVX-512 BF16).
pub(crate) fn packed_attention(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Option<Tensor>> {
    let applies = mask.is_none()
        && query.device().is_cpu()
        && [query, key, value].iter().all(|t| t.dtype() == DType::BF16)
        && cpu_features().avx512_bf16;
    if !applies {
        return Ok(None);
    }
    // Other shapes go to the tensor operations, whose errors name the mismatch.
    let (Ok((batch, heads, queries, head_dim)), Ok(key_dims), Ok(value_dims)) =
        (query.dims4(), key.dims4(), value.dims4())
    else {
        return Ok(None);
    };
    let keys = key_dims.2;
    if key_dims != (batch, heads, keys, head_dim) || value_dims != key_dims {
        return Ok(None);
    }
    if queries < MIN_QUERIES || keys == 0 || head_dim == 0 {
        return Ok(None);
    }
    let (q, k, v) = (bf16_values(query)?, bf16_values(key)?, bf16_values(value)?);
    let mut out = vec![bf16::ZERO; batch * heads * queries * head_dim];
    out.par_chunks_mut(queries * head_dim)
        .enumerate()
        .try_for_each(|(head, out)| {
            let q = &q[head * queries * head_dim..(head + 1) * queries * head_dim];
            let k = &k[head * keys * head_dim..(head + 1) * keys * head_dim];
            let v = &v[head * keys * head_dim..(head + 1) * keys * head_dim];
            attend(q, k, v, queries, keys, head_dim, scale as f32, out)
        })
        .map_err(candle_core::Error::Msg)?;
    Tensor::from_vec(out, (batch, heads, queries, head_dim), query.device()).map(Some)
}

/// Attends one head: `q` `[queries, head_dim]`, `k` and `v` `[keys, head_dim]`, into
/// `out` `[queries, head_dim]`.
#[allow(clippy::too_many_arguments)]
fn attend(
    q: &[bf16],
    k: &[bf16],
    v: &[bf16],
    queries: usize,
    keys: usize,
    head_dim: usize,
    scale: f32,
    out: &mut [bf16],
) -> std::result::Result<(), String> {
    let scores = PackedBf16::from_bf16(k, keys, head_dim)?.matmul(q, queries, None, |s| s * scale);
    let mut weights = vec![bf16::ZERO; queries * keys];
    for (row, weights) in scores
        .chunks_exact(keys)
        .zip(weights.chunks_exact_mut(keys))
    {
        softmax_row(row, weights);
    }
    // The value product reads `v` transposed: one weight row per output feature.
    let mut transposed = vec![bf16::ZERO; head_dim * keys];
    for (j, row) in v.chunks_exact(head_dim).enumerate() {
        for (c, &value) in row.iter().enumerate() {
            transposed[c * keys + j] = value;
        }
    }
    let attended = PackedBf16::from_bf16(&transposed, head_dim, keys)?.matmul(
        &weights,
        queries,
        None,
        <bf16 as Element>::from_f32,
    );
    out.copy_from_slice(&attended);
    Ok(())
}

/// Writes the softmax of one row of scores to `weights`, rounded to bfloat16.
fn softmax_row(scores: &[f32], weights: &mut [bf16]) {
    vectorized(
        #[inline(always)]
        || {
            let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            // Plain loops rather than `collect`, whose code is not inlined here and so would
            // not be compiled for AVX-512.
            let mut exponentials = vec![0f32; scores.len()];
            for (e, &s) in exponentials.iter_mut().zip(scores) {
                *e = crate::gelu::exp_negative(s - max);
            }
            let inverse = 1.0 / lane_sum(&exponentials);
            for (weight, e) in weights.iter_mut().zip(exponentials) {
                *weight = Element::from_f32(e * inverse);
            }
        },
    )
}

/// Sums `values` in 16 interleaved partial sums, which the compiler vectorises where it
/// would keep one running sum scalar.
#[inline(always)]
fn lane_sum(values: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = values.chunks_exact(16);
    let rest: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += v;
        }
    }
    lanes.iter().sum::<f32>() + rest
}
