//! Weights quantized to 8 or 4 bits in blocks of 32, and their product with
//! activations quantized to 8 bits per block.
//!
//! Each block of 32 weights of a row stores one `f32` scale `d` and 32 codes:
//! - [`QuantKind::Q8`]: `w ≈ d · q`, `q` in -127..=127, stored as `q + 128` (a byte);
//! - [`QuantKind::Q4`]: `w ≈ d · (q - 8)`, `q` in 0..=15, two codes per byte.
//!
//! Weights are kept unsigned so that the AVX-512 VNNI instruction `vpdpbusd` (unsigned
//! × signed bytes, summed in 32 bits) applies directly; the offset is removed with the
//! block sum of the activation codes: `Σ (q + o)·a = Σ q·a + o·Σ a`.
//!
//! Activations are quantized per row and per block the same way as Q8 weights
//! (`a ≈ e · c`, `c` in -127..=127), so a block's contribution is `d · e · Σ q·c`.
//!
//! In memory, rows go in groups of four, interleaved pair of blocks by pair of blocks
//! (see [`slot`]): a kernel tile of four rows then reads one stream instead of four,
//! which the hardware prefetcher follows at full bandwidth. Files keep plain row order.

mod widened;

use half::bf16;
use rayon::prelude::*;

use super::{CpuFeatures, cpu_features};

/// Values per quantization block.
pub const BLOCK: usize = 32;

/// The code width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKind {
    /// 8-bit codes: 1.125 bytes per weight with the scales.
    Q8,
    /// 4-bit codes: 0.625 bytes per weight with the scales.
    Q4,
}

impl QuantKind {
    /// `q8` or `q4`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Q8 => "q8",
            Self::Q4 => "q4",
        }
    }

    /// The kind called `name` (`q8` or `q4`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "q8" => Some(Self::Q8),
            "q4" => Some(Self::Q4),
            _ => None,
        }
    }

    /// Bytes of codes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q8 => BLOCK,
            Self::Q4 => BLOCK / 2,
        }
    }

    /// The offset added to codes to store them unsigned.
    fn offset(self) -> i32 {
        match self {
            Self::Q8 => 128,
            Self::Q4 => 8,
        }
    }
}

/// A `[rows, cols]` matrix of quantized weights.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantMatrix {
    kind: QuantKind,
    rows: usize,
    cols: usize,
    scales: Vec<f32>,
    codes: Vec<u8>,
}

/// Quantizes one row: its block scales and its stored codes.
fn quantize_row(kind: QuantKind, row: &[f32]) -> (Vec<f32>, Vec<u8>) {
    let mut scales = Vec::with_capacity(row.len() / BLOCK);
    let mut codes = Vec::with_capacity(row.len());
    for block in row.chunks(BLOCK) {
        match kind {
            QuantKind::Q8 => {
                let (scale, q) = quantize_block(block, 127.0);
                scales.push(scale);
                codes.extend(q.iter().map(|&c| (c + 128) as u8));
            }
            QuantKind::Q4 => {
                // llama.cpp's Q4_0 choice: the largest-magnitude value maps to -8, so the
                // full code range is used.
                let extreme = block
                    .iter()
                    .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let scale = extreme / -8.0;
                let inverse = if scale == 0.0 { 0.0 } else { 1.0 / scale };
                scales.push(scale);
                codes.extend(
                    block
                        .iter()
                        .map(|&v| ((v * inverse).round() + 8.0).clamp(0.0, 15.0) as u8),
                );
            }
        }
    }
    if kind == QuantKind::Q4 {
        codes = pack_row_nibbles(&codes);
    }
    (scales, codes)
}

/// Quantizes one block of values symmetrically to codes in `-limit..=limit`.
fn quantize_block(values: &[f32], limit: f32) -> (f32, Vec<i32>) {
    let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    if max == 0.0 {
        return (0.0, vec![0; values.len()]);
    }
    let scale = max / limit;
    let codes = values
        .iter()
        .map(|v| (v / scale).round().clamp(-limit, limit) as i32)
        .collect();
    (scale, codes)
}

