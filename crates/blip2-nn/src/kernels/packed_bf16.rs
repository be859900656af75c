//! bfloat16 weights packed for `vdpbf16ps`, for products with any number of rows.
//!
//! The instruction multiplies 16 pairs of bfloat16 values and adds each pair's sum to
//! an `f32` lane. The weights `[rows, cols]` are cut into panels of 16 rows. Within a
//! panel, the 16 rows' values of each pair of columns `(2q, 2q + 1)` sit next to each
//! other as one 64-byte vector. One activation pair, broadcast to every lane, then
//! meets 16 output rows per instruction, and a pass over a panel reads it front to back.
//!
//! Activations are rounded to bfloat16, as PyTorch does in bfloat16; sums stay in `f32`.

use std::borrow::Cow;
use std::ops::Range;

use half::bf16;
use rayon::prelude::*;

use super::cpu_features;

/// Output rows per panel: one 512-bit vector of `f32` sums.
pub const PANEL: usize = 16;
/// Panels one task computes together (32 outputs per input row).
pub(crate) const PANELS_PER_TASK: usize = 2;
pub(crate) const TASK_WIDTH: usize = PANEL * PANELS_PER_TASK;
/// Input rows the widest tile computes at once.
const TILE_ROWS: usize = 8;

/// A `[rows, cols]` bfloat16 matrix in panel layout.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedBf16 {
    rows: usize,
    cols: usize,
    /// Column pairs per row (`cols` rounded up to even, halved).
    pairs: usize,
    /// Values in `[panel][pair][16 rows]` order. Each `u32` contains column `2q` in its low
    /// half and `2q + 1` in its high half. Rows past `rows` and the column past an odd
    /// `cols` are zero.
    data: Vec<u32>,
}

/// The output of a product, written by tasks that each own a band of columns.
struct DisjointColumns<T>(*mut T);

// SAFETY: tasks write disjoint ranges, so sharing the pointer among threads is sound.
unsafe impl<T: Send> Send for DisjointColumns<T> {}
unsafe impl<T: Send> Sync for DisjointColumns<T> {}

impl<T> DisjointColumns<T> {
    /// Returns `len` values from `start`.
    ///
    /// # Safety
    /// The range must lie inside the output, and no other live slice may overlap it.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

fn pair(low: bf16, high: bf16) -> u32 {
    u32::from(low.to_bits()) | (u32::from(high.to_bits()) << 16)
}

impl PackedBf16 {
    /// Packs `f32` weights `[rows, cols]`, rounding them to bfloat16.
    pub fn from_f32(values: &[f32], rows: usize, cols: usize) -> Result<Self, String> {
        check_len(values.len(), rows, cols)?;
        Ok(Self::pack(rows, cols, |r, bits| {
            let row = &values[r * cols..(r + 1) * cols];
            for (bit, &value) in bits.iter_mut().zip(row) {
                *bit = round_to_bf16(value);
            }
        }))
    }

    /// Packs bfloat16 weights `[rows, cols]`.
    pub fn from_bf16(values: &[bf16], rows: usize, cols: usize) -> Result<Self, String> {
        check_len(values.len(), rows, cols)?;
        Ok(Self::pack(rows, cols, |r, bits| {
            let row = &values[r * cols..(r + 1) * cols];
            for (bit, value) in bits.iter_mut().zip(row) {
                *bit = value.to_bits();
            }
        }))
    }

