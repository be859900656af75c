//! Conversions between tensors and the `f32` or bfloat16 values the CPU kernels read
//! and write.
//!
//! They run in plain loops on the calling thread, and round to bfloat16 without branches
//! so that the compiler vectorises the loop.

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};
use half::{bf16, f16};

use crate::kernels::round_to_bf16;

/// A value type of the CPU kernels, whose arithmetic is in `f32`.
pub(crate) trait Element: Copy + Default + Send + Sync {
    /// Widens the value to `f32`, exactly.
    fn to_f32(self) -> f32;
    /// Rounds to nearest even, as `half`'s `from_f32` does.
    fn from_f32(value: f32) -> Self;
}

impl Element for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        value
    }
}

impl Element for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    /// Unlike `bf16::from_f32`, this compiles to vector code in loops.
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        bf16::from_bits(round_to_bf16(value))
    }
}

impl Element for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        f16::from_f32(value)
    }
}

/// Returns the values of `xs` in row-major order, as `f32`.
pub fn f32_values(xs: &Tensor) -> Result<Vec<f32>> {
    if xs.dtype() == DType::BF16 && xs.is_contiguous() {
        let (storage, layout) = xs.storage_and_layout();
        if let Storage::Cpu(CpuStorage::BF16(values)) = &*storage {
            let start = layout.start_offset();
            return Ok(widen(&values[start..start + xs.elem_count()]));
        }
    }
    let xs = xs.flatten_all()?;
    match xs.dtype() {
        DType::F32 => xs.to_vec1::<f32>(),
        DType::BF16 => Ok(xs.to_vec1::<bf16>()?.iter().map(|v| v.to_f32()).collect()),
        DType::F16 => Ok(xs.to_vec1::<f16>()?.iter().map(|v| v.to_f32()).collect()),
        _ => xs.to_dtype(DType::F32)?.to_vec1::<f32>(),
    }
}

/// Converts bfloat16 values straight from the tensor's memory, in one vectorised pass
/// rather than a copy and then a conversion.
fn widen(values: &[bf16]) -> Vec<f32> {
    crate::kernels::vectorized(
        #[inline(always)]
        || values.iter().map(|&v| Element::to_f32(v)).collect(),
    )
}

/// Calls `f` with the values of `xs` in row-major order, as `f32`. A contiguous `f32`
/// CPU tensor lends its own memory, and any other is converted into a new buffer. A copy
/// into fresh memory also costs page faults: for the vision encoder's 6 MiB second MLP
/// input, about 3 ms on a 2-core Xeon, 15 % of that product's time.
pub fn with_f32_values<R>(xs: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if xs.dtype() == DType::F32 && xs.is_contiguous() {
        let (storage, layout) = xs.storage_and_layout();
        if let Storage::Cpu(CpuStorage::F32(values)) = &*storage {
            let start = layout.start_offset();
            return Ok(f(&values[start..start + xs.elem_count()]));
        }
    }
    Ok(f(&f32_values(xs)?))
}

/// Returns the values of `xs` in row-major order, rounded to bfloat16.
pub fn bf16_values(xs: &Tensor) -> Result<Vec<bf16>> {
    if xs.dtype() == DType::BF16 {
        return xs.flatten_all()?.to_vec1::<bf16>();
    }
    Ok(to_bf16(&f32_values(xs)?))
}

/// Builds a tensor of `shape` and `dtype` on `device` from `values`.
pub fn tensor_from_f32(
    values: Vec<f32>,
    shape: Vec<usize>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    match dtype {
        DType::F32 => Tensor::from_vec(values, shape, device),
        DType::BF16 => Tensor::from_vec(to_bf16(&values), shape, device),
        DType::F16 => Tensor::from_vec(
            values
                .iter()
                .map(|&v| Element::from_f32(v))
                .collect::<Vec<f16>>(),
            shape,
            device,
        ),
        _ => Tensor::from_vec(values, shape, device)?.to_dtype(dtype),
    }
}

/// Rounds `values` to bfloat16, to nearest even as `bf16::from_f32` does, in a loop the
/// compiler vectorises.
pub fn to_bf16(values: &[f32]) -> Vec<bf16> {
    values.iter().map(|&v| Element::from_f32(v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_match_tensor_operations() -> Result<()> {
        let values: Vec<f32> = (0..300).map(|i| (i as f32 - 150.0) * 0.377).collect();
        let xs = Tensor::from_vec(values.clone(), (3, 100), &Device::Cpu)?;
        // A transposed view is read in row-major order of its own shape.
        let view = xs.t()?;
        assert_eq!(f32_values(&view)?, view.flatten_all()?.to_vec1::<f32>()?);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let expected = xs.to_dtype(dtype)?;
            let ours = tensor_from_f32(values.clone(), vec![3, 100], dtype, &Device::Cpu)?;
            assert_eq!(ours.dtype(), dtype);
            let difference = (ours.to_dtype(DType::F32)? - expected.to_dtype(DType::F32)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert_eq!(difference, 0.0, "{dtype:?}");
            assert_eq!(
                f32_values(&expected)?,
                expected
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
            );
        }
        assert_eq!(
            bf16_values(&xs)?,
            xs.to_dtype(DType::BF16)?.flatten_all()?.to_vec1::<bf16>()?
        );
        // bfloat16 read in place from an offset into its storage, and a transposed view.
        let halves = xs.to_dtype(DType::BF16)?;
        for view in [halves.narrow(0, 1, 2)?, halves.t()?] {
            assert_eq!(
                f32_values(&view)?,
                view.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?
            );
        }
        Ok(())
    }

    #[test]
    fn lent_values_match_copies() -> Result<()> {
        let values: Vec<f32> = (0..300).map(|i| (i as f32 - 150.0) * 0.377).collect();
        let xs = Tensor::from_vec(values, (3, 100), &Device::Cpu)?;
        // Contiguous (lent), offset into its storage (lent), transposed and bfloat16
        // (converted).
        let cases = [
            xs.clone(),
            xs.narrow(0, 1, 2)?,
            xs.t()?,
            xs.to_dtype(DType::BF16)?,
        ];
        for case in &cases {
            let lent = with_f32_values(case, |values| values.to_vec())?;
            assert_eq!(lent, f32_values(case)?, "{:?}", case.layout());
        }
        Ok(())
    }
}