impl QuantMatrix {
    /// Quantizes `weights` `[rows, cols]` (row-major); `cols` must be a multiple of 32.
    pub fn quantize(
        kind: QuantKind,
        weights: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<Self, String> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(format!(
                "cannot quantize rows of {cols} values: not a multiple of {BLOCK}"
            ));
        }
        if weights.len() != rows * cols {
            return Err(format!(
                "{} weights do not make a {rows} × {cols} matrix",
                weights.len()
            ));
        }
        let blocks = cols / BLOCK;
        // Rows are independent: quantize them in parallel, then concatenate in order.
        let per_row: Vec<(Vec<f32>, Vec<u8>)> = weights
            .par_chunks(cols)
            .map(|row| quantize_row(kind, row))
            .collect();
        let mut scales = Vec::with_capacity(rows * blocks);
        let mut codes = Vec::with_capacity(rows * blocks * kind.block_bytes());
        for (row_scales, row_codes) in per_row {
            scales.extend(row_scales);
            codes.extend(row_codes);
        }
        Self::from_parts(kind, rows, cols, scales, codes)
    }

    /// Rebuilds a matrix from its parts in row order (as [`QuantMatrix::parts`] returns them).
    pub fn from_parts(
        kind: QuantKind,
        rows: usize,
        cols: usize,
        scales: Vec<f32>,
        codes: Vec<u8>,
    ) -> Result<Self, String> {
        let blocks = cols / BLOCK;
        if !cols.is_multiple_of(BLOCK)
            || scales.len() != rows * blocks
            || codes.len() != rows * blocks * kind.block_bytes()
        {
            return Err(format!(
                "quantized data does not fit a {rows} × {cols} {kind:?} matrix"
            ));
        }
        Ok(Self {
            kind,
            rows,
            cols,
            scales: reorder(&scales, rows, blocks, 1, Direction::ToSlots),
            codes: reorder(&codes, rows, blocks, kind.block_bytes(), Direction::ToSlots),
        })
    }

    /// Returns the kind, shape, scales and codes in row order, for saving.
    pub fn parts(&self) -> (QuantKind, usize, usize, Vec<f32>, Vec<u8>) {
        let blocks = self.cols / BLOCK;
        let scales = reorder(&self.scales, self.rows, blocks, 1, Direction::ToRows);
        let codes = reorder(
            &self.codes,
            self.rows,
            blocks,
            self.kind.block_bytes(),
            Direction::ToRows,
        );
        (self.kind, self.rows, self.cols, scales, codes)
    }

    /// Output width.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input width.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The code width.
    pub fn kind(&self) -> QuantKind {
        self.kind
    }

    /// Bytes of scales and codes, what one product reads.
    pub fn size_in_bytes(&self) -> usize {
        self.scales.len() * 4 + self.codes.len()
    }

    /// Returns the scale of block `b` of row `r`.
    fn scale(&self, r: usize, b: usize) -> f32 {
        self.scales[slot(self.rows, self.cols / BLOCK, r, b)]
    }

    /// The codes of row `r`, unpacked to values in the stored (unsigned) range.
    fn row_codes(&self, r: usize) -> Vec<u8> {
        let blocks = self.cols / BLOCK;
        let bytes = self.kind.block_bytes();
        let packed: Vec<u8> = (0..blocks)
            .flat_map(|b| {
                let start = slot(self.rows, blocks, r, b) * bytes;
                self.codes[start..start + bytes].iter().copied()
            })
            .collect();
        match self.kind {
            QuantKind::Q8 => packed,
            QuantKind::Q4 => unpack_row_nibbles(&packed, self.cols),
        }
    }

    /// Row `r` dequantized.
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let codes = self.row_codes(r);
        let offset = self.kind.offset() as f32;
        let mut values = Vec::with_capacity(self.cols);
        for (b, block) in codes.chunks(BLOCK).enumerate() {
            let scale = self.scale(r, b);
            values.extend(block.iter().map(|&c| scale * (f32::from(c) - offset)));
        }
        values
    }

    /// `out[m][r] = Σ_k x[m][k] · w[r][k]` with `x` `[inputs, cols]` quantized to 8 bits
    /// per block; `out` is `[inputs, rows]`.
    pub fn matmul(&self, x: &[f32], inputs: usize, out: &mut [f32]) {
        assert_eq!(
            out.len(),
            inputs * self.rows,
            "outputs must be inputs × rows"
        );
        let [product] = &Self::matmul_many(&[self], x, inputs)[..] else {
            unreachable!("one matrix gives one product")
        };
        out.copy_from_slice(product);
    }

    /// Computes the products of several matrices of one kind and width with the same input
    /// `x` `[inputs, cols]`, each `[inputs, rows]`. The input is quantized once, and the
    /// threads share out all the matrices' rows together, so a single input row costs one
    /// dispatch instead of one per matrix.
    pub fn matmul_many(matrices: &[&Self], x: &[f32], inputs: usize) -> Vec<Vec<f32>> {
        let Some(first) = matrices.first() else {
            return Vec::new();
        };
        let (kind, cols) = (first.kind, first.cols);
        assert!(
            matrices.iter().all(|m| m.kind == kind && m.cols == cols),
            "matrices must share their kind and width"
        );
        assert_eq!(x.len(), inputs * cols, "inputs must be inputs × cols");
        let features = cpu_features();
        let activations = if features.avx512_bf16 && inputs >= widened::MIN_INPUTS {
            Activations::Bf16(crate::convert::to_bf16(x))
        } else {
            Activations::Int8(QuantizedActivations::new(x, inputs, cols, kind.offset()))
        };
        // Each task fills its rows' outputs, `[rows of the task, inputs]`.
        let mut transposed: Vec<Vec<f32>> = matrices
            .iter()
            .map(|m| vec![0f32; m.rows * inputs])
            .collect();
        let mut tasks = Vec::new();
        for (matrix, outputs) in matrices.iter().zip(transposed.iter_mut()) {
            for (task, block) in outputs
                .chunks_mut(super::ROWS_PER_TASK * inputs)
                .enumerate()
            {
                tasks.push((*matrix, task * super::ROWS_PER_TASK, block));
            }
        }
        tasks
            .into_par_iter()
            .for_each(|(matrix, first, block)| match &activations {
                Activations::Int8(codes) => {
                    matrix.rows_products(first, codes, block, inputs, features)
                }
                Activations::Bf16(x) => {
                    matrix.rows_products_widened(first, x, block, inputs, features.avx512_bf16)
                }
            });
        matrices
            .iter()
            .zip(transposed)
            .map(|(matrix, by_row)| {
                let mut out = vec![0f32; inputs * matrix.rows];
                for r in 0..matrix.rows {
                    for m in 0..inputs {
                        out[m * matrix.rows + r] = by_row[r * inputs + m];
                    }
                }
                out
            })
            .collect()
    }

    /// Products of rows `first..` with every input, into `outputs` `[rows, inputs]`.
    fn rows_products(
        &self,
        first: usize,
        activations: &QuantizedActivations,
        outputs: &mut [f32],
        inputs: usize,
        features: CpuFeatures,
    ) {
        let count = outputs.len() / inputs;
        #[cfg(target_arch = "x86_64")]
        if features.avx512_vnni {
            // Tiles of 4 rows × 4 inputs: each unpacked weight vector serves four inputs
            // and each activation vector four rows.
            let mut r = 0;
            while r < count {
                let tile_rows = if (first + r).is_multiple_of(GROUP_ROWS) && count - r >= GROUP_ROWS
                {
                    GROUP_ROWS
                } else {
                    1
                };
                if tile_rows == GROUP_ROWS && inputs == 1 && self.kind == QuantKind::Q4 {
                    // SAFETY: the features were detected at run time, and the group's four
                    // rows exist.
                    unsafe {
                        self.group_q4_single_vnni(first + r, activations, &mut outputs[r..r + 4])
                    };
                    r += tile_rows;
                    continue;
                }
                let mut m = 0;
                while m < inputs {
                    let tile_inputs = match inputs - m {
                        left if left >= 4 => 4,
                        left if left >= 2 => 2,
                        _ => 1,
                    };
                    let tile = Tile {
                        row: first + r,
                        input: m,
                        outputs: &mut outputs[r * inputs..],
                        stride: inputs,
                    };
                    // SAFETY: the features were detected at run time, and the tile's rows
                    // and inputs exist.
                    unsafe {
                        match (tile_rows, tile_inputs) {
                            (4, 4) => self.tile_vnni::<4, 4>(activations, tile),
                            (4, 2) => self.tile_vnni::<4, 2>(activations, tile),
                            (4, _) => self.tile_vnni::<4, 1>(activations, tile),
                            (_, 4) => self.tile_vnni::<1, 4>(activations, tile),
                            (_, 2) => self.tile_vnni::<1, 2>(activations, tile),
                            (_, _) => self.tile_vnni::<1, 1>(activations, tile),
                        }
                    }
                    m += tile_inputs;
                }
                r += tile_rows;
            }
            return;
        }
        let _ = features;
        for (i, row_outputs) in outputs.chunks_mut(inputs).enumerate().take(count) {
            self.row_products_portable(first + i, activations, row_outputs);
        }
    }

    fn row_products_portable(
        &self,
        r: usize,
        activations: &QuantizedActivations,
        outputs: &mut [f32],
    ) {
        let blocks = self.cols / BLOCK;
        let codes = self.row_codes(r);
        for (m, output) in outputs.iter_mut().enumerate() {
            *output = (0..blocks)
                .map(|b| self.block_product(r, &codes, m, b, activations))
                .sum();
        }
    }

    /// Block `b` of row `r` (its unpacked `codes`) times block `b` of input `m`.
    fn block_product(
        &self,
        r: usize,
        codes: &[u8],
        m: usize,
        b: usize,
        activations: &QuantizedActivations,
    ) -> f32 {
        let blocks = self.cols / BLOCK;
        let x = &activations.codes[m * self.cols + b * BLOCK..m * self.cols + (b + 1) * BLOCK];
        let w = &codes[b * BLOCK..(b + 1) * BLOCK];
        let raw: i32 = w.iter().zip(x).map(|(&w, &x)| w as i32 * x as i32).sum();
        let dot = raw - self.kind.offset() * activations.sums[m * blocks + b];
        self.scale(r, b) * activations.scales[m * blocks + b] * dot as f32
    }

    /// Products of rows `tile.row..+R` with inputs `tile.input..+M`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    unsafe fn tile_vnni<const R: usize, const M: usize>(
        &self,
        activations: &QuantizedActivations,
        tile: Tile,
    ) {
        use std::arch::x86_64::*;
        let blocks = self.cols / BLOCK;
        let pairs = blocks / 2;
        let block_bytes = self.kind.block_bytes();
        // The tile's rows lie in one group (four-row tiles start at a group), where one
        // pair of blocks of all its rows follows the previous pair.
        let group_start = tile.row / GROUP_ROWS * GROUP_ROWS;
        let group_rows = GROUP_ROWS.min(self.rows - group_start);
        let row_in_group = tile.row - group_start;
        assert!(row_in_group + R <= group_rows);
        assert!((group_start * blocks + 2 * pairs * group_rows) <= self.scales.len());
        // SAFETY: the offsets are the tile's group and first input, checked above.
        let (codes, scales, x_codes, x_starts, x_scales) = unsafe {
            (
                self.codes.as_ptr().add(group_start * blocks * block_bytes),
                self.scales.as_ptr().add(group_start * blocks),
                activations.codes.as_ptr().add(tile.input * self.cols),
                activations
                    .lane_corrections
                    .as_ptr()
                    .add(tile.input * self.cols / 4),
                activations
                    .pair_scales
                    .as_ptr()
                    .add(tile.input * pairs * 16),
            )
        };
        // Lanes 0-7 take a pair's first scale, lanes 8-15 its second.
        let spread = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        let mut sums = [[_mm512_setzero_ps(); M]; R];
        for p in 0..pairs {
            // A prefetch is only a hint: addresses past the end of the codes do not fault.
            let ahead = 2 * (p * group_rows + row_in_group) * block_bytes + PREFETCH_BYTES;
            for line in (0..R * 2 * block_bytes).step_by(64) {
                _mm_prefetch::<_MM_HINT_T1>(codes.wrapping_add(ahead + line).cast());
            }
            let mut weights = [_mm512_setzero_si512(); R];
            let mut weight_scales = [_mm512_setzero_ps(); R];
            for i in 0..R {
                // SAFETY (all loads below): p < pairs and the tile's rows and inputs were
                // checked against the lengths above.
                let pair_slot = 2 * (p * group_rows + row_in_group + i);
                let pointer = unsafe { codes.add(pair_slot * block_bytes) };
                weights[i] = match self.kind {
                    QuantKind::Q8 => unsafe { _mm512_loadu_si512(pointer.cast()) },
                    QuantKind::Q4 => unsafe { unpack_pair_avx512(pointer) },
                };
                let two = unsafe { _mm_load_sd(scales.add(pair_slot).cast()) };
                weight_scales[i] =
                    _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_castpd_ps(two)));
            }
            for j in 0..M {
                let (x, start, x_scale) = unsafe {
                    (
                        _mm512_loadu_si512(x_codes.add(j * self.cols + 64 * p).cast()),
                        _mm512_loadu_si512(x_starts.add(j * self.cols / 4 + 16 * p).cast()),
                        _mm512_loadu_ps(x_scales.add((j * pairs + p) * 16)),
                    )
                };
                for ((row_sums, &w), &w_scale) in sums.iter_mut().zip(&weights).zip(&weight_scales)
                {
                    // Starting from the offset correction makes each lane the exact signed
                    // product of its four weights and codes.
                    let dot = _mm512_dpbusd_epi32(start, w, x);
                    row_sums[j] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(dot),
                        _mm512_mul_ps(w_scale, x_scale),
                        row_sums[j],
                    );
                }
            }
        }
        let unpaired = blocks % 2 == 1;
        for (i, row_sums) in sums.iter().enumerate() {
            let r = tile.row + i;
            let row_codes = if unpaired {
                self.row_codes(r)
            } else {
                Vec::new()
            };
            for (j, &sum) in row_sums.iter().enumerate() {
                let m = tile.input + j;
                let mut total = _mm512_reduce_add_ps(sum);
                if unpaired {
                    total += self.block_product(r, &row_codes, m, blocks - 1, activations);
                }
                tile.outputs[i * tile.stride + m] = total;
            }
        }
    }
}

