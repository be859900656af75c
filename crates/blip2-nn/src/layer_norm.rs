use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, D, DType, Layout, Module, Result, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::convert::Element;
use crate::kernels::vectorized;

/// Layer normalisation over the last dimension, with PyTorch's semantics.
///
/// Mean and variance are computed in two passes with `f64` sums. candle's fused
/// kernel uses the one-pass `E[x²] - E[x]²` in `f32`, which loses precision on the
/// large-mean rows that big language models produce. The same type also serves as
/// T5's RMS norm (no mean, no bias), see [`LayerNorm::rms`].
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    eps: f64,
    remove_mean: bool,
}

impl LayerNorm {
    /// Loads `weight` and `bias` of shape `[size]`, as `torch.nn.LayerNorm` stores them.
    pub fn load(vb: crate::Weights, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: Some(vb.get(size, "weight")?),
            bias: Some(vb.get(size, "bias")?),
            eps,
            remove_mean: true,
        })
    }

    /// A layer norm without learned parameters (`elementwise_affine=False`).
    pub fn without_affine(eps: f64) -> Self {
        Self {
            weight: None,
            bias: None,
            eps,
            remove_mean: true,
        }
    }

    /// Loads an RMS norm (T5's `T5LayerNorm`): scale only, no mean subtraction, no bias.
    pub fn rms(vb: crate::Weights, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: Some(vb.get(size, "weight")?),
            bias: None,
            eps,
            remove_mean: false,
        })
    }

    fn forward_generic(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let xs = xs.to_dtype(DType::F32)?;
        let xs = if self.remove_mean {
            xs.broadcast_sub(&xs.mean_keepdim(D::Minus1)?)?
        } else {
            xs
        };
        let variance = xs.sqr()?.mean_keepdim(D::Minus1)?;
        let mut ys = xs.broadcast_div(&(variance + self.eps)?.sqrt()?)?;
        if let Some(weight) = &self.weight {
            ys = ys.broadcast_mul(&weight.to_dtype(DType::F32)?)?;
        }
        if let Some(bias) = &self.bias {
            ys = ys.broadcast_add(&bias.to_dtype(DType::F32)?)?;
        }
        ys.to_dtype(dtype)
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if !xs.device().is_cpu() {
            return self.forward_generic(xs);
        }
        let to_f32 = |t: &Option<Tensor>| -> Result<Option<Vec<f32>>> {
            t.as_ref()
                .map(|t| t.to_dtype(DType::F32)?.to_vec1::<f32>())
                .transpose()
        };
        let op = RowNorm {
            weight: to_f32(&self.weight)?,
            bias: to_f32(&self.bias)?,
            eps: self.eps,
            remove_mean: self.remove_mean,
        };
        xs.contiguous()?.apply_op1_no_bwd(&op)
    }
}

/// The CPU kernel: one row of the last dimension at a time.
struct RowNorm {
    weight: Option<Vec<f32>>,
    bias: Option<Vec<f32>>,
    eps: f64,
    remove_mean: bool,
}

impl RowNorm {
    #[inline(always)]
    fn normalize_row(&self, row: &[f32], out: &mut [f32]) {
        let n = row.len() as f64;
        let mean = if self.remove_mean {
            lane_sum(row, |v| v as f64) / n
        } else {
            0.0
        };
        let variance = lane_sum(row, |v| {
            let centered = v as f64 - mean;
            centered * centered
        }) / n;
        let inv_std = 1.0 / (variance + self.eps).sqrt();
        for (o, &v) in out.iter_mut().zip(row) {
            *o = ((v as f64 - mean) * inv_std) as f32;
        }
        if let Some(weight) = &self.weight {
            for (o, w) in out.iter_mut().zip(weight) {
                *o *= w;
            }
        }
        if let Some(bias) = &self.bias {
            for (o, b) in out.iter_mut().zip(bias) {
                *o += b;
            }
        }
    }

