//! Quantized products with many input rows, such as a prompt's prefill.
//!
//! With many input rows the 8-bit product is bound by arithmetic rather than memory:
//! every `vpdpbusd` needs a conversion and a multiply-add for its block scales. Where the
//! processor has AVX-512 BF16, each group of four weight rows is instead widened to
//! bfloat16 once, then meets every input row with `vdpbf16ps`, which needs nothing per
//! block. Activations are rounded to bfloat16, as in the bfloat16 model.

use half::bf16;

use super::{BLOCK, GROUP_ROWS, QuantKind, QuantMatrix};

/// Input rows from which [`QuantMatrix::matmul_many`] widens the weights, if it can.
pub(super) const MIN_INPUTS: usize = 8;

impl QuantMatrix {
    /// Computes the products of rows `first..` (a group's first row) with every input row of `x`
    /// `[inputs, cols]`, into `outputs` `[rows, inputs]`.
    pub(super) fn rows_products_widened(
        &self,
        first: usize,
        x: &[bf16],
        outputs: &mut [f32],
        inputs: usize,
        use_simd: bool,
    ) {
        assert!(first.is_multiple_of(GROUP_ROWS));
        assert_eq!(x.len(), inputs * self.cols, "inputs must be inputs × cols");
        let count = outputs.len() / inputs;
        let mut weights = vec![bf16::ZERO; GROUP_ROWS * self.cols];
        let mut r = 0;
        while r < count {
            let group_rows = GROUP_ROWS.min(self.rows - (first + r));
            assert!(r + group_rows <= count, "tasks contain whole groups");
            self.widen_group(first + r, &mut weights, use_simd);
            let group_outputs = &mut outputs[r * inputs..(r + group_rows) * inputs];
            if use_simd && group_rows == GROUP_ROWS {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `use_simd` is set only where the features were detected, and the
                // slices contain four weight rows, every input row and their outputs.
                unsafe {
                    group_tiles_avx512(&weights, x, self.cols, inputs, group_outputs)
                };
            } else {
                for (row, row_outputs) in weights
                    .chunks_exact(self.cols)
                    .zip(group_outputs.chunks_exact_mut(inputs))
                {
                    for (output, input) in row_outputs.iter_mut().zip(x.chunks_exact(self.cols)) {
                        *output = dot_portable(row, input);
                    }
                }
            }
            r += group_rows;
        }
    }

    /// Writes the rows of the group at `first` (up to four) to `out`, `cols` values each.
    fn widen_group(&self, first: usize, out: &mut [bf16], use_simd: bool) {
        let group_rows = GROUP_ROWS.min(self.rows - first);
        #[cfg(target_arch = "x86_64")]
        if use_simd {
            // SAFETY: `use_simd` is set only where the features were detected.
            unsafe { self.widen_pairs_avx512(first, group_rows, out) };
            if (self.cols / BLOCK) % 2 == 1 {
                self.widen_last_block(first, group_rows, out);
            }
            return;
        }
        let _ = use_simd;
        for i in 0..group_rows {
            let row = self.dequantize_row(first + i);
            for (value, w) in out[i * self.cols..(i + 1) * self.cols].iter_mut().zip(row) {
                *value = bf16::from_f32(w);
            }
        }
    }

    /// Widens the unpaired last block of each row of a group.
    #[cfg(target_arch = "x86_64")]
    fn widen_last_block(&self, first: usize, group_rows: usize, out: &mut [bf16]) {
        let start = self.cols - BLOCK;
        for i in 0..group_rows {
            let row = self.dequantize_row(first + i);
            for (value, &w) in out[i * self.cols + start..(i + 1) * self.cols]
                .iter_mut()
                .zip(&row[start..])
            {
                *value = bf16::from_f32(w);
            }
        }
    }