impl QuantMatrix {
    /// Computes the products of the four 4-bit rows of the group at `row` with a single
    /// input, the decoding case. Two rows share each 64-byte load: low nibbles hold both rows' first
    /// block and high nibbles their second, so the input's blocks are broadcast to both
    /// halves instead of the codes being shuffled into row order.
    ///
    /// NOTE: the 8- and 4-bit decoding products fall behind a plain read: about 30 GB/s
    /// against 35–45 on a 2-core Zen 4 machine, and 19–22 against the 26 of f32 decoding
    /// on a 2-core Intel one. Reading two groups side by side did not help there, so the
    /// reads in flight are not the limit; the cause is not established.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    unsafe fn group_q4_single_vnni(
        &self,
        row: usize,
        activations: &QuantizedActivations,
        outputs: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        let blocks = self.cols / BLOCK;
        let pairs = blocks / 2;
        assert!(row.is_multiple_of(GROUP_ROWS));
        assert!(row + GROUP_ROWS <= self.rows);
        assert_eq!(outputs.len(), GROUP_ROWS);
        assert!(activations.codes.len() >= self.cols);

        // SAFETY: the group lies inside the matrix, checked above.
        let (codes, scales) = unsafe {
            (
                self.codes.as_ptr().add(row * blocks * BLOCK / 2),
                self.scales.as_ptr().add(row * blocks),
            )
        };
        let (x_codes, x_corrections, x_scales) = (
            activations.codes.as_ptr(),
            activations.lane_corrections.as_ptr(),
            activations.scales.as_ptr(),
        );

