//! 8-bit weights with one scale per output row, packed for `vpdpbusd`, for products
//! with many input rows (the vision encoder's 257 tokens, a prompt's tokens).
//!
//! The instruction multiplies four unsigned bytes by four signed bytes and adds their
//! sum to a 32-bit lane. The weights `[rows, cols]` are cut into panels of 16 rows.
//! Within a panel, the 16 rows' codes for each group of four columns ("quad") make one
//! 64-byte vector. One activation quad, broadcast to every lane, meets 16 output rows
//! per instruction: twice the multiplications of `vdpbf16ps`, and no scale to apply
//! until the whole row is summed.
//!
//! Weights: `w ≈ s · q`, `q` in -127..=127, `s = max |w| / 127` per row.
//! Activations, per input row: `x ≈ e · u + m`, `u` in 0..=255, with `m` the row's
//! minimum and `e` its range / 255, so skewed rows (after a GELU) keep all 256 levels.
//! Then `Σ x·w ≈ s · (e · Σ u·q + m · Σ q)`, where `Σ u·q` is the integer sum the
//! kernel computes and `Σ q` is stored per row.

use rayon::prelude::*;

use super::cpu_features;
use super::packed_bf16::{Kernels, PANEL, Panels, TASK_WIDTH, TaskRows, TileKernel, Tiles};

/// A `[rows, cols]` matrix of 8-bit codes with one scale per row, in panel layout.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedI8 {
    rows: usize,
    cols: usize,
    /// Column quads per row (`cols` rounded up to a multiple of four, divided by four).
    quads: usize,
    scales: Vec<f32>,
    /// `Σ q` of each row.
    code_sums: Vec<i32>,
    /// Codes in `[panel][quad][16 rows]` order, four signed bytes per `u32` (column
    /// `4j` in the low byte). Rows past `rows` and columns past `cols` are zero.
    data: Vec<u32>,
}

/// Quantized input rows: four codes per `u32`, and each row's step and minimum.
struct Activations {
    quads: Vec<u32>,
    steps: Vec<f32>,
    minimums: Vec<f32>,
}

impl PackedI8 {
    /// Quantizes `f32` weights `[rows, cols]` row by row.
    pub fn quantize(values: &[f32], rows: usize, cols: usize) -> Result<Self, String> {
        if values.len() != rows * cols {
            return Err(format!(
                "expected {rows} × {cols} = {} weights, got {}",
                rows * cols,
                values.len()
            ));
        }
        Ok(Self::quantize_rows(rows, cols, |r, row| {
            row.copy_from_slice(&values[r * cols..(r + 1) * cols]);
        }))
    }

    /// Quantizes a `[rows, cols]` matrix whose row `r` `row_values(r, row)` writes into
    /// `row` (`cols` long), in parallel over panels.
    pub fn quantize_rows(
        rows: usize,
        cols: usize,
        row_values: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Self {
        let quads = cols.div_ceil(4);
        let panels = rows.div_ceil(PANEL);
        let mut scales = vec![0f32; panels * PANEL];
        let mut code_sums = vec![0i32; panels * PANEL];
        let mut data = vec![0u32; panels * quads * PANEL];
        data.par_chunks_mut((quads * PANEL).max(1))
            .zip(scales.par_chunks_mut(PANEL))
            .zip(code_sums.par_chunks_mut(PANEL))
            .enumerate()
            .for_each(|(panel, ((packed, scales), code_sums))| {
                let mut row = vec![0f32; 4 * quads];
                let mut codes = vec![0u8; 4 * quads];
                for lane in 0..PANEL.min(rows - panel * PANEL) {
                    row_values(panel * PANEL + lane, &mut row[..cols]);
                    let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let scale = max / 127.0;
                    for (code, &v) in codes.iter_mut().zip(&row) {
                        *code = weight_code(v, scale) as u8;
                    }
                    scales[lane] = scale;
                    code_sums[lane] = codes.iter().map(|&c| i32::from(c as i8)).sum();
                    for (j, four) in codes.chunks_exact(4).enumerate() {
                        packed[j * PANEL + lane] =
                            u32::from_le_bytes([four[0], four[1], four[2], four[3]]);
                    }
                }
            });
        scales.truncate(rows);
        code_sums.truncate(rows);
        Self {
            rows,
            cols,
            quads,
            scales,
            code_sums,
            data,
        }
    }

    /// Output width (rows of the weight matrix).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input width (columns of the weight matrix).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held, padding included.
    pub fn size_in_bytes(&self) -> usize {
        self.data.len() * 4 + self.rows * 8
    }

    /// Dequantizes the weights the kernel multiplies by to `f32` `[rows, cols]`, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut values = vec![0f32; self.rows * self.cols];
        for (r, row) in values.chunks_mut(self.cols.max(1)).enumerate() {
            let panel = &self.data[r / PANEL * self.quads * PANEL..];
            for (c, value) in row.iter_mut().enumerate() {
                let byte = panel[c / 4 * PANEL + r % PANEL].to_le_bytes()[c % 4];
                *value = self.scales[r] * f32::from(byte as i8);
            }
        }
        values
    }

