//! The exact GELU, `x · Φ(x)`, on the CPU with an error function that vectorises.
//!
//! candle computes it one element at a time through libm's `erf`, which costs more than
//! the feed-forward product around it in bf16. Here `erf` is a branch-free polynomial
//! (Abramowitz and Stegun 7.1.26, absolute error below 1.5e-7) over an `exp` built the
//! same way, so the compiler turns whole chunks into vector code.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};
use rayon::prelude::*;

use crate::convert::Element;
use crate::kernels::vectorized;

/// Elements converted to `f32` and processed together.
const CHUNK: usize = 4096;

/// The custom operation behind [`crate::Activation::GeluErf`] on the CPU.
pub(crate) struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "blip2-gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("GELU input must be contiguous".into()))?;
        let storage = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(apply(&v[start..end])),
            CpuStorage::F16(v) => CpuStorage::F16(apply(&v[start..end])),
            CpuStorage::BF16(v) => CpuStorage::BF16(apply(&v[start..end])),
            other => candle_core::bail!("GELU does not support dtype {:?}", other.dtype()),
        };
        Ok((storage, layout.shape().clone()))
    }
}

fn apply<T: Element>(src: &[T]) -> Vec<T> {
    let mut dst = vec![T::default(); src.len()];
    src.par_chunks(CHUNK)
        .zip(dst.par_chunks_mut(CHUNK))
        .for_each(|(input, output)| {
            vectorized(
                #[inline(always)]
                || {
                    for (o, &v) in output.iter_mut().zip(input) {
                        *o = T::from_f32(gelu(v.to_f32()));
                    }
                },
            )
        });
    dst
}

/// Computes `x · Φ(x) = x/2 · (1 + erf(x/√2))`.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Computes the error function to within 1.5e-7 (Abramowitz and Stegun 7.1.26).
#[inline(always)]
fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let polynomial = ((((A[4] * t + A[3]) * t + A[2]) * t + A[1]) * t + A[0]) * t;
    let magnitude = 1.0 - polynomial * exp_negative(-a * a);
    magnitude.copysign(x)
}

/// Computes `eˣ` for `x ≤ 0` without branches, to about one unit in the last place.
///
/// `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`. The integer `n` becomes the exponent bits of
/// `2ⁿ`, and `eʳ` comes from the Cephes polynomial for `expf`. Inputs below -87 give
/// `e⁻⁸⁷`, which stays a normal number and is below anything the callers can see.
#[inline(always)]
pub(crate) fn exp_negative(x: f32) -> f32 {
    // Adding 1.5 · 2²³ rounds to an integer and leaves it in the low mantissa bits.
    const ROUNDING: f32 = 12_582_912.0;
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    let x = x.max(-87.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUNDING;
    let n = shifted - ROUNDING;
    let r = x - n * LN2_HIGH - n * LN2_LOW;
    let polynomial =
        (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
            + 0.166_666_65)
            * r
            + 0.5)
            * r
            * r
            + r
            + 1.0;
    let exponent = (shifted.to_bits() as i32).wrapping_sub(ROUNDING.to_bits() as i32);
    let scale = f32::from_bits(((exponent + 127) << 23) as u32);
    polynomial * scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std() {
        for i in 0..=10_000 {
            let x = -87.0 * i as f32 / 10_000.0;
            let (got, expected) = (exp_negative(x), x.exp());
            assert!(
                (got - expected).abs() <= 3e-7 * expected,
                "exp({x}): {got} vs {expected}"
            );
        }
    }

    #[test]
    fn gelu_matches_libm_erf() {
        for i in -12_000..=12_000 {
            let x = i as f32 / 1000.0;
            let expected = 0.5 * x as f64 * (1.0 + libm_erf(x as f64 / std::f64::consts::SQRT_2));
            let got = gelu(x) as f64;
            assert!(
                (got - expected).abs() <= 1e-6 * (1.0 + expected.abs()),
                "gelu({x}): {got} vs {expected}"
            );
        }
    }

    #[test]
    fn avx512_code_gives_the_same_bits() {
        let inputs: Vec<f32> = (-40_000..=40_000).map(|i| i as f32 / 3000.0).collect();
        let portable: Vec<f32> = inputs.iter().map(|&x| gelu(x)).collect();
        let mut vectorized_out = vec![0f32; inputs.len()];
        vectorized(
            #[inline(always)]
            || {
                for (o, &x) in vectorized_out.iter_mut().zip(&inputs) {
                    *o = gelu(x);
                }
            },
        );
        for ((x, a), b) in inputs.iter().zip(&portable).zip(&vectorized_out) {
            assert_eq!(a.to_bits(), b.to_bits(), "gelu({x})");
        }
    }

    #[test]
    fn special_values_pass_through() {
        assert!(gelu(f32::NAN).is_nan());
        assert_eq!(gelu(f32::INFINITY), f32::INFINITY);
        assert_eq!(gelu(0.0), 0.0);
        assert_eq!(gelu(-30.0), -0.0);
    }

    /// Computes the error function in `f64` with candle's scalar implementation.
    fn libm_erf(x: f64) -> f64 {
        candle_core::cpu::erf::erf_f64(x)
    }
}
