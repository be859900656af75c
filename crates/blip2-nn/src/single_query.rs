//! Attention for one query position, the decoding case, as a single CPU pass.
//!
//! Through tensor operations a decoding step costs about ten dispatches per layer
//! (score product, scaling, mask, softmax, dtype changes, value product, copies), each
//! worth more than the arithmetic for one query. Here every head is one task that reads
//! its keys and values in place, wherever they sit in the cache.

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

use crate::convert::Element;

/// The row layout of a `[batch, heads, positions, head_dim]` operand: the offset of
/// element `(b, h, 0, 0)` and the steps between batches, heads and positions.
#[derive(Clone, Copy)]
struct Rows {
    start: usize,
    batch: usize,
    head: usize,
    position: usize,
}

impl Rows {
    /// Reads the layout, or returns `None` when a row of `head_dim` values is not contiguous.
    fn of(layout: &Layout) -> Option<Self> {
        match layout.stride() {
            [batch, head, position, 1] => Some(Self {
                start: layout.start_offset(),
                batch: *batch,
                head: *head,
                position: *position,
            }),
            _ => None,
        }
    }

    fn at(&self, b: usize, h: usize, position: usize) -> usize {
        self.start + b * self.batch + h * self.head + position * self.position
    }
}

/// Computes attention for `query` `[batch, heads, 1, head_dim]` over `key` and `value`
/// `[batch, heads, positions, head_dim]` with an additive `f32` `mask` that broadcasts to
/// `[batch, heads, 1, positions]`. Returns `None` when this kernel does not apply (not
/// on the CPU, more than one query, a dtype other than f32/bf16/f16, or rows that are
/// not contiguous), and the caller takes the general path.
pub(crate) fn single_query_attention(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Option<Tensor>> {
    let dtype = query.dtype();
    let (batch, heads, queries, head_dim) = query.dims4()?;
    let positions = key.dim(2)?;
    let applies = query.device().is_cpu()
        && queries == 1
        && positions > 0
        && key.dtype() == dtype
        && value.dtype() == dtype
        && key.dims() == value.dims()
        && key.dims() == [batch, heads, positions, head_dim]
        && mask.is_none_or(|m| m.dtype() == DType::F32);
    if !applies {
        return Ok(None);
    }

    let mask = mask
        .map(|m| m.broadcast_as((batch, heads, 1, positions)))
        .transpose()?;
    let (q_storage, q_layout) = query.storage_and_layout();
    let (k_storage, k_layout) = key.storage_and_layout();
    let (v_storage, v_layout) = value.storage_and_layout();
    let (Some(q_rows), Some(k_rows), Some(v_rows)) =
        (Rows::of(q_layout), Rows::of(k_layout), Rows::of(v_layout))
    else {
        return Ok(None);
    };

    let mask_guard = mask.as_ref().map(|m| m.storage_and_layout());
    let mask_view = match &mask_guard {
        Some((storage, layout)) => match (&**storage, layout.stride()) {
            (Storage::Cpu(CpuStorage::F32(values)), [b, h, _, p]) => {
                Some((values.as_slice(), layout.start_offset(), *b, *h, *p))
            }
            _ => return Ok(None),
        },
        None => None,
    };
    let mask_at = |b: usize, h: usize, j: usize| {
        mask_view.map_or(0.0, |(values, start, sb, sh, sp)| {
            values[start + b * sb + h * sh + j * sp]
        })
    };

    let shape = AttentionShape {
        batch,
        heads,
        head_dim,
        positions,
        scale: scale as f32,
    };
    let (Storage::Cpu(q), Storage::Cpu(k), Storage::Cpu(v)) =
        (&*q_storage, &*k_storage, &*v_storage)
    else {
        return Ok(None);
    };
    let rows = (q_rows, k_rows, v_rows);
    let dims = (batch, heads, 1, head_dim);
    let device = query.device();
    let out = match (q, k, v) {
        (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
            Tensor::from_vec(attend(shape, (q, k, v), rows, &mask_at), dims, device)?
        }
        (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
            Tensor::from_vec(attend(shape, (q, k, v), rows, &mask_at), dims, device)?
        }
        (CpuStorage::F16(q), CpuStorage::F16(k), CpuStorage::F16(v)) => {
            Tensor::from_vec(attend(shape, (q, k, v), rows, &mask_at), dims, device)?
        }
        _ => return Ok(None),
    };
    Ok(Some(out))
}

/// The sizes of one attention call and the factor applied to its scores.
#[derive(Clone, Copy)]
struct AttentionShape {
    batch: usize,
    heads: usize,
    head_dim: usize,
    positions: usize,
    scale: f32,
}

/// Runs one task per `(row, head)`: scores, softmax and weighted values, all in `f32`.
fn attend<T: Element>(
    shape: AttentionShape,
    (q, k, v): (&[T], &[T], &[T]),
    (q_rows, k_rows, v_rows): (Rows, Rows, Rows),
    mask_at: &(dyn Fn(usize, usize, usize) -> f32 + Sync),
) -> Vec<T> {
    let AttentionShape {
        batch,
        heads,
        head_dim,
        positions,
        scale,
    } = shape;
    let mut out = vec![T::from_f32(0.0); batch * heads * head_dim];
    out.par_chunks_mut(head_dim)
        .with_min_len(4)
        .enumerate()
        .for_each(|(task, out)| {
            let (b, h) = (task / heads, task % heads);
            let start = q_rows.at(b, h, 0);
            let query: Vec<f32> = q[start..start + head_dim]
                .iter()
                .map(|x| x.to_f32())
                .collect();
            let mut scores: Vec<f32> = (0..positions)
                .map(|j| {
                    let start = k_rows.at(b, h, j);
                    let key = &k[start..start + head_dim];
                    dot(&query, key) * scale + mask_at(b, h, j)
                })
                .collect();
            let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let mut total = 0.0;
            for score in &mut scores {
                *score = (*score - max).exp();
                total += *score;
            }
            let mut sums = vec![0f32; head_dim];
            for (j, weight) in scores.iter().enumerate() {
                let start = v_rows.at(b, h, j);
                for (sum, x) in sums.iter_mut().zip(&v[start..start + head_dim]) {
                    *sum += weight * x.to_f32();
                }
            }
            for (o, sum) in out.iter_mut().zip(&sums) {
                *o = T::from_f32(sum / total);
            }
        });
    out
}

/// Computes a dot product with eight partial sums, which the compiler turns into vector code.
fn dot<T: Element>(a: &[f32], b: &[T]) -> f32 {
    let mut sums = [0f32; 8];
    let (a_lanes, b_lanes) = (a.chunks_exact(8), b.chunks_exact(8));
    let (a_rest, b_rest) = (a_lanes.remainder(), b_lanes.remainder());
    for (a, b) in a_lanes.zip(b_lanes) {
        for lane in 0..8 {
            sums[lane] += a[lane] * b[lane].to_f32();
        }
    }
    let rest: f32 = a_rest.iter().zip(b_rest).map(|(a, b)| a * b.to_f32()).sum();
    sums.iter().sum::<f32>() + rest
}