    /// `row_bits(r, bits)` writes row `r`'s bfloat16 bit patterns into `bits` (`cols`
    /// long, plus a zero for an odd width).
    fn pack(rows: usize, cols: usize, row_bits: impl Fn(usize, &mut [u16]) + Sync) -> Self {
        let pairs = cols.div_ceil(2);
        let panels = rows.div_ceil(PANEL);
        let mut data = vec![0u32; panels * pairs * PANEL];
        data.par_chunks_mut(pairs * PANEL)
            .enumerate()
            .for_each(|(panel, packed)| {
                let mut bits = vec![0u16; 2 * pairs];
                for lane in 0..PANEL.min(rows - panel * PANEL) {
                    row_bits(panel * PANEL + lane, &mut bits[..cols]);
                    for (q, two) in bits.chunks_exact(2).enumerate() {
                        packed[q * PANEL + lane] = u32::from(two[0]) | (u32::from(two[1]) << 16);
                    }
                }
            });
        Self {
            rows,
            cols,
            pairs,
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
        self.data.len() * 4
    }

    /// Unpacks the weights to `f32` `[rows, cols]` row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut values = vec![0f32; self.rows * self.cols];
        values
            .par_chunks_mut(self.cols.max(1))
            .enumerate()
            .for_each(|(row, out)| {
                let panel = &self.data[row / PANEL * self.pairs * PANEL..];
                for (c, value) in out.iter_mut().enumerate() {
                    let packed = panel[c / 2 * PANEL + row % PANEL];
                    let bits = if c % 2 == 0 { packed } else { packed >> 16 };
                    *value = bf16::from_bits(bits as u16).to_f32();
                }
            });
        values
    }

    /// `x · Wᵀ (+ bias)` for `x` `[inputs, cols]`, each output converted by `convert`;
    /// returns `[inputs, rows]` row-major.
    pub fn matmul<T: Send + Copy + Default>(
        &self,
        x: &[bf16],
        inputs: usize,
        bias: Option<&[f32]>,
        convert: impl Fn(f32) -> T + Sync,
    ) -> Vec<T> {
        assert_eq!(x.len(), inputs * self.cols, "inputs must be inputs × cols");
        let activations = self.activation_pairs(x, inputs);
        let use_simd = cpu_features().avx512_bf16;
        let amx_rows = super::amx::rows_for_tiles(use_simd, &activations, inputs, self.pairs);
        let panels = Panels {
            data: &self.data,
            rows: self.rows,
            panel_len: self.pairs * PANEL,
        };
        panels.run(
            inputs,
            bias,
            |weights, count, block| {
                let rows = TaskRows {
                    all: &activations,
                    amx: &amx_rows,
                    inputs,
                };
                self.task(weights, count, rows, block, use_simd);
            },
            |_, _, sums, bias, values| {
                for ((value, &sum), &b) in values.iter_mut().zip(sums).zip(bias) {
                    *value = convert(sum + b);
                }
            },
        )
    }

    /// Returns the activations as column pairs `[inputs, pairs]`, the last one
    /// zero-padded. That is `x` itself when its width is even and it is aligned for `u32`,
    /// and a copy otherwise.
    fn activation_pairs<'x>(&self, x: &'x [bf16], inputs: usize) -> Cow<'x, [u32]> {
        if self.cols.is_multiple_of(2) && cfg!(target_endian = "little") {
            // SAFETY: any two bfloat16 bit patterns form a valid `u32`; `align_to` only puts
            // aligned values in the middle part.
            let (head, middle, _) = unsafe { x.align_to::<u32>() };
            if head.is_empty() && middle.len() == inputs * self.pairs {
                return Cow::Borrowed(middle);
            }
        }
        let mut pairs = vec![0u32; inputs * self.pairs];
        for (row, packed) in x
            .chunks(self.cols.max(1))
            .zip(pairs.chunks_mut(self.pairs.max(1)))
        {
            for (q, slot) in packed.iter_mut().enumerate() {
                let high = row.get(2 * q + 1).copied().unwrap_or(bf16::ZERO);
                *slot = pair(row[2 * q], high);
            }
        }
        Cow::Owned(pairs)
    }

    /// Computes one task's `count` panels for every input row into `block`.
    fn task(
        &self,
        weights: &[u32],
        count: usize,
        rows: TaskRows,
        block: &mut [f32],
        use_simd: bool,
    ) {
        #[cfg(target_arch = "x86_64")]
        let simd: Option<[TileKernel<f32>; 4]> = use_simd.then_some([
            tile_avx512::<8, 1>,
            tile_avx512::<4, 2>,
            tile_avx512::<2, 4>,
            tile_avx512::<1, 4>,
        ]);
        #[cfg(not(target_arch = "x86_64"))]
        let simd = {
            let _ = use_simd;
            None
        };
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        let amx: Option<TileKernel<f32>> = Some(super::amx::tile_bf16);
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        let amx = None;
        let tiles = Tiles {
            weights,
            count,
            rows,
            width: self.pairs,
        };
        let kernels = Kernels {
            amx,
            simd,
            portable: tile_portable,
        };
        tiles.run(block, kernels);
    }
}