    /// Widens every pair of blocks of the group's rows: 64 codes and two scales at a time.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn widen_pairs_avx512(&self, first: usize, group_rows: usize, out: &mut [bf16]) {
        use std::arch::x86_64::*;
        let blocks = self.cols / BLOCK;
        let block_bytes = self.kind.block_bytes();
        assert!(out.len() >= group_rows * self.cols);
        assert!((first + group_rows) * blocks <= self.scales.len());
        for p in 0..blocks / 2 {
            for i in 0..group_rows {
                // The layout of `slot`: a group's pairs of blocks, row after row.
                let pair_slot = first * blocks + 2 * (p * group_rows + i);
                // SAFETY: the pair lies inside the group, checked above: 64 bytes for a
                // pair of Q8 blocks, 32 for Q4.
                let pointer = unsafe { self.codes.as_ptr().add(pair_slot * block_bytes) };
                let scales = [self.scales[pair_slot], self.scales[pair_slot + 1]];
                // SAFETY: the caller detected the features, and the pointer addresses the
                // pair's codes.
                let halves = match self.kind {
                    QuantKind::Q8 => unsafe { widen_q8_pair(pointer, scales) },
                    QuantKind::Q4 => unsafe { widen_q4_pair(pointer, scales) },
                };
                let destination = i * self.cols + 2 * p * BLOCK;
                // SAFETY: the 64 values of the pair lie inside row `i` of `out`.
                unsafe {
                    let pointer = out.as_mut_ptr().add(destination);
                    _mm512_storeu_si512(pointer.cast(), halves[0]);
                    _mm512_storeu_si512(pointer.add(BLOCK).cast(), halves[1]);
                }
            }
        }
    }
}

/// Widens a pair of Q8 blocks to bfloat16: `(code - 128) · scale` in `f32`, then rounded.
///
/// # Safety
/// `pointer` must address 64 readable bytes, and the CPU must have the features.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn widen_q8_pair(pointer: *const u8, scales: [f32; 2]) -> [std::arch::x86_64::__m512i; 2] {
    use std::arch::x86_64::*;
    // SAFETY: guaranteed by the caller.
    let codes = unsafe { _mm512_loadu_si512(pointer.cast()) };
    let offset = _mm512_set1_ps(QuantKind::Q8.offset() as f32);
    let value = |bytes: __m128i, scale: f32| {
        let stored = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
        _mm512_mul_ps(_mm512_sub_ps(stored, offset), _mm512_set1_ps(scale))
    };
    let quarters = [
        value(_mm512_extracti32x4_epi32::<0>(codes), scales[0]),
        value(_mm512_extracti32x4_epi32::<1>(codes), scales[0]),
        value(_mm512_extracti32x4_epi32::<2>(codes), scales[1]),
        value(_mm512_extracti32x4_epi32::<3>(codes), scales[1]),
    ];
    // SAFETY: a vector of 32 bfloat16 values is 64 bytes, like the integer vector.
    unsafe {
        [
            std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(quarters[1], quarters[0])),
            std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(quarters[3], quarters[2])),
        ]
    }
}

/// Widens a pair of Q4 blocks to bfloat16 by table lookup. A block has only 16 values,
/// `(code - 8) · scale`, so each block's table is computed once and `vpermw` picks each
/// code's entry.
///
/// # Safety
/// `pointer` must address the pair's 32 packed bytes, and the CPU must have the
/// features.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn widen_q4_pair(pointer: *const u8, scales: [f32; 2]) -> [std::arch::x86_64::__m512i; 2] {
    use std::arch::x86_64::*;
    let levels = _mm512_set_ps(
        7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0,
    );
    let table = |scale: f32| {
        let values = _mm512_cvtneps_pbh(_mm512_mul_ps(levels, _mm512_set1_ps(scale)));
        // SAFETY: 16 bfloat16 values are 32 bytes, like the integer vector.
        _mm512_castsi256_si512(unsafe { std::mem::transmute::<__m256bh, __m256i>(values) })
    };
    // Byte `i` holds code `i` of the first block in its low nibble and code `i` of the
    // second in its high nibble (see `pack_row_nibbles`).
    // SAFETY: guaranteed by the caller.
    let bytes = _mm512_cvtepu8_epi16(unsafe { _mm256_loadu_si256(pointer.cast()) });
    let first = _mm512_and_si512(bytes, _mm512_set1_epi16(0x0F));
    let second = _mm512_srli_epi16::<4>(bytes);
    [
        _mm512_permutexvar_epi16(first, table(scales[0])),
        _mm512_permutexvar_epi16(second, table(scales[1])),
    ]
}

/// One dot product in `f32`/// Computes one dot product in `f32`, the fallback and the reference of the SIMD tiles.
fn dot_portable(w: &[bf16], x: &[bf16]) -> f32 {
    w.iter().zip(x).map(|(w, x)| w.to_f32() * x.to_f32()).sum()
}

