//! CPU kernels for the matrix products that dominate BLIP-2's run time.
//!
//! Each kernel has a portable Rust version and, on x86-64, an AVX-512 version chosen
//! at run time when the processor has the needed instructions (`avx512f`, `avx512bw`,
//! `avx512dq`, `avx512vl`, plus `avx512vnni` for int8 and `avx512bf16` for bfloat16). Results of the
//! two versions agree to float rounding; the tests compare them.
//!
//! - [`gemv_f32`]: `y = x · Wᵀ` for a few rows of `x`, streaming `W` once; decoding is
//!   bound by memory bandwidth, so this is what decides the time per token.
//! - [`gemm_f32`]: `y = x · Wᵀ` for many rows of `x` (the vision encoder, prompts), in
//!   blocked register tiles on AVX-512, through the `gemm` crate elsewhere.
//! - [`quant`]: 8-bit and 4-bit weights in blocks of 32 with one scale each, and the
//!   product with activations quantized to 8 bits per block (`vpdpbusd`).
//! - [`bf16`]: bfloat16 weights with `vdpbf16ps`, row by row, for a few input rows.
//! - [`packed_bf16`]: bfloat16 weights in panels for `vdpbf16ps`, for any number of
//!   input rows (the vision encoder and prompts as well as decoding).
//! - [`packed_i8`]: 8-bit weights with one scale per row, in panels for `vpdpbusd`, with
//!   inputs quantized per row; the vision encoder's fastest mode.

mod amx;
pub mod bf16;
#[cfg(target_arch = "x86_64")]
mod f32_avx512;
pub mod packed_bf16;
pub mod packed_i8;
pub mod quant;

/// Packed values (bfloat16 pairs, byte quads) per step of the AMX kernels, which take only
/// depths that are a multiple of it.
pub(crate) use amx::STEP as AMX_STEP;

pub(crate) use packed_bf16::round_to_bf16;

use rayon::prelude::*;

/// What the processor offers the kernels, detected once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuFeatures {
    /// AVX-512 foundation, byte/word, doubleword/quadword and vector-length extensions.
    pub avx512: bool,
    /// AVX-512 VNNI (`vpdpbusd`), for int8 products.
    pub avx512_vnni: bool,
    /// AVX-512 BF16 (`vdpbf16ps`), for bfloat16 products.
    pub avx512_bf16: bool,
    /// Whether f32 decoding prefetches weights into the second-level cache, as measured
    /// faster on AMD, rather than into the first, as measured faster on Intel.
    pub prefetch_to_l2: bool,
}