/// Packed weights, split among the tasks of a product: `rows` outputs in panels of
/// [`PANEL`] rows, `panel_len` values each.
pub(crate) struct Panels<'a> {
    pub(crate) data: &'a [u32],
    pub(crate) rows: usize,
    pub(crate) panel_len: usize,
}

impl Panels<'_> {
    /// Computes a product in parallel tasks of [`PANELS_PER_TASK`] panels and returns it
    /// `[inputs, rows]`, row-major. Each task calls `sums(weights, count, block)` to fill
    /// `block` with [`TASK_WIDTH`] sums per input row from its `count` panels. Then, for
    /// each input row, `finish(input, columns, sums, bias, outputs)` writes the task's
    /// output columns, with the bias of those columns (zero without one).
    pub(crate) fn run<S: Copy + Default, T: Send + Copy + Default>(
        &self,
        inputs: usize,
        bias: Option<&[f32]>,
        sums: impl Fn(&[u32], usize, &mut [S]) + Sync,
        finish: impl Fn(usize, Range<usize>, &[S], &[f32], &mut [T]) + Sync,
    ) -> Vec<T> {
        let rows = self.rows;
        let zeros;
        let bias = match bias {
            Some(bias) => {
                assert_eq!(bias.len(), rows, "the bias must have one value per row");
                bias
            }
            None => {
                zeros = vec![0f32; rows];
                &zeros
            }
        };
        let panels = rows.div_ceil(PANEL);
        let tasks = panels.div_ceil(PANELS_PER_TASK);
        let mut out = vec![T::default(); inputs * rows];
        let output = DisjointColumns(out.as_mut_ptr());
        (0..tasks).into_par_iter().for_each(|task| {
            let first = task * PANELS_PER_TASK;
            let count = PANELS_PER_TASK.min(panels - first);
            let weights = &self.data[first * self.panel_len..(first + count) * self.panel_len];
            let mut block = vec![S::default(); inputs * TASK_WIDTH];
            sums(weights, count, &mut block);

            let columns = task * TASK_WIDTH..(task * TASK_WIDTH + TASK_WIDTH).min(rows);
            super::vectorized(
                #[inline(always)]
                || {
                    for (input, row_sums) in block.chunks_exact(TASK_WIDTH).enumerate() {
                        // SAFETY: the range lies inside `out`, and no other task writes these
                        // columns.
                        let values =
                            unsafe { output.slice(input * rows + columns.start, columns.len()) };
                        finish(
                            input,
                            columns.clone(),
                            row_sums,
                            &bias[columns.clone()],
                            values,
                        );
                    }
                },
            )
        });
        out
    }
}

/// A tile kernel: `(weights, count, rows, width, out)` computes the input rows in `rows`
/// (`width` values each) against `count` panels of `weights` into `out`.
pub(crate) type TileKernel<S> = unsafe fn(&[u32], usize, &[u32], usize, &mut [S]);

/// The tile kernels a product may use: AMX for 32 input rows, AVX-512 for 8, 4, 2 and 1,
/// and the portable fallback.
pub(crate) struct Kernels<S> {
    pub(crate) amx: Option<TileKernel<S>>,
    pub(crate) simd: Option<[TileKernel<S>; 4]>,
    pub(crate) portable: fn(&[u32], usize, &[u32], usize, &mut [S]),
}