/// Computes the products of four widened weight rows `[4, cols]` with every input row of `x`, into
/// `outputs` `[4, inputs]`, in tiles of four rows by up to four inputs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn group_tiles_avx512(
    weights: &[bf16],
    x: &[bf16],
    cols: usize,
    inputs: usize,
    outputs: &mut [f32],
) {
    assert!(cols.is_multiple_of(BLOCK));
    assert!(weights.len() >= GROUP_ROWS * cols);
    assert!(x.len() >= inputs * cols);
    assert!(outputs.len() >= GROUP_ROWS * inputs);
    let mut m = 0;
    while m < inputs {
        let x = &x[m * cols..];
        // SAFETY (each call): the tile's rows and inputs were checked above.
        m += unsafe {
            match inputs - m {
                left if left >= 4 => tile_avx512::<4>(weights, x, cols, &mut outputs[m..], inputs),
                left if left >= 2 => tile_avx512::<2>(weights, x, cols, &mut outputs[m..], inputs),
                _ => tile_avx512::<1>(weights, x, cols, &mut outputs[m..], inputs),
            }
        };
    }
}

/// Multiplies four weight rows by `M` input rows: 4·M sums of 16 lanes stay in registers for
/// the whole width. Returns `M`. Output `[i][j]` goes to `outputs[i · stride + j]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_avx512<const M: usize>(
    weights: &[bf16],
    x: &[bf16],
    cols: usize,
    outputs: &mut [f32],
    stride: usize,
) -> usize {
    use std::arch::x86_64::*;
    assert!(weights.len() >= GROUP_ROWS * cols);
    assert!(x.len() >= M * cols);
    assert!(outputs.len() > (GROUP_ROWS - 1) * stride + M - 1);
    let (w, a) = (weights.as_ptr(), x.as_ptr());
    let mut sums = [[_mm512_setzero_ps(); M]; GROUP_ROWS];
    for k in (0..cols).step_by(32) {
        // SAFETY (all loads): k + 32 <= cols, so each load stays in its row, checked above.
        let rows: [__m512bh; GROUP_ROWS] = std::array::from_fn(|i| unsafe {
            std::mem::transmute(_mm512_loadu_si512(w.add(i * cols + k).cast()))
        });
        for j in 0..M {
            let input: __m512bh =
                unsafe { std::mem::transmute(_mm512_loadu_si512(a.add(j * cols + k).cast())) };
            for (row_sums, &row) in sums.iter_mut().zip(&rows) {
                row_sums[j] = _mm512_dpbf16_ps(row_sums[j], row, input);
            }
        }
    }
    for (i, row) in sums.iter().enumerate() {
        for (j, &sum) in row.iter().enumerate() {
            outputs[i * stride + j] = _mm512_reduce_add_ps(sum);
        }
    }
    M
}

#[cfg(test)]
mod tests {
    use super::super::super::tests::pseudo_random;
    use super::*;
    use crate::kernels::cpu_features;

    /// Widened products, SIMD or not, against the dequantized weights in `f64`.
    #[test]
    fn widened_products_match_dequantized_weights() {
        // Odd block counts, a short last group and every tile width.
        for (rows, cols, inputs) in [(8, 64, 9), (13, 96, 11), (6, 160, 8), (20, 1024, 16)] {
            for kind in [QuantKind::Q8, QuantKind::Q4] {
                let w = pseudo_random(rows * cols, 41);
                let q = QuantMatrix::quantize(kind, &w, rows, cols).unwrap();
                let x = crate::convert::to_bf16(&pseudo_random(inputs * cols, 42));
                let mut modes = vec![false];
                if cpu_features().avx512_bf16 {
                    modes.push(true);
                }
                for use_simd in modes {
                    let mut outputs = vec![0f32; rows * inputs];
                    q.rows_products_widened(0, &x, &mut outputs, inputs, use_simd);
                    for r in 0..rows {
                        let weights = q.dequantize_row(r);
                        for m in 0..inputs {
                            let expected: f64 = (0..cols)
                                .map(|k| {
                                    f64::from(weights[k]) * f64::from(x[m * cols + k].to_f32())
                                })
                                .sum();
                            let got = f64::from(outputs[r * inputs + m]);
                            // Weights rounded to bfloat16: 2⁻⁹ relative each.
                            let tolerance = 0.01 * (cols as f64).sqrt();
                            assert!(
                                (got - expected).abs() < tolerance,
                                "{kind:?} {rows}×{cols}, simd {use_simd}, [{r}, {m}]: \
                                 {got} vs {expected}"
                            );
                        }
                    }
                }
            }
        }
    }
}