        // A pair's eight weight scales are [row 0 block 0, row 0 block 1, row 1 block 0, …];
        // these pick one block of two rows, eight lanes each.
        let first_blocks = [
            _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0),
            _mm512_set_epi32(6, 6, 6, 6, 6, 6, 6, 6, 4, 4, 4, 4, 4, 4, 4, 4),
        ];
        let second_blocks = [
            _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1),
            _mm512_set_epi32(7, 7, 7, 7, 7, 7, 7, 7, 5, 5, 5, 5, 5, 5, 5, 5),
        ];
        let low_nibbles = _mm512_set1_epi8(0x0F);
        let mut sums = [_mm512_setzero_ps(); 2];

        for p in 0..pairs {
            // SAFETY (all loads): p < pairs, inside the group's codes and scales and the
            // input's codes, corrections and scales.
            unsafe {
                let pair_codes = codes.add(p * GROUP_ROWS * BLOCK);
                _mm_prefetch::<_MM_HINT_T1>(pair_codes.wrapping_add(PREFETCH_BYTES).cast());
                _mm_prefetch::<_MM_HINT_T1>(pair_codes.wrapping_add(PREFETCH_BYTES + 64).cast());
                let x_first =
                    _mm512_broadcast_i64x4(_mm256_loadu_si256(x_codes.add(64 * p).cast()));
                let x_second =
                    _mm512_broadcast_i64x4(_mm256_loadu_si256(x_codes.add(64 * p + 32).cast()));
                let start_first =
                    _mm512_broadcast_i64x4(_mm256_loadu_si256(x_corrections.add(16 * p).cast()));
                let start_second = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                    x_corrections.add(16 * p + 8).cast(),
                ));
                let x_pair = _mm256_castpd_ps(_mm256_broadcast_sd(&*x_scales.add(2 * p).cast()));
                let products = _mm512_castps256_ps512(_mm256_mul_ps(
                    _mm256_loadu_ps(scales.add(p * 2 * GROUP_ROWS)),
                    x_pair,
                ));
                for half in 0..2 {
                    let both = _mm512_loadu_si512(pair_codes.add(64 * half).cast());
                    let first = _mm512_and_si512(both, low_nibbles);
                    let second = _mm512_and_si512(_mm512_srli_epi16::<4>(both), low_nibbles);
                    let dot_first = _mm512_dpbusd_epi32(start_first, first, x_first);
                    let dot_second = _mm512_dpbusd_epi32(start_second, second, x_second);
                    let sum = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(dot_first),
                        _mm512_permutexvar_ps(first_blocks[half], products),
                        sums[half],
                    );
                    sums[half] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(dot_second),
                        _mm512_permutexvar_ps(second_blocks[half], products),
                        sum,
                    );
                }
            }
        }

        let unpaired = blocks % 2 == 1;
        for (half, sum) in sums.iter().enumerate() {
            let mut lanes = [0f32; 16];
            // SAFETY: `lanes` has room for the 16 values.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *sum) };
            for i in 0..2 {
                let r = row + 2 * half + i;
                let mut total: f32 = lanes[8 * i..8 * i + 8].iter().sum();
                if unpaired {
                    total += self.block_product(r, &self.row_codes(r), 0, blocks - 1, activations);
                }
                outputs[2 * half + i] = total;
            }
        }
    }
}