/// The input rows of a product: `all` of them row by row, and the ones that fill whole
/// AMX tiles again in tile order (empty when the AMX kernels are not used).
#[derive(Clone, Copy)]
pub(crate) struct TaskRows<'a> {
    pub(crate) all: &'a [u32],
    pub(crate) amx: &'a [u32],
    pub(crate) inputs: usize,
}

/// One task's panels and every input row, `width` packed values each.
pub(crate) struct Tiles<'a> {
    pub(crate) weights: &'a [u32],
    pub(crate) count: usize,
    pub(crate) rows: TaskRows<'a>,
    pub(crate) width: usize,
}

impl Tiles<'_> {
    /// Cuts the input rows into tiles of 32 for `amx` (the rows in tile order), then 8, 4,
    /// 2 and 1 for what is left. Each of those runs through `simd` (kernels for 8, 4, 2
    /// and 1 rows) when given, else `portable`. `block` receives [`TASK_WIDTH`] sums per
    /// input row.
    pub(crate) fn run<S>(&self, block: &mut [S], kernels: Kernels<S>) {
        let Kernels {
            amx,
            simd,
            portable,
        } = kernels;
        let (width, inputs) = (self.width, self.rows.inputs);
        let mut first = 0;
        if let Some(amx) = amx {
            let tile = super::amx::ROWS;
            for group in self.rows.amx.chunks_exact(tile * width) {
                let out = &mut block[first * TASK_WIDTH..(first + tile) * TASK_WIDTH];
                first += tile;
                // SAFETY: tile-ordered rows exist only where the AMX kernels were found
                // usable at run time for this width. The slices hold `count` panels and
                // 32 rows.
                unsafe { amx(self.weights, self.count, group, width, out) };
            }
        }
        for (size, tile) in [TILE_ROWS, 4, 2, 1].into_iter().enumerate() {
            while inputs - first >= tile {
                let rows = &self.rows.all[first * width..(first + tile) * width];
                let out = &mut block[first * TASK_WIDTH..(first + tile) * TASK_WIDTH];
                first += tile;
                match simd {
                    // SAFETY: the kernels were chosen for features detected at run time;
                    // the slices hold `count` panels, `tile` activation rows and `tile`
                    // output rows.
                    Some(kernels) => unsafe {
                        kernels[size](self.weights, self.count, rows, width, out)
                    },
                    None => portable(self.weights, self.count, rows, width, out),
                }
            }
        }
    }
}

/// `f32` to bfloat16 bits, rounding to nearest even as `half::bf16::from_f32` does,
/// written without branches on the value so that the compiler vectorises it.
#[inline(always)]
pub(crate) fn round_to_bf16(value: f32) -> u16 {
    let bits = value.to_bits();
    // Wrapping: only NaN patterns can overflow, and their result is not used.
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    // NaN keeps its sign and top payload bits and stays quiet.
    let nan = (bits >> 16) | 0x40;
    if value.is_nan() {
        nan as u16
    } else {
        rounded as u16
    }
}

fn check_len(len: usize, rows: usize, cols: usize) -> Result<(), String> {
    if len != rows * cols {
        return Err(format!("{len} values do not fill a {rows} × {cols} matrix"));
    }
    Ok(())
}

fn widen(packed: u32) -> (f32, f32) {
    (
        bf16::from_bits(packed as u16).to_f32(),
        bf16::from_bits((packed >> 16) as u16).to_f32(),
    )
}

/// Computes the same sums as the SIMD tile, pair by pair in `f32`: its fallback and its
/// reference in tests.
fn tile_portable(weights: &[u32], count: usize, rows: &[u32], pairs: usize, out: &mut [f32]) {
    for (activation, sums) in rows.chunks(pairs).zip(out.chunks_mut(TASK_WIDTH)) {
        for panel in 0..count {
            let packed = &weights[panel * pairs * PANEL..(panel + 1) * pairs * PANEL];
            for lane in 0..PANEL {
                let mut sum = 0f32;
                for (q, &a) in activation.iter().enumerate() {
                    let (w0, w1) = widen(packed[q * PANEL + lane]);
                    let (a0, a1) = widen(a);
                    sum += w0 * a0 + w1 * a1;
                }
                sums[panel * PANEL + lane] = sum;
            }
        }
    }
}