    /// `x · Wᵀ (+ bias)` for `x` `[inputs, cols]`, each output converted by `convert`;
    /// returns `[inputs, rows]` row-major.
    pub fn matmul<T: Send + Copy + Default>(
        &self,
        x: &[f32],
        inputs: usize,
        bias: Option<&[f32]>,
        convert: impl Fn(f32) -> T + Sync,
    ) -> Vec<T> {
        assert_eq!(x.len(), inputs * self.cols, "inputs must be inputs × cols");
        let activations = self.quantize_inputs(x, inputs);
        let use_simd = cpu_features().avx512_vnni;
        let amx_rows = super::amx::rows_for_tiles(use_simd, &activations.quads, inputs, self.quads);
        let panels = Panels {
            data: &self.data,
            rows: self.rows,
            panel_len: self.quads * PANEL,
        };
        panels.run(
            inputs,
            bias,
            |weights, count, block| {
                let rows = TaskRows {
                    all: &activations.quads,
                    amx: &amx_rows,
                    inputs,
                };
                self.task(weights, count, rows, block, use_simd);
            },
            |input, columns, sums, bias, values| {
                let (step, minimum) = (activations.steps[input], activations.minimums[input]);
                let scales = &self.scales[columns.clone()];
                let code_sums = &self.code_sums[columns];
                for ((((value, &sum), &scale), &code_sum), &b) in values
                    .iter_mut()
                    .zip(sums)
                    .zip(scales)
                    .zip(code_sums)
                    .zip(bias)
                {
                    *value = convert(scale * (step * sum as f32 + minimum * code_sum as f32) + b);
                }
            },
        )
    }

    /// Quantizes each input row to bytes over its own range.
    fn quantize_inputs(&self, x: &[f32], inputs: usize) -> Activations {
        let mut activations = Activations {
            quads: vec![0u32; inputs * self.quads],
            steps: vec![0f32; inputs],
            minimums: vec![0f32; inputs],
        };
        activations
            .quads
            .par_chunks_mut(self.quads.max(1))
            .zip(activations.steps.par_iter_mut())
            .zip(activations.minimums.par_iter_mut())
            .zip(x.par_chunks(self.cols.max(1)))
            .for_each(|(((packed, step), minimum), row)| {
                super::vectorized(
                    #[inline(always)]
                    || {
                        let (low, high) = range_of(row);
                        let range = high - low;
                        *minimum = low;
                        *step = range / 255.0;
                        let inverse = if range > 0.0 { 255.0 / range } else { 0.0 };
                        for (slot, four) in packed.iter_mut().zip(row.chunks(4)) {
                            let mut codes = [0u8; 4];
                            for (code, &v) in codes.iter_mut().zip(four) {
                                *code = activation_code((v - low) * inverse);
                            }
                            *slot = u32::from_le_bytes(codes);
                        }
                    },
                )
            });
        activations
    }