/// The output region of a kernel tile: rows `row..` times inputs `input..`, with output
/// rows `stride` apart from `outputs[0]`.
#[cfg(target_arch = "x86_64")]
struct Tile<'a> {
    row: usize,
    input: usize,
    outputs: &'a mut [f32],
    stride: usize,
}

/// How far ahead of its reads, in bytes, a kernel tile prefetches its codes, into L2. In
/// a timing loop over the decoding products of 24 OPT-2.7B-sized layers, prefetching into
/// L2 rather than L1 took 8-bit decoding from 1.22–1.65× of a plain read's time to
/// 1.14–1.37×, and 4-bit from 1.26–1.32× to 1.19–1.30×.
/// On a 2-core Intel machine 4 and 8 KiB did equally well, 16 KiB slightly worse, and
/// 1 KiB took 10 % longer.
#[cfg(target_arch = "x86_64")]
const PREFETCH_BYTES: usize = 8192;

/// Rows per group of the interleaved layout.
const GROUP_ROWS: usize = 4;

/// The position of block `b` of row `r` in the interleaved layout of a matrix of
/// `rows` rows of `blocks` blocks.
///
/// Rows go in groups of [`GROUP_ROWS`] (the last group may be smaller). Within a group,
/// the first pair of blocks of each row comes first, then the second pair of each row,
/// and so on. An unpaired last block of each row closes the group.
fn slot(rows: usize, blocks: usize, r: usize, b: usize) -> usize {
    let group_start = r / GROUP_ROWS * GROUP_ROWS;
    let group_rows = GROUP_ROWS.min(rows - group_start);
    let i = r - group_start;
    let paired = blocks / 2 * 2;
    let within = if b < paired {
        (b / 2 * group_rows + i) * 2 + b % 2
    } else {
        paired * group_rows + i
    };
    group_start * blocks + within
}