/// `R` activation rows against one or two panels: `2RU` vectors of sums stay in
/// registers for the whole pass over the columns. Each step of `U` column pairs adds to
/// `U` separate sums, so few rows still give the processor independent additions to
/// overlap instead of one chain of dependent ones.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_avx512<const R: usize, const U: usize>(
    weights: &[u32],
    count: usize,
    rows: &[u32],
    pairs: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    assert!(weights.len() >= count * pairs * PANEL);
    assert!(rows.len() >= R * pairs);
    assert!(out.len() >= R * TASK_WIDTH);
    assert!(count == 1 || count == 2);
    let first = weights.as_ptr();
    // With one panel the second pass reuses it; its sums are never read.
    let second = if count == 2 {
        // SAFETY: the second panel starts `pairs · 16` values in, within `weights`.
        unsafe { first.add(pairs * PANEL) }
    } else {
        first
    };
    let mut low = [[_mm512_setzero_ps(); R]; U];
    let mut high = [[_mm512_setzero_ps(); R]; U];
    // Adds column pair `q` to sums `u`. With `u` a constant of an unrolled loop, the
    // sums stay in registers.
    let mut add = |q: usize, u: usize| {
        // SAFETY: q < pairs, so both loads stay within their panel.
        let (w0, w1): (__m512bh, __m512bh) = unsafe {
            (
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    first.add(q * PANEL).cast(),
                )),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    second.add(q * PANEL).cast(),
                )),
            )
        };
        for r in 0..R {
            // SAFETY: r < R and q < pairs, within the checked length of `rows`.
            let a = unsafe { *rows.get_unchecked(r * pairs + q) };
            let a: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(a as i32)) };
            low[u][r] = _mm512_dpbf16_ps(low[u][r], a, w0);
            high[u][r] = _mm512_dpbf16_ps(high[u][r], a, w1);
        }
    };
    let whole = pairs / U * U;
    for step in (0..whole).step_by(U) {
        for u in 0..U {
            add(step + u, u);
        }
    }
    for q in whole..pairs {
        add(q, 0);
    }
    for r in 0..R {
        let (mut row_low, mut row_high) = (low[0][r], high[0][r]);
        for u in 1..U {
            row_low = _mm512_add_ps(row_low, low[u][r]);
            row_high = _mm512_add_ps(row_high, high[u][r]);
        }
        // SAFETY: r · 32 + 32 <= out.len(), checked above.
        unsafe {
            _mm512_storeu_ps(out.as_mut_ptr().add(r * TASK_WIDTH), row_low);
            _mm512_storeu_ps(out.as_mut_ptr().add(r * TASK_WIDTH + PANEL), row_high);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::pseudo_random;
    use super::*;

    fn rounded(values: &[f32]) -> Vec<bf16> {
        values.iter().map(|&v| bf16::from_f32(v)).collect()
    }

    #[test]
    fn rounding_matches_half() {
        let mut values = pseudo_random(10_000, 27);
        values.extend([
            0.0,
            -0.0,
            1.0 + f32::EPSILON,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            1e-40,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::from_bits(0x7f7f_ffff),
            f32::from_bits(0xffff_ffff),
        ]);
        for value in values {
            assert_eq!(
                round_to_bf16(value),
                bf16::from_f32(value).to_bits(),
                "{value:e} ({:#x})",
                value.to_bits()
            );
        }
    }

    #[test]
    fn packing_round_trips() {
        for (rows, cols) in [(16, 8), (37, 101), (5, 1)] {
            let values = pseudo_random(rows * cols, 21);
            let packed = PackedBf16::from_f32(&values, rows, cols).unwrap();
            let expected: Vec<f32> = rounded(&values).iter().map(|v| v.to_f32()).collect();
            assert_eq!(packed.to_f32(), expected, "{rows} × {cols}");
            let from_bf16 = PackedBf16::from_bf16(&rounded(&values), rows, cols).unwrap();
            assert_eq!(from_bf16, packed);
        }
        assert!(PackedBf16::from_f32(&[0.0; 5], 2, 3).is_err());
    }

    #[test]
    fn products_match_widened_sums() {
        // Odd widths, a partial last panel, a single panel and every tile size.
        // 70 × 48 × 64 reaches the AMX tiles where there are some, with rows left over and
        // a task of one panel.
        for (inputs, rows, cols) in [
            (1, 70, 100),
            (15, 33, 257),
            (3, 16, 64),
            (20, 48, 31),
            (70, 48, 64),
        ] {
            let w = rounded(&pseudo_random(rows * cols, 22));
            let x = rounded(&pseudo_random(inputs * cols, 23));
            let bias = pseudo_random(rows, 24);
            let packed = PackedBf16::from_bf16(&w, rows, cols).unwrap();
            let got = packed.matmul(&x, inputs, Some(&bias), |v| v);
            for m in 0..inputs {
                for n in 0..rows {
                    let expected: f64 = (0..cols)
                        .map(|k| {
                            f64::from(w[n * cols + k].to_f32())
                                * f64::from(x[m * cols + k].to_f32())
                        })
                        .sum::<f64>()
                        + f64::from(bias[n]);
                    let value = f64::from(got[m * rows + n]);
                    assert!(
                        (value - expected).abs() < 1e-4 * (1.0 + expected.abs()),
                        "{inputs}×{rows}×{cols} [{m}, {n}]: {value} vs {expected}"
                    );
                }
            }
        }
    }

    #[test]
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn amx_and_portable_tiles_agree() {
        if !super::super::amx::available() {
            return;
        }
        let (pairs, count, inputs) = (48, 2, super::super::amx::ROWS);
        let weights: Vec<u32> = rounded(&pseudo_random(count * pairs * PANEL * 2, 28))
            .chunks(2)
            .map(|p| pair(p[0], p[1]))
            .collect();
        let rows: Vec<u32> = rounded(&pseudo_random(inputs * pairs * 2, 29))
            .chunks(2)
            .map(|p| pair(p[0], p[1]))
            .collect();
        let mut amx = vec![0f32; inputs * TASK_WIDTH];
        let mut portable = vec![0f32; inputs * TASK_WIDTH];
        let ordered = super::super::amx::tile_order(&rows, inputs, pairs);
        // SAFETY: AMX is available and 48 is a multiple of its step; the slices have the
        // needed sizes.
        unsafe { super::super::amx::tile_bf16(&weights, count, &ordered, pairs, &mut amx) };
        tile_portable(&weights, count, &rows, pairs, &mut portable);
        for (i, (a, b)) in amx.iter().zip(&portable).enumerate() {
            assert!(
                (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                "sum {i}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn simd_and_portable_tiles_agree() {
        if !cpu_features().avx512_bf16 {
            return;
        }
        let (pairs, count) = (50, 2);
        let weights: Vec<u32> = rounded(&pseudo_random(count * pairs * PANEL * 2, 25))
            .chunks(2)
            .map(|p| pair(p[0], p[1]))
            .collect();
        let rows: Vec<u32> = rounded(&pseudo_random(8 * pairs * 2, 26))
            .chunks(2)
            .map(|p| pair(p[0], p[1]))
            .collect();
        let mut simd = vec![0f32; 8 * TASK_WIDTH];
        let mut portable = vec![0f32; 8 * TASK_WIDTH];
        // SAFETY: the features were checked above; the slices have the needed sizes.
        unsafe { tile_avx512::<8, 1>(&weights, count, &rows, pairs, &mut simd) };
        tile_portable(&weights, count, &rows, pairs, &mut portable);
        for (i, (a, b)) in simd.iter().zip(&portable).enumerate() {
            assert!(
                (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                "sum {i}: {a} vs {b}"
            );
        }
    }
}
