//! Attention of many queries on the CPU, head by head with the packed bfloat16 kernel
//! or the AVX-512 float32 one, as the vision encoder needs it.
//!
//! Through tensor operations the scores take candle's bfloat16 product, are rounded to
//! bfloat16, and pass through separate conversion, scaling and softmax operations over
//! the whole `[batch, heads, queries, keys]` array. Here each head is one task: its keys
//! and values are packed once, its scores stay in `f32` from the product through the
//! softmax, and only the softmax weights are rounded to bfloat16 for the product with
//! the values. In float32 the same head-by-head order keeps each head's scores in the
//! cache and runs both products on the AVX-512 kernel rather than the `gemm` crate's.

use std::borrow::Cow;

use candle_core::{DType, Result, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::convert::Element;
use crate::convert::{bf16_values, f32_values};
use crate::kernels::packed_bf16::PackedBf16;
use crate::kernels::{cpu_features, gemm_f32, vectorized};

/// Queries from which the packed path pays for packing each head's keys and values.
const MIN_QUERIES: usize = 16;
/// Depth in bfloat16 values of one AMX tile step (pairs of values).
const AMX_DEPTH: usize = 2 * crate::kernels::AMX_STEP;

/// Computes `softmax(scale · q·kᵀ) · v` for bfloat16 or float32 `[batch, heads,
/// positions, head_dim]` operands without a mask, or returns `None` where this path does
/// not apply (another device or dtype, a mask, few queries, no AVX-512 BF16 for bfloat16
/// or no AVX-512 for float32).
pub(crate) fn packed_attention(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Option<Tensor>> {
    let all = |dtype| [query, key, value].iter().all(|t| t.dtype() == dtype);
    let features = cpu_features();
    let f32_applies = all(DType::F32) && features.avx512;
    let applies = mask.is_none()
        && query.device().is_cpu()
        && (f32_applies || (all(DType::BF16) && features.avx512_bf16));
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
    let shape = Shape {
        heads: batch * heads,
        queries,
        keys,
        head_dim,
    };
    let scale = scale as f32;
    let out = if f32_applies {
        let (q, k, v) = (f32_values(query)?, f32_values(key)?, f32_values(value)?);
        let out = head_by_head(&q, &k, &v, shape, |q, k, v, out| {
            attend_f32(q, k, v, queries, keys, head_dim, scale, out);
            Ok(())
        })?;
        Tensor::from_vec(out, (batch, heads, queries, head_dim), query.device())
    } else {
        let (q, k, v) = (bf16_values(query)?, bf16_values(key)?, bf16_values(value)?);
        let out = head_by_head(&q, &k, &v, shape, |q, k, v, out| {
            attend(q, k, v, queries, keys, head_dim, scale, out)
        })?;
        Tensor::from_vec(out, (batch, heads, queries, head_dim), query.device())
    };
    out.map(Some)
}

/// Sizes of the attention operands, with batch and heads merged.
#[derive(Clone, Copy)]
struct Shape {
    heads: usize,
    queries: usize,
    keys: usize,
    head_dim: usize,
}

/// Runs `attend(q, k, v, out)` on each head's slices, one task per head, and returns
/// the outputs `[heads, queries, head_dim]`.
fn head_by_head<T: Element>(
    q: &[T],
    k: &[T],
    v: &[T],
    shape: Shape,
    attend: impl Fn(&[T], &[T], &[T], &mut [T]) -> std::result::Result<(), String> + Sync,
) -> Result<Vec<T>> {
    let query_size = shape.queries * shape.head_dim;
    let key_size = shape.keys * shape.head_dim;
    let mut out = vec![T::default(); shape.heads * query_size];
    out.par_chunks_mut(query_size)
        .enumerate()
        .try_for_each(|(head, out)| {
            let q = &q[head * query_size..(head + 1) * query_size];
            let k = &k[head * key_size..(head + 1) * key_size];
            let v = &v[head * key_size..(head + 1) * key_size];
            attend(q, k, v, out)
        })
        .map_err(candle_core::Error::Msg)?;
    Ok(out)
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
    // Both products sum over a depth padded with zeros to whole AMX tile steps, so that
    // they run on AMX where the processor has it. The zeros add nothing to the sums.
    let depth = head_dim.next_multiple_of(AMX_DEPTH);
    let (q, k) = (pad_rows(q, head_dim, depth), pad_rows(k, head_dim, depth));
    let scores = PackedBf16::from_bf16(&k, keys, depth)?.matmul(&q, queries, None, |s| s * scale);
    let padded_keys = keys.next_multiple_of(AMX_DEPTH);
    let mut weights = vec![bf16::ZERO; queries * padded_keys];
    for (row, weights) in scores
        .chunks_exact(keys)
        .zip(weights.chunks_exact_mut(padded_keys))
    {
        softmax_row(row, &mut weights[..keys]);
    }
    let transposed = transpose(v, keys, head_dim);
    let transposed = pad_rows(&transposed, keys, padded_keys);
    let attended = PackedBf16::from_bf16(&transposed, head_dim, padded_keys)?.matmul(
        &weights,
        queries,
        None,
        <bf16 as Element>::from_f32,
    );
    out.copy_from_slice(&attended);
    Ok(())
}

/// Attends one head as [`attend`] does, in float32 throughout.
#[allow(clippy::too_many_arguments)]
fn attend_f32(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    queries: usize,
    keys: usize,
    head_dim: usize,
    scale: f32,
    out: &mut [f32],
) {
    let mut scores = vec![0f32; queries * keys];
    gemm_f32(k, q, None, &mut scores, queries, keys, head_dim);
    let mut weights = vec![0f32; queries * keys];
    for (row, weights) in scores
        .chunks_exact_mut(keys)
        .zip(weights.chunks_exact_mut(keys))
    {
        for score in row.iter_mut() {
            *score *= scale;
        }
        softmax_row(row, weights);
    }
    gemm_f32(
        &transpose(v, keys, head_dim),
        &weights,
        None,
        out,
        queries,
        head_dim,
        keys,
    );
}

/// Returns `values` `[rows, cols]` as rows of `width ≥ cols` values, zeros after `cols`
/// (`values` itself when the width is already `cols`).
fn pad_rows<T: Copy + Default>(values: &[T], cols: usize, width: usize) -> Cow<'_, [T]> {
    if width == cols {
        return Cow::Borrowed(values);
    }
    let mut padded = vec![T::default(); values.len() / cols * width];
    for (row, padded) in values
        .chunks_exact(cols)
        .zip(padded.chunks_exact_mut(width))
    {
        padded[..cols].copy_from_slice(row);
    }
    Cow::Owned(padded)
}

/// Transposes `values` `[rows, cols]` to `[cols, rows]`, because the value product
/// reads one row per output feature.
fn transpose<T: Copy + Default>(values: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut transposed = vec![T::default(); rows * cols];
    for (j, row) in values.chunks_exact(cols).enumerate() {
        for (c, &value) in row.iter().enumerate() {
            transposed[c * rows + j] = value;
        }
    }
    transposed
}

/// Writes the softmax of one row of scores to `weights`, rounded to the weights' type.
fn softmax_row<T: Element>(scores: &[f32], weights: &mut [T]) {
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
                *weight = T::from_f32(e * inverse);
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