/// The direction in which [`reorder`] moves blocks.
#[derive(Clone, Copy)]
enum Direction {
    ToSlots,
    ToRows,
}

/// Moves `data` (`unit` values per block) between row order and the interleaved layout.
fn reorder<T: Copy + Default>(
    data: &[T],
    rows: usize,
    blocks: usize,
    unit: usize,
    direction: Direction,
) -> Vec<T> {
    let mut out = vec![T::default(); data.len()];
    for r in 0..rows {
        for b in 0..blocks {
            let (row_order, slotted) = ((r * blocks + b) * unit, slot(rows, blocks, r, b) * unit);
            let (from, to) = match direction {
                Direction::ToSlots => (row_order, slotted),
                Direction::ToRows => (slotted, row_order),
            };
            out[to..to + unit].copy_from_slice(&data[from..from + unit]);
        }
    }
    out
}

/// Packs a row of 4-bit codes, two per byte.
///
/// Blocks go in pairs of 64 codes: byte `i` of a pair holds code `i` in its low nibble
/// and code `i + 32` in its high nibble, so a shift, an insert and an AND unpack a pair
/// in order. A row's last block, when unpaired, packs code `i` with code `i + 16`.
fn pack_row_nibbles(codes: &[u8]) -> Vec<u8> {
    let mut packed = Vec::with_capacity(codes.len() / 2);
    let paired = codes.len() / 64 * 64;
    for pair in codes[..paired].chunks(64) {
        packed.extend((0..32).map(|i| pair[i] | (pair[i + 32] << 4)));
    }
    if let Some(last) = codes.get(paired..).filter(|rest| !rest.is_empty()) {
        packed.extend((0..16).map(|i| last[i] | (last[i + 16] << 4)));
    }
    packed
}