    /// Computes one task's `count` panels for every input row into `block`.
    fn task(
        &self,
        weights: &[u32],
        count: usize,
        rows: TaskRows,
        block: &mut [i32],
        use_simd: bool,
    ) {
        #[cfg(target_arch = "x86_64")]
        let simd: Option<[TileKernel<i32>; 4]> = use_simd.then_some([
            tile_vnni::<8, 1>,
            tile_vnni::<4, 2>,
            tile_vnni::<2, 4>,
            tile_vnni::<1, 4>,
        ]);
        #[cfg(not(target_arch = "x86_64"))]
        let simd = {
            let _ = use_simd;
            None
        };
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        let amx: Option<TileKernel<i32>> = Some(super::amx::tile_i8);
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        let amx = None;
        let tiles = Tiles {
            weights,
            count,
            rows,
            width: self.quads,
        };
        let kernels = Kernels {
            amx,
            simd,
            portable: tile_portable,
        };
        tiles.run(block, kernels);
    }
}

/// Returns the weight code of `value` for the row scale `scale`.
fn weight_code(value: f32, scale: f32) -> i8 {
    let inverse = if scale == 0.0 { 0.0 } else { 1.0 / scale };
    round_small(value * inverse).clamp(-127.0, 127.0) as i8
}

/// Returns the byte code of `scaled`, an activation already mapped to 0..=255: rounded
/// to the nearest integer, ties to even, and clamped, with NaN mapped to 0.
#[inline(always)]
fn activation_code(scaled: f32) -> u8 {
    // Comparisons rather than `f32::clamp` and a saturating `as`: they compile to plain
    // vector minimum, maximum and conversion instructions.
    let clamped = if scaled > 0.0 { scaled } else { 0.0 };
    let clamped = if clamped < 255.0 { clamped } else { 255.0 };
    // SAFETY: the value is finite and within 0..=255.
    unsafe { round_small(clamped).to_int_unchecked::<i32>() as u8 }
}

/// Returns the smallest and largest of `values`, from 16 interleaved lanes that the
/// compiler keeps in vector registers. NaN values are skipped.
#[inline(always)]
fn range_of(values: &[f32]) -> (f32, f32) {
    // Comparisons rather than `f32::min` and `f32::max`, whose NaN rule costs extra
    // instructions per value.
    let lower = |m: f32, v: f32| if v < m { v } else { m };
    let higher = |m: f32, v: f32| if v > m { v } else { m };
    let mut low = [f32::INFINITY; 16];
    let mut high = [f32::NEG_INFINITY; 16];
    let chunks = values.chunks_exact(16);
    let rest = chunks.remainder();
    for chunk in chunks {
        for ((l, h), &v) in low.iter_mut().zip(&mut high).zip(chunk) {
            *l = lower(*l, v);
            *h = higher(*h, v);
        }
    }
    (
        low.iter()
            .chain(rest)
            .fold(f32::INFINITY, |m, &v| lower(m, v)),
        high.iter()
            .chain(rest)
            .fold(f32::NEG_INFINITY, |m, &v| higher(m, v)),
    )
}

/// Rounds `value` (of magnitude under 2²²) to the nearest integer, ties to even. Adding
/// and subtracting 1.5 · 2²³ leaves no fraction bits; unlike `f32::round`, which is a
/// library call on baseline x86-64, this vectorises.
#[inline(always)]
fn round_small(value: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0;
    (value + SHIFT) - SHIFT
}

fn dot_quad(activation: u32, weight: u32) -> i32 {
    activation
        .to_le_bytes()
        .iter()
        .zip(weight.to_le_bytes())
        .map(|(&u, q)| i32::from(u) * i32::from(q as i8))
        .sum()
}

fn tile_portable(weights: &[u32], count: usize, rows: &[u32], quads: usize, out: &mut [i32]) {
    for (r, sums) in out.chunks_exact_mut(TASK_WIDTH).enumerate() {
        let activations = &rows[r * quads..(r + 1) * quads];
        for (p, panel) in weights.chunks_exact(quads * PANEL).take(count).enumerate() {
            for lane in 0..PANEL {
                sums[p * PANEL + lane] = activations
                    .iter()
                    .enumerate()
                    .map(|(j, &a)| dot_quad(a, panel[j * PANEL + lane]))
                    .sum();
            }
        }
    }
}

