//! bfloat16 weights: half the bytes of `f32`, products accumulated in `f32`.
//!
//! On processors with AVX-512 BF16 the activations are rounded to bfloat16 too and
//! `vdpbf16ps` multiplies pairs; elsewhere both sides are widened to `f32`.

use half::bf16;
use rayon::prelude::*;

use super::{CpuFeatures, cpu_features};

/// `out[m][r] = Σ_k x[m][k] · w[r][k]` with bfloat16 `w` `[rows, cols]` and `f32` `x`
/// `[inputs, cols]`; `out` is `[inputs, rows]`.
pub fn gemv_bf16(w: &[bf16], x: &[f32], out: &mut [f32], inputs: usize, rows: usize, cols: usize) {
    assert_eq!(w.len(), rows * cols, "weights must be rows × cols");
    assert_eq!(x.len(), inputs * cols, "inputs must be inputs × cols");
    assert_eq!(out.len(), inputs * rows, "outputs must be inputs × rows");
    let features = cpu_features();
    let x_bf16: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    let mut transposed = vec![0f32; rows * inputs];
    transposed
        .par_chunks_mut(super::ROWS_PER_TASK * inputs)
        .enumerate()
        .for_each(|(task, block)| {
            let first = task * super::ROWS_PER_TASK;
            for (i, outputs) in block.chunks_mut(inputs).enumerate() {
                let row = &w[(first + i) * cols..(first + i + 1) * cols];
                for (m, output) in outputs.iter_mut().enumerate() {
                    *output = dot_bf16(
                        row,
                        &x_bf16[m * cols..(m + 1) * cols],
                        &x[m * cols..(m + 1) * cols],
                        features,
                    );
                }
            }
        });
    for r in 0..rows {
        for m in 0..inputs {
            out[m * rows + r] = transposed[r * inputs + m];
        }
    }
}

fn dot_bf16(w: &[bf16], x_bf16: &[bf16], x: &[f32], features: CpuFeatures) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if features.avx512_bf16 {
        // SAFETY: the features were detected at run time.
        return unsafe { dot_bf16_avx512(w, x_bf16) };
    }
    let _ = (features, x_bf16);
    w.iter().zip(x).map(|(w, x)| w.to_f32() * x).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn dot_bf16_avx512(w: &[bf16], x: &[bf16]) -> f32 {
    use std::arch::x86_64::*;
    let n = w.len().min(x.len());
    let mut acc = [_mm512_setzero_ps(); 2];
    let mut i = 0;
    while i + 64 <= n {
        for (j, sum) in acc.iter_mut().enumerate() {
            // SAFETY: i + 32·j + 32 <= n, within both slices; bf16 is two bytes.
            let vw: __m512bh = unsafe {
                std::mem::transmute(_mm512_loadu_si512(w.as_ptr().add(i + 32 * j).cast()))
            };
            let vx: __m512bh = unsafe {
                std::mem::transmute(_mm512_loadu_si512(x.as_ptr().add(i + 32 * j).cast()))
            };
            *sum = _mm512_dpbf16_ps(*sum, vw, vx);
        }
        i += 64;
    }
    let mut total = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
    while i < n {
        total += w[i].to_f32() * x[i].to_f32();
        i += 1;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::super::tests::pseudo_random;
    use super::*;

    #[test]
    fn products_match_widened_weights() {
        for (inputs, rows, cols) in [(1, 70, 100), (2, 65, 2560)] {
            let w: Vec<bf16> = pseudo_random(rows * cols, 8)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            let x = pseudo_random(inputs * cols, 9);
            let mut out = vec![0f32; inputs * rows];
            gemv_bf16(&w, &x, &mut out, inputs, rows, cols);
            for m in 0..inputs {
                for r in 0..rows {
                    let expected: f32 = (0..cols)
                        .map(|k| w[r * cols + k].to_f32() * x[m * cols + k])
                        .sum();
                    let got = out[m * rows + r];
                    // Rounding the activations to bfloat16 costs about 3 significant digits.
                    let tolerance = 0.01 * (cols as f32).sqrt();
                    assert!(
                        (got - expected).abs() < tolerance,
                        "[{m}, {r}]: {got} vs {expected}"
                    );
                }
            }
        }
    }
}