/// Inverse of [`pack_row_nibbles`] for a row of `cols` codes.
fn unpack_row_nibbles(packed: &[u8], cols: usize) -> Vec<u8> {
    let mut codes = vec![0u8; cols];
    let paired = cols / 64 * 64;
    for (p, bytes) in packed[..paired / 2].chunks(32).enumerate() {
        for (i, &byte) in bytes.iter().enumerate() {
            codes[64 * p + i] = byte & 0x0F;
            codes[64 * p + 32 + i] = byte >> 4;
        }
    }
    if cols > paired {
        for (i, &byte) in packed[paired / 2..].iter().enumerate().take(16) {
            codes[paired + i] = byte & 0x0F;
            codes[paired + 16 + i] = byte >> 4;
        }
    }
    codes
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn unpack_pair_avx512(pointer: *const u8) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees 32 readable bytes, packed by `pack_row_nibbles`.
    let bytes = unsafe { _mm256_loadu_si256(pointer.cast()) };
    let both =
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(bytes), _mm256_srli_epi16::<4>(bytes));
    _mm512_and_si512(both, _mm512_set1_epi8(0x0F))
}

/// The input of a product, prepared once for all its tasks.
enum Activations {
    /// For the 8-bit kernels.
    Int8(QuantizedActivations),
    /// For weights widened to bfloat16 (see [`widened`]).
    Bf16(Vec<bf16>),
}

/// Activations quantized to 8-bit codes per block of 32, with block sums of the codes,
/// per group of four codes (one `vpdpbusd` lane) `-offset ×` their sum, and per pair of
/// blocks the 16 lane scales (8 copies of each block's scale).
#[derive(Debug)]
struct QuantizedActivations {
    codes: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<i32>,
    lane_corrections: Vec<i32>,
    pair_scales: Vec<f32>,
}

impl QuantizedActivations {
    fn new(x: &[f32], inputs: usize, cols: usize, offset: i32) -> Self {
        let blocks = cols / BLOCK;
        let mut codes = vec![0i8; inputs * cols];
        let mut scales = vec![0f32; inputs * blocks];
        let mut sums = vec![0i32; inputs * blocks];
        let mut lane_corrections = vec![0i32; inputs * cols / 4];
        for (((values, block_codes), scale), (sum, corrections)) in x
            .chunks_exact(BLOCK)
            .zip(codes.chunks_exact_mut(BLOCK))
            .zip(&mut scales)
            .zip(
                sums.iter_mut()
                    .zip(lane_corrections.chunks_exact_mut(BLOCK / 4)),
            )
        {
            *scale = quantize_activation_block(values, block_codes);
            for (correction, lane) in corrections.iter_mut().zip(block_codes.chunks_exact(4)) {
                let lane_sum: i32 = lane.iter().map(|&c| i32::from(c)).sum();
                *correction = -offset * lane_sum;
                *sum += lane_sum;
            }
        }
        let pairs = blocks / 2;
        let mut pair_scales = Vec::with_capacity(inputs * pairs * 16);
        for row in scales.chunks(blocks.max(1)) {
            for p in 0..pairs {
                pair_scales.extend(std::iter::repeat_n(row[2 * p], 8));
                pair_scales.extend(std::iter::repeat_n(row[2 * p + 1], 8));
            }
        }
        Self {
            codes,
            scales,
            sums,
            lane_corrections,
            pair_scales,
        }
    }
}

/// Quantizes one block of activations to codes in -127..=127 and returns its scale.
///
/// Rounding adds and subtracts 1.5 · 2²³, which rounds half to even in `f32` arithmetic
/// and, unlike `f32::round`, compiles to vector instructions on every x86-64 CPU.
fn quantize_activation_block(values: &[f32], codes: &mut [i8]) -> f32 {
    const ROUNDING: f32 = 12_582_912.0;
    let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    if max == 0.0 || !max.is_finite() {
        codes.fill(0);
        return if max == 0.0 { 0.0 } else { f32::NAN };
    }
    let inverse = 127.0 / max;
    for (code, &value) in codes.iter_mut().zip(values) {
        let rounded = (value * inverse + ROUNDING) - ROUNDING;
        *code = rounded.clamp(-127.0, 127.0) as i8;
    }
    max / 127.0
}

#[cfg(test)]
mod tests {
    use super::super::tests::pseudo_random;
    use super::*;

    fn naive(w: &[f32], x: &[f32], rows: usize, cols: usize, inputs: usize) -> Vec<f32> {
        let mut out = vec![0f32; inputs * rows];
        for m in 0..inputs {
            for r in 0..rows {
                out[m * rows + r] = (0..cols).map(|k| w[r * cols + k] * x[m * cols + k]).sum();
            }
        }
        out
    }