/// The processor's features (all false off x86-64).
pub fn cpu_features() -> CpuFeatures {
    static FEATURES: std::sync::OnceLock<CpuFeatures> = std::sync::OnceLock::new();
    *FEATURES.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> CpuFeatures {
    let avx512 = is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512vl");
    CpuFeatures {
        avx512,
        avx512_vnni: avx512 && is_x86_feature_detected!("avx512vnni"),
        avx512_bf16: avx512 && is_x86_feature_detected!("avx512bf16"),
        prefetch_to_l2: is_amd(),
    }
}

/// Reports whether the processor is AMD's, from its CPUID vendor string.
#[cfg(target_arch = "x86_64")]
fn is_amd() -> bool {
    // CPUID leaf 0 returns the vendor string in EBX, EDX and ECX.
    let leaf = std::arch::x86_64::__cpuid(0);
    let vendor = [leaf.ebx, leaf.edx, leaf.ecx]
        .map(u32::to_le_bytes)
        .concat();
    vendor == b"AuthenticAMD"
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> CpuFeatures {
    CpuFeatures {
        avx512: false,
        avx512_vnni: false,
        avx512_bf16: false,
        prefetch_to_l2: false,
    }
}

/// Runs `body` in a function compiled for AVX-512 when the processor has it, so that
/// the loops the compiler vectorises inside it (GELU, softmax, layer norm, the inputs and
/// outputs of the packed products) use 512-bit vectors rather than the baseline x86-64
/// target's 128-bit ones. Rust does not fuse a multiply and an add unless asked to, so
/// the results are the same bits either way.
///
/// Mark the closure `#[inline(always)]`: only code inlined into the AVX-512 function is
/// compiled for it, and the compiler does not always inline a large closure by itself.
#[inline(always)]
pub(crate) fn vectorized<R>(body: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if cpu_features().avx512 {
        // SAFETY: the processor has the features `with_avx512` enables.
        return unsafe { with_avx512(body) };
    }
    body()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn with_avx512<R>(body: impl FnOnce() -> R) -> R {
    body()
}

/// Output rows handled together by one task, so that each task streams a
/// contiguous slice of the weights.
const ROWS_PER_TASK: usize = 64;

/// `out[m][n] = Σ_k x[m][k] · w[n][k]` for `m < rows`, with `w` `[n_out, k]` and `x`
/// `[rows, k]` row-major; `out` is `[rows, n_out]`. Parallel over blocks of `w`'s rows.
pub fn gemv_f32(w: &[f32], x: &[f32], out: &mut [f32], rows: usize, n_out: usize, k: usize) {
    assert_eq!(w.len(), n_out * k, "weights must be n_out × k");
    assert_eq!(x.len(), rows * k, "inputs must be rows × k");
    assert_eq!(out.len(), rows * n_out, "outputs must be rows × n_out");
    let features = cpu_features();
    let mut transposed = vec![0f32; n_out * rows];
    transposed
        .par_chunks_mut(ROWS_PER_TASK * rows)
        .enumerate()
        .for_each(|(task, block)| {
            let first = task * ROWS_PER_TASK;
            #[cfg(target_arch = "x86_64")]
            if rows == 1 && features.avx512 {
                // Decoding: four weight rows read side by side keep more memory reads in
                // flight than one row at a time, which a single core needs to reach the
                // machine's bandwidth.
                use std::arch::x86_64::{_MM_HINT_T0, _MM_HINT_T1};
                let whole = block.len() / DOT_ROWS * DOT_ROWS;
                for (i, four) in block[..whole].chunks_exact_mut(DOT_ROWS).enumerate() {
                    let rows = &w[(first + DOT_ROWS * i) * k..][..DOT_ROWS * k];
                    // SAFETY: the features were detected at run time.
                    unsafe {
                        if features.prefetch_to_l2 {
                            dots_f32_avx512::<DOT_ROWS, _MM_HINT_T1>(rows, x, four)
                        } else {
                            dots_f32_avx512::<DOT_ROWS, _MM_HINT_T0>(rows, x, four)
                        }
                    };
                }
                for (i, output) in block.iter_mut().enumerate().skip(whole) {
                    *output = dot_f32(&w[(first + i) * k..(first + i + 1) * k], x, features);
                }
                return;
            }
            for (i, outputs) in block.chunks_mut(rows).enumerate() {
                let row = &w[(first + i) * k..(first + i + 1) * k];
                for (m, output) in outputs.iter_mut().enumerate() {
                    *output = dot_f32(row, &x[m * k..(m + 1) * k], features);
                }
            }
        });
    for n in 0..n_out {
        for m in 0..rows {
            out[m * n_out + n] = transposed[n * rows + m];
        }
    }
}

/// `out = x · wᵀ + bias` for any number of rows, with `w` `[n_out, k]`, `x` `[rows, k]`
/// and `out` `[rows, n_out]`, all row-major, and `bias` `[n_out]` (none adds nothing), on
/// all of candle's threads. With AVX-512 this project's blocked kernel runs. Elsewhere
/// the `gemm` crate's kernels run (the ones candle uses, which stable Rust builds for
/// AVX2 at most).
pub fn gemm_f32(
    w: &[f32],
    x: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    rows: usize,
    n_out: usize,
    k: usize,
) {
    if let Some(bias) = bias {
        assert_eq!(bias.len(), n_out, "the bias must have n_out values");
    }
    if k == 0 {
        // Nothing to sum: every output is its bias.
        for row in out.chunks_exact_mut(n_out.max(1)) {
            match bias {
                Some(bias) => row.copy_from_slice(bias),
                None => row.fill(0.0),
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if cpu_features().avx512 {
        // SAFETY: the processor has AVX-512 F.
        unsafe { f32_avx512::gemm(w, x, bias, out, rows, n_out, k) };
        return;
    }
    gemm_f32_portable(w, x, out, rows, n_out, k);
    if let Some(bias) = bias {
        add_bias(out, bias);
    }
}

/// Adds `bias` to every row of `out`.
pub(crate) fn add_bias(out: &mut [f32], bias: &[f32]) {
    for row in out.chunks_exact_mut(bias.len()) {
        for (value, b) in row.iter_mut().zip(bias) {
            *value += b;
        }
    }
}

/// Computes [`gemm_f32`] with the `gemm` crate.
fn gemm_f32_portable(w: &[f32], x: &[f32], out: &mut [f32], rows: usize, n_out: usize, k: usize) {
    assert_eq!(w.len(), n_out * k, "weights must be n_out × k");
    assert_eq!(x.len(), rows * k, "inputs must be rows × k");
    assert_eq!(out.len(), rows * n_out, "outputs must be rows × n_out");
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the three buffers have the asserted sizes and the strides describe them:
    // x is [rows, k] row-major, wᵀ is [k, n_out] with unit row stride, out [rows, n_out].
    unsafe {
        gemm::gemm(
            rows,
            n_out,
            k,
            out.as_mut_ptr(),
            1,
            n_out as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Dot product of two equal-length slices.
pub fn dot_f32(a: &[f32], b: &[f32], features: CpuFeatures) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if features.avx512 {
        // SAFETY: the features were detected at run time.
        return unsafe { dot_f32_avx512(a, b) };
    }
    let _ = features;
    dot_f32_portable(a, b)
}

/// Eight partial sums let the compiler vectorise without reordering across lanes.
fn dot_f32_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut sums = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for lane in 0..8 {
            sums[lane] += a[c * 8 + lane] * b[c * 8 + lane];
        }
    }
    let mut total: f32 = sums.iter().sum();
    for i in chunks * 8..a.len() {
        total += a[i] * b[i];
    }
    total
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_f32_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        for (j, sum) in acc.iter_mut().enumerate() {
            // SAFETY: i + 16 * j + 16 <= n, within both slices.
            let va = unsafe { _mm512_loadu_ps(a.as_ptr().add(i + 16 * j)) };
            let vb = unsafe { _mm512_loadu_ps(b.as_ptr().add(i + 16 * j)) };
            *sum = _mm512_fmadd_ps(va, vb, *sum);
        }
        i += 64;
    }
    while i + 16 <= n {
        // SAFETY: i + 16 <= n.
        let va = unsafe { _mm512_loadu_ps(a.as_ptr().add(i)) };
        let vb = unsafe { _mm512_loadu_ps(b.as_ptr().add(i)) };
        acc[0] = _mm512_fmadd_ps(va, vb, acc[0]);
        i += 16;
    }
    let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    let mut total = _mm512_reduce_add_ps(sum);
    while i < n {
        total += a[i] * b[i];
        i += 1;
    }
    total
}

/// Weight rows [`gemv_f32`] reads side by side for a single input row.
const DOT_ROWS: usize = 4;

/// Distance in values (2 KiB) at which [`dots_f32_avx512`] prefetches each weight row ahead
/// of its reads. On a 2-core Xeon, prefetching into the first-level cache made 12-token
/// captions on the full-size OPT-2.7B shape decode about 4 % faster than no prefetch, and 1
/// or 4 KiB gained less. On a 2-core Zen 4, over 16 OPT-2.7B layers' products in one
/// process, that hint read 9–16 % more slowly than none. The second-level hint read 4–13 %
/// faster than none there. In three alternating pairs of 20-token f32 captions, it took
/// decoding from 0.34–0.37 s to 0.25–0.33 s per token. It was not measured on the Xeon.
const DOT_PREFETCH_FLOATS: usize = 512;

/// Writes to `out` the dot products of `R` consecutive rows of `w` (`R × x.len()`
/// values) with `x`, prefetching ahead with the `_mm_prefetch` hint `HINT`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dots_f32_avx512<const R: usize, const HINT: i32>(w: &[f32], x: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let k = x.len();
    assert!(w.len() >= R * k);
    assert!(out.len() >= R);
    let mut sums = [[_mm512_setzero_ps(); 2]; R];
    let mut i = 0;
    while i + 32 <= k {
        for r in 0..R {
            // A prefetch is only a hint: addresses past the end of `w` do not fault.
            let ahead = w.as_ptr().wrapping_add(r * k + i + DOT_PREFETCH_FLOATS);
            _mm_prefetch::<HINT>(ahead.cast());
            _mm_prefetch::<HINT>(ahead.wrapping_add(16).cast());
        }
        for (half, offset) in [i, i + 16].into_iter().enumerate() {
            // SAFETY: offset + 16 <= k, within `x` and within each of the R rows of `w`.
            let vx = unsafe { _mm512_loadu_ps(x.as_ptr().add(offset)) };
            for (r, row_sums) in sums.iter_mut().enumerate() {
                let vw = unsafe { _mm512_loadu_ps(w.as_ptr().add(r * k + offset)) };
                row_sums[half] = _mm512_fmadd_ps(vw, vx, row_sums[half]);
            }
        }
        i += 32;
    }
    for (r, row_sums) in sums.iter().enumerate() {
        let mut total = _mm512_reduce_add_ps(_mm512_add_ps(row_sums[0], row_sums[1]));
        for c in i..k {
            total += w[r * k + c] * x[c];
        }
        out[r] = total;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Returns the largest absolute difference between two tensors of the same shape.
    pub(crate) fn max_abs_difference(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    pub(crate) fn pseudo_random(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn gemv_matches_naive_products() {
        for (rows, n_out, k) in [(1, 70, 33), (3, 130, 256), (5, 64, 1000)] {
            let w = pseudo_random(n_out * k, 1);
            let x = pseudo_random(rows * k, 2);
            let mut out = vec![0f32; rows * n_out];
            gemv_f32(&w, &x, &mut out, rows, n_out, k);
            for m in 0..rows {
                for n in 0..n_out {
                    let expected: f64 = (0..k)
                        .map(|i| w[n * k + i] as f64 * x[m * k + i] as f64)
                        .sum();
                    let got = out[m * n_out + n] as f64;
                    assert!(
                        (got - expected).abs() < 1e-4 * (1.0 + expected.abs()),
                        "[{m}, {n}]: {got} vs {expected}"
                    );
                }
            }
        }
    }

    type Product = fn(&[f32], &[f32], &mut [f32], usize, usize, usize);

    /// Asserts that two products give the same `[rows, n_out]` outputs to float rounding.
    fn assert_products_agree(first: Product, second: Product, shapes: &[(usize, usize, usize)]) {
        for &(rows, n_out, k) in shapes {
            let w = pseudo_random(n_out * k, 11);
            let x = pseudo_random(rows * k, 12);
            // NaN in the first output checks that every value is written, not added to.
            let mut a = vec![f32::NAN; rows * n_out];
            let mut b = vec![0f32; rows * n_out];
            first(&w, &x, &mut a, rows, n_out, k);
            second(&w, &x, &mut b, rows, n_out, k);
            for (i, (a, b)) in a.iter().zip(&b).enumerate() {
                assert!(
                    (a - b).abs() < 1e-4 * (k as f32).sqrt(),
                    "{rows}×{n_out}×{k} output {i}: {a} vs {b}"
                );
            }
        }
    }

    fn gemm_without_bias(
        w: &[f32],
        x: &[f32],
        out: &mut [f32],
        rows: usize,
        n_out: usize,
        k: usize,
    ) {
        gemm_f32(w, x, None, out, rows, n_out, k);
    }

    #[test]
    fn gemm_matches_gemv() {
        assert_products_agree(gemm_without_bias, gemv_f32, &[(20, 37, 300), (7, 50, 3100)]);
    }

    #[test]
    fn avx512_and_portable_gemm_agree() {
        // Shapes with partial panels, depth slices, transposed blocks and row tiles.
        let shapes = [(257, 96, 1408), (13, 37, 300), (1, 64, 16), (30, 80, 513)];
        assert_products_agree(gemm_without_bias, gemm_f32_portable, &shapes);
        // A single tile of each size up to the largest, and three tiles of 11 rows.
        let tiles: Vec<_> = (2..=12).chain([33]).map(|rows| (rows, 40, 300)).collect();
        assert_products_agree(gemm_without_bias, gemm_f32_portable, &tiles);
    }

    #[test]
    fn gemm_adds_the_bias_once() {
        for (rows, n_out, k) in [(257, 96, 1408), (13, 37, 300), (30, 80, 513), (5, 7, 0)] {
            let w = pseudo_random(n_out * k, 21);
            let x = pseudo_random(rows * k, 22);
            let bias = pseudo_random(n_out, 23);
            // NaN checks that every output is written, not added to.
            let mut with_bias = vec![f32::NAN; rows * n_out];
            gemm_f32(&w, &x, Some(&bias), &mut with_bias, rows, n_out, k);
            let mut expected = vec![0f32; rows * n_out];
            gemm_f32_portable(&w, &x, &mut expected, rows, n_out, k);
            add_bias(&mut expected, &bias);
            for (i, (a, b)) in with_bias.iter().zip(&expected).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (k as f32).sqrt(),
                    "{rows}×{n_out}×{k} output {i}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn simd_and_portable_dots_agree() {
        let a = pseudo_random(1037, 3);
        let b = pseudo_random(1037, 4);
        let portable = dot_f32_portable(&a, &b);
        let chosen = dot_f32(&a, &b, cpu_features());
        assert!((portable - chosen).abs() < 1e-4, "{portable} vs {chosen}");
    }

    /// Runs the decoding dots with both prefetch hints, so that the hint this processor
    /// does not choose is run too. A hint changes no result.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn dots_agree_for_both_prefetch_hints() {
        use std::arch::x86_64::{_MM_HINT_T0, _MM_HINT_T1};
        if !cpu_features().avx512 {
            return;
        }
        let k = 1037;
        let w = pseudo_random(DOT_ROWS * k, 5);
        let x = pseudo_random(k, 6);
        let mut first_level = [0f32; DOT_ROWS];
        let mut second_level = [0f32; DOT_ROWS];
        // SAFETY: the processor has AVX-512 F, checked above.
        unsafe {
            dots_f32_avx512::<DOT_ROWS, _MM_HINT_T0>(&w, &x, &mut first_level);
            dots_f32_avx512::<DOT_ROWS, _MM_HINT_T1>(&w, &x, &mut second_level);
        }
        assert_eq!(first_level, second_level);
        for (r, &got) in first_level.iter().enumerate() {
            let expected = dot_f32_portable(&w[r * k..(r + 1) * k], &x);
            assert!(
                (got - expected).abs() < 1e-4,
                "row {r}: {got} vs {expected}"
            );
        }
    }
}