    fn run<T: Copy + Send + Sync>(
        &self,
        src: &[T],
        width: usize,
        to_f32: impl Fn(T) -> f32 + Sync,
        from_f32: impl Fn(f32) -> T + Sync,
    ) -> Vec<T> {
        let mut dst = src.to_vec();
        let task = width * ROWS_PER_TASK;
        src.par_chunks(task)
            .zip(dst.par_chunks_mut(task))
            .for_each(|(rows, outs)| {
                vectorized(
                    #[inline(always)]
                    || {
                        let mut row = vec![0f32; width];
                        let mut normed = vec![0f32; width];
                        for (input, out) in rows.chunks(width).zip(outs.chunks_mut(width)) {
                            for (r, &v) in row.iter_mut().zip(input) {
                                *r = to_f32(v);
                            }
                            self.normalize_row(&row, &mut normed);
                            for (o, &v) in out.iter_mut().zip(&normed) {
                                *o = from_f32(v);
                            }
                        }
                    },
                )
            });
        dst
    }
}

/// Rows per task, enough to outweigh the cost of handing a task to a thread.
const ROWS_PER_TASK: usize = 8;

/// Partial sums kept side by side. The compiler does not reorder floating-point sums, so
/// one running sum stays scalar and each addition waits for the one before.
const LANES: usize = 8;

/// Sums `f` over `row` in `f64`, in `LANES` interleaved partial sums.
#[inline(always)]
fn lane_sum(row: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut lanes = [0f64; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest: f64 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f(v);
        }
    }
    lanes.iter().sum::<f64>() + rest
}

impl CustomOp1 for RowNorm {
    fn name(&self) -> &'static str {
        "blip2-layer-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("layer norm input must be contiguous".into()))?;
        let shape = layout.shape().clone();
        let width = shape.dims().last().copied().unwrap_or(1);
        for (name, param) in [("weight", &self.weight), ("bias", &self.bias)] {
            if let Some(param) = param
                && param.len() != width
            {
                candle_core::bail!(
                    "layer norm {name} has {} elements but the input's last dimension is {width}",
                    param.len()
                );
            }
        }
        let storage = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(self.run(&v[start..end], width, |x| x, |x| x)),
            CpuStorage::F16(v) => {
                CpuStorage::F16(self.run(&v[start..end], width, f16::to_f32, f16::from_f32))
            }
            CpuStorage::BF16(v) => CpuStorage::BF16(self.run(
                &v[start..end],
                width,
                bf16::to_f32,
                <bf16 as Element>::from_f32,
            )),
            other => candle_core::bail!("layer norm does not support dtype {:?}", other.dtype()),
        };
        Ok((storage, shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::max_abs_difference;
    use candle_core::Device;

    #[test]
    fn large_mean_rows_keep_precision() {
        let device = Device::Cpu;
        // Rows whose mean is far larger than their spread, where one-pass variance fails.
        let values: Vec<f32> = (0..64).map(|i| 1000.0 + (i % 7) as f32 * 0.01).collect();
        let xs = Tensor::from_vec(values.clone(), (2, 32), &device).unwrap();
        let norm = LayerNorm::without_affine(1e-5);
        let actual = norm
            .forward(&xs)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (row_index, row) in values.chunks(32).enumerate() {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / 32.0;
            let variance = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / 32.0;
            for (j, &v) in row.iter().enumerate() {
                let expected = (v as f64 - mean) / (variance + 1e-5).sqrt();
                let got = actual[row_index * 32 + j] as f64;
                assert!(
                    (got - expected).abs() < 1e-4,
                    "row {row_index} column {j}: {got} vs {expected}"
                );
            }
        }
    }

    #[test]
    fn kernel_matches_tensor_ops_in_half_precision() {
        let device = Device::Cpu;
        let xs = Tensor::randn(0f32, 1f32, (3, 16), &device).unwrap();
        let weight = Tensor::randn(1f32, 0.1f32, 16, &device).unwrap();
        let bias = Tensor::randn(0f32, 0.1f32, 16, &device).unwrap();
        let norm = LayerNorm {
            weight: Some(weight),
            bias: Some(bias),
            eps: 1e-6,
            remove_mean: true,
        };
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let input = xs.to_dtype(dtype).unwrap();
            let kernel = norm.forward(&input).unwrap().to_dtype(DType::F32).unwrap();
            let generic = norm
                .forward_generic(&input)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let diff = max_abs_difference(&kernel, &generic);
            let tolerance = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
            assert!(
                diff < tolerance,
                "{dtype:?}: kernel and tensor-op paths differ by {diff}"
            );
        }
    }
}
