//! Residual sums and ReLU on the CPU, computed on rayon's threads.
//!
//! candle 0.11 runs element-wise operations of 64Ki elements or more on a thread pool of
//! its own. Between the kernels, which run on rayon's threads, that second pool competes
//! for the cores, because its workers spin after each operation while rayon's start the
//! next product. On two cores, in two comparisons, a 4-bit prompt prefill took 0.95 and
//! 1.01 s with candle's sums, 0.69 and 0.88 s with these, which keep one pool.
//!
//! NOTE: other large candle operations still use that pool, among them the mask sum of
//! attention outside the bf16 packed path, and SiLU and tanh GELU.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::convert::Element;

/// Elements one task computes.
const CHUNK: usize = 16 * 1024;

/// Computes `a + b`. Tensors of one shape and dtype on the CPU are summed on rayon's
/// threads, and other cases (broadcasting, other devices) go to candle.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.device().is_cpu() && a.shape() == b.shape() && a.dtype() == b.dtype() {
        a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &Add)
    } else {
        a + b
    }
}

/// Computes `max(x, 0)`, on rayon's threads for CPU tensors.
pub fn relu(xs: &Tensor) -> Result<Tensor> {
    if xs.device().is_cpu() {
        xs.contiguous()?.apply_op1_no_bwd(&Relu)
    } else {
        xs.relu()
    }
}

fn contiguous<'a, T>(values: &'a [T], layout: &Layout, operation: &str) -> Result<&'a [T]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{operation} input must be contiguous")))?;
    Ok(&values[start..end])
}

/// Applies `f` to pairs of elements, chunk by chunk on rayon's threads.
fn zip_map<T: Copy + Default + Send + Sync>(
    a: &[T],
    b: &[T],
    f: impl Fn(T, T) -> T + Sync,
) -> Vec<T> {
    let mut out = vec![T::default(); a.len()];
    if a.len() <= CHUNK {
        // One chunk, as in a decoding step: handing it to rayon would cost more than the sum.
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = f(x, y);
        }
        return out;
    }
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(out, (a, b))| {
            for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
                *o = f(x, y);
            }
        });
    out
}

/// Applies `f` to each element, chunk by chunk on rayon's threads.
fn map<T: Copy + Default + Send + Sync>(a: &[T], f: impl Fn(T) -> T + Sync) -> Vec<T> {
    let mut out = vec![T::default(); a.len()];
    if a.len() <= CHUNK {
        for (o, &x) in out.iter_mut().zip(a) {
            *o = f(x);
        }
        return out;
    }
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK))
        .for_each(|(out, a)| {
            for (o, &x) in out.iter_mut().zip(a) {
                *o = f(x);
            }
        });
    out
}

struct Add;

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "blip2-add"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        a_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let storage = match (a, b) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                CpuStorage::F32(sum(a, a_layout, b, b_layout)?)
            }
            (CpuStorage::BF16(a), CpuStorage::BF16(b)) => {
                CpuStorage::BF16(sum(a, a_layout, b, b_layout)?)
            }
            (CpuStorage::F16(a), CpuStorage::F16(b)) => {
                CpuStorage::F16(sum(a, a_layout, b, b_layout)?)
            }
            (a, b) => candle_core::bail!(
                "add does not support dtypes {:?} and {:?}",
                a.dtype(),
                b.dtype()
            ),
        };
        Ok((storage, a_layout.shape().clone()))
    }
}

/// Sums two contiguous operands in `f32` and rounds the result, as `bf16 + bf16` and
/// `f16 + f16` do.
fn sum<T: Element>(a: &[T], a_layout: &Layout, b: &[T], b_layout: &Layout) -> Result<Vec<T>> {
    Ok(zip_map(
        contiguous(a, a_layout, "add")?,
        contiguous(b, b_layout, "add")?,
        |x, y| T::from_f32(x.to_f32() + y.to_f32()),
    ))
}

struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "blip2-relu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let storage = match storage {
            CpuStorage::F32(v) => {
                CpuStorage::F32(map(contiguous(v, layout, "relu")?, |x| x.max(0.0)))
            }
            CpuStorage::BF16(v) => {
                CpuStorage::BF16(map(contiguous(v, layout, "relu")?, |x| x.max(bf16::ZERO)))
            }
            CpuStorage::F16(v) => {
                CpuStorage::F16(map(contiguous(v, layout, "relu")?, |x| x.max(f16::ZERO)))
            }
            other => candle_core::bail!("relu does not support dtype {:?}", other.dtype()),
        };
        Ok((storage, layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    fn values(xs: &Tensor) -> Result<Vec<f32>> {
        xs.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
    }

    #[test]
    fn results_match_candle() -> Result<()> {
        // Several chunks and a partial one.
        let len = 3 * CHUNK + 77;
        let data: Vec<f32> = (0..2 * len)
            .map(|i| ((i * 37 % 1001) as f32 - 500.0) * 0.0137)
            .collect();
        let a = Tensor::from_vec(data[..len].to_vec(), len, &Device::Cpu)?;
        let b = Tensor::from_vec(data[len..].to_vec(), len, &Device::Cpu)?;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let (a, b) = (a.to_dtype(dtype)?, b.to_dtype(dtype)?);
            let sum = add(&a, &b)?;
            assert_eq!(sum.dtype(), dtype);
            assert_eq!(values(&sum)?, values(&(&a + &b)?)?, "{dtype:?}");
            assert_eq!(values(&relu(&a)?)?, values(&a.relu()?)?, "{dtype:?}");
        }
        // A transposed view is read in its own row-major order.
        let m = Tensor::from_vec(data[..600].to_vec(), (20, 30), &Device::Cpu)?.t()?;
        let n = Tensor::from_vec(data[600..1200].to_vec(), (30, 20), &Device::Cpu)?;
        assert_eq!(values(&add(&m, &n)?)?, values(&(&m + &n)?)?);
        // Mismatched shapes are rejected, as by `+`.
        assert!(add(&m, &a).is_err());
        Ok(())
    }
}