    #[test]
    fn dequantized_weights_are_close() {
        let (rows, cols) = (3, 96);
        let w = pseudo_random(rows * cols, 5);
        for (kind, tolerance) in [(QuantKind::Q8, 0.01), (QuantKind::Q4, 0.15)] {
            let q = QuantMatrix::quantize(kind, &w, rows, cols).unwrap();
            for r in 0..rows {
                for (i, (a, b)) in q.dequantize_row(r).iter().zip(&w[r * cols..]).enumerate() {
                    assert!(
                        (a - b).abs() < tolerance,
                        "{kind:?} row {r} col {i}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn products_match_dequantized_weights() {
        // 96 columns: one pair of blocks and one unpaired block per row.
        for (rows, cols, inputs) in [
            (70, 96, 1),
            (130, 256, 3),
            (64, 2560, 2),
            (67, 160, 11),
            (40, 2560, 1),
        ] {
            let w = pseudo_random(rows * cols, 6);
            let x = pseudo_random(inputs * cols, 7);
            for kind in [QuantKind::Q8, QuantKind::Q4] {
                let q = QuantMatrix::quantize(kind, &w, rows, cols).unwrap();
                let dequantized: Vec<f32> = (0..rows).flat_map(|r| q.dequantize_row(r)).collect();
                let expected = naive(&dequantized, &x, rows, cols, inputs);
                let mut out = vec![0f32; inputs * rows];
                q.matmul(&x, inputs, &mut out);
                // The remaining error is the activations' 8-bit rounding.
                let scale = (cols as f32).sqrt() * 0.02;
                for (i, (a, b)) in out.iter().zip(&expected).enumerate() {
                    assert!(
                        (a - b).abs() < scale,
                        "{kind:?} {rows}x{cols} output {i}: {a} vs {b}"
                    );
                }
                // The 8-bit kernels for this CPU against their portable version (`matmul`
                // may have widened the weights instead).
                let activations = QuantizedActivations::new(&x, inputs, cols, kind.offset());
                let mut int8 = vec![0f32; rows * inputs];
                q.rows_products(0, &activations, &mut int8, inputs, cpu_features());
                for r in 0..rows {
                    let mut portable = vec![0f32; inputs];
                    q.row_products_portable(r, &activations, &mut portable);
                    for m in 0..inputs {
                        assert!(
                            (portable[m] - int8[r * inputs + m]).abs() < 1e-3,
                            "{kind:?} row {r} input {m}: portable and chosen kernels differ"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn shared_products_match_separate_ones() {
        let cols = 160;
        let x = pseudo_random(2 * cols, 9);
        for kind in [QuantKind::Q8, QuantKind::Q4] {
            let matrices: Vec<QuantMatrix> = [(8, 10), (70, 11), (3, 12)]
                .iter()
                .map(|&(rows, seed)| {
                    QuantMatrix::quantize(kind, &pseudo_random(rows * cols, seed), rows, cols)
                        .unwrap()
                })
                .collect();
            for inputs in [1, 2] {
                let x = &x[..inputs * cols];
                let shared =
                    QuantMatrix::matmul_many(&matrices.iter().collect::<Vec<_>>(), x, inputs);
                for (matrix, product) in matrices.iter().zip(&shared) {
                    let mut alone = vec![0f32; inputs * matrix.rows()];
                    matrix.matmul(x, inputs, &mut alone);
                    assert_eq!(
                        product,
                        &alone,
                        "{kind:?}, {} rows, {inputs} inputs",
                        matrix.rows()
                    );
                }
            }
        }
    }

    #[test]
    fn parts_round_trip_in_row_order() {
        for (rows, cols) in [(6, 96), (8, 64), (3, 32)] {
            let w = pseudo_random(rows * cols, 8);
            for kind in [QuantKind::Q8, QuantKind::Q4] {
                let q = QuantMatrix::quantize(kind, &w, rows, cols).unwrap();
                let (_, _, scales, codes) = {
                    let (k, r, c, s, d) = q.parts();
                    assert_eq!((k, r, c), (kind, rows, cols));
                    (r, c, s, d)
                };
                let blocks = cols / BLOCK;
                for r in 0..rows {
                    let (start, end) = (r * blocks, (r + 1) * blocks);
                    let expected: Vec<f32> = (0..blocks).map(|b| q.scale(r, b)).collect();
                    assert_eq!(scales[start..end], expected[..], "{kind:?} row {r}");
                }
                let rebuilt = QuantMatrix::from_parts(kind, rows, cols, scales, codes).unwrap();
                assert_eq!(rebuilt, q);
            }
        }
    }

    #[test]
    fn unaligned_widths_are_refused() {
        assert!(QuantMatrix::quantize(QuantKind::Q8, &[0.0; 40], 1, 40).is_err());
    }
}