/// `R` activation rows against one or two panels: `2RU` vectors of sums stay in
/// registers for the whole pass over the columns, `U` per row and panel so that few rows
/// still give the processor independent additions to overlap.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn tile_vnni<const R: usize, const U: usize>(
    weights: &[u32],
    count: usize,
    rows: &[u32],
    quads: usize,
    out: &mut [i32],
) {
    use std::arch::x86_64::*;
    assert!(weights.len() >= count * quads * PANEL);
    assert!(rows.len() >= R * quads);
    assert!(out.len() >= R * TASK_WIDTH);
    assert!(count == 1 || count == 2);
    let first = weights.as_ptr();
    // With one panel the second pass reuses it; its sums are never read.
    let second = if count == 2 {
        // SAFETY: the second panel starts `quads · 16` values in, within `weights`.
        unsafe { first.add(quads * PANEL) }
    } else {
        first
    };

    let mut low = [[_mm512_setzero_si512(); R]; U];
    let mut high = [[_mm512_setzero_si512(); R]; U];
    // Adds quad `j` to sums `u`, a constant of an unrolled loop, so the sums stay in
    // registers.
    let mut add = |j: usize, u: usize| {
        // SAFETY: j < quads, so both loads stay within their panel.
        let (w0, w1) = unsafe {
            (
                _mm512_loadu_si512(first.add(j * PANEL).cast()),
                _mm512_loadu_si512(second.add(j * PANEL).cast()),
            )
        };
        for r in 0..R {
            // SAFETY: r < R and j < quads, within the checked length of `rows`.
            let a = _mm512_set1_epi32(unsafe { *rows.get_unchecked(r * quads + j) } as i32);
            low[u][r] = _mm512_dpbusd_epi32(low[u][r], a, w0);
            high[u][r] = _mm512_dpbusd_epi32(high[u][r], a, w1);
        }
    };
    let whole = quads / U * U;
    for step in (0..whole).step_by(U) {
        for u in 0..U {
            add(step + u, u);
        }
    }
    for j in whole..quads {
        add(j, 0);
    }

    for r in 0..R {
        let (mut row_low, mut row_high) = (low[0][r], high[0][r]);
        for u in 1..U {
            row_low = _mm512_add_epi32(row_low, low[u][r]);
            row_high = _mm512_add_epi32(row_high, high[u][r]);
        }
        // SAFETY: r · 32 + 32 <= out.len(), checked above.
        unsafe {
            _mm512_storeu_si512(out.as_mut_ptr().add(r * TASK_WIDTH).cast(), row_low);
            _mm512_storeu_si512(
                out.as_mut_ptr().add(r * TASK_WIDTH + PANEL).cast(),
                row_high,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::pseudo_random;
    use super::*;

    #[test]
    fn products_match_dequantized_values() {
        // Widths not a multiple of four, a partial last panel, one panel, every tile size,
        // a constant input row and an all-zero weight row.
        // 70 × 48 × 128 reaches the AMX tiles where there are some, with rows left over
        // and a task of one panel.
        for (inputs, rows, cols) in [
            (1, 70, 100),
            (15, 33, 257),
            (3, 16, 64),
            (20, 48, 31),
            (70, 48, 128),
        ] {
            let mut w = pseudo_random(rows * cols, 31);
            w[..cols].fill(0.0);
            let mut x: Vec<f32> = pseudo_random(inputs * cols, 32)
                .iter()
                .map(|v| v * 3.0 + 0.5)
                .collect();
            x[..cols].fill(0.25);
            let bias = pseudo_random(rows, 33);
            let packed = PackedI8::quantize(&w, rows, cols).unwrap();
            let weights = packed.dequantize();
            let got = packed.matmul(&x, inputs, Some(&bias), |v| v);
            let activations = packed.quantize_inputs(&x, inputs);
            for m in 0..inputs {
                let (step, minimum) = (activations.steps[m], activations.minimums[m]);
                let row: Vec<f64> = activations.quads[m * packed.quads..(m + 1) * packed.quads]
                    .iter()
                    .flat_map(|quad| quad.to_le_bytes())
                    .take(cols)
                    .map(|u| f64::from(step) * f64::from(u) + f64::from(minimum))
                    .collect();
                for n in 0..rows {
                    let expected: f64 = (0..cols)
                        .map(|k| f64::from(weights[n * cols + k]) * row[k])
                        .sum::<f64>()
                        + f64::from(bias[n]);
                    let value = f64::from(got[m * rows + n]);
                    assert!(
                        (value - expected).abs() < 1e-4 * (1.0 + expected.abs()),
                        "{inputs}×{rows}×{cols} [{m}, {n}]: {value} vs {expected}"
                    );
                    // The quantized product stays near the exact one: each term's rounding
                    // error has a standard deviation under 0.01 here, so 6σ over `cols` terms.
                    let exact: f64 = (0..cols)
                        .map(|k| f64::from(w[n * cols + k]) * f64::from(x[m * cols + k]))
                        .sum::<f64>()
                        + f64::from(bias[n]);
                    assert!(
                        (value - exact).abs() < 0.06 * (cols as f64).sqrt(),
                        "[{m}, {n}]: {value} vs exact {exact}"
                    );
                }
            }
        }
    }

    #[test]
    fn weights_round_trip_within_half_a_step() {
        let (rows, cols) = (19, 45);
        let w = pseudo_random(rows * cols, 34);
        let packed = PackedI8::quantize(&w, rows, cols).unwrap();
        for (r, (row, back)) in w
            .chunks(cols)
            .zip(packed.dequantize().chunks(cols))
            .enumerate()
        {
            let step = row.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (a, b) in row.iter().zip(back) {
                assert!((a - b).abs() <= step * 0.5 + 1e-7, "row {r}: {a} vs {b}");
            }
        }
        assert!(PackedI8::quantize(&[0.0; 5], 2, 3).is_err());
    }

    /// `len` quads of pseudo-random bytes (all 256 values as unsigned, -127..=127 as signed).
    fn quad_bytes(len: usize, seed: u64) -> Vec<u32> {
        pseudo_random(len * 4, seed)
            .chunks(4)
            .map(|c| u32::from_le_bytes([0, 1, 2, 3].map(|i| (c[i] * 127.0) as i8 as u8)))
            .collect()
    }

    #[test]
    fn simd_and_portable_tiles_agree() {
        if !cpu_features().avx512_vnni {
            return;
        }
        let (quads, count) = (50, 2);
        let weights = quad_bytes(count * quads * PANEL, 35);
        let rows = quad_bytes(8 * quads, 36);
        let mut simd = vec![0i32; 8 * TASK_WIDTH];
        let mut portable = vec![0i32; 8 * TASK_WIDTH];
        // SAFETY: the features were checked above; the slices have the needed sizes.
        unsafe { tile_vnni::<8, 1>(&weights, count, &rows, quads, &mut simd) };
        tile_portable(&weights, count, &rows, quads, &mut portable);
        assert_eq!(simd, portable);
    }

    #[test]
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn amx_and_portable_tiles_agree() {
        if !super::super::amx::available() {
            return;
        }
        let (quads, count, inputs) = (48, 2, super::super::amx::ROWS);
        let weights = quad_bytes(count * quads * PANEL, 37);
        let rows = quad_bytes(inputs * quads, 38);
        let mut amx = vec![0i32; inputs * TASK_WIDTH];
        let mut portable = vec![0i32; inputs * TASK_WIDTH];
        let ordered = super::super::amx::tile_order(&rows, inputs, quads);
        // SAFETY: AMX is available and 48 is a multiple of its step; the slices have the
        // needed sizes.
        unsafe { super::super::amx::tile_i8(&weights, count, &ordered, quads, &mut amx) };
        tile_portable(&weights, count, &rows, quads, &mut portable);
        assert_eq!(amx, portable);
    }
}
