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
        Ok(Self {
            kind,
            rows,
            cols,
            scales,
            codes,
        })
    }

    /// Rebuilds a matrix from its parts (as written by [`QuantMatrix::parts`]).
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
            scales,
            codes,
        })
    }

    /// The kind, shape, scales and codes, for saving.
    pub fn parts(&self) -> (QuantKind, usize, usize, &[f32], &[u8]) {
        (self.kind, self.rows, self.cols, &self.scales, &self.codes)
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

    /// The codes of row `r`, unpacked to values in the stored (unsigned) range.
    fn row_codes(&self, r: usize) -> Vec<u8> {
        let blocks = self.cols / BLOCK;
        let bytes = blocks * self.kind.block_bytes();
        let packed = &self.codes[r * bytes..(r + 1) * bytes];
        match self.kind {
            QuantKind::Q8 => packed.to_vec(),
            QuantKind::Q4 => unpack_row_nibbles(packed, self.cols),
        }
    }

    /// Row `r` dequantized.
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let blocks = self.cols / BLOCK;
        let codes = self.row_codes(r);
        let offset = self.kind.offset();
        (0..self.cols)
            .map(|i| self.scales[r * blocks + i / BLOCK] * (codes[i] as i32 - offset) as f32)
            .collect()
    }

    /// `out[m][r] = Σ_k x[m][k] · w[r][k]` with `x` `[inputs, cols]` quantized to 8 bits
    /// per block; `out` is `[inputs, rows]`.
    pub fn matmul(&self, x: &[f32], inputs: usize, out: &mut [f32]) {
        assert_eq!(x.len(), inputs * self.cols, "inputs must be inputs × cols");
        assert_eq!(
            out.len(),
            inputs * self.rows,
            "outputs must be inputs × rows"
        );
        let activations = QuantizedActivations::new(x, inputs, self.cols, self.kind.offset());
        let features = cpu_features();
        let mut transposed = vec![0f32; self.rows * inputs];
        transposed
            .par_chunks_mut(super::ROWS_PER_TASK * inputs)
            .enumerate()
            .for_each(|(task, block)| {
                let first = task * super::ROWS_PER_TASK;
                for (i, outputs) in block.chunks_mut(inputs).enumerate() {
                    self.row_products(first + i, &activations, outputs, features);
                }
            });
        for r in 0..self.rows {
            for m in 0..inputs {
                out[m * self.rows + r] = transposed[r * inputs + m];
            }
        }
    }

    fn row_products(
        &self,
        r: usize,
        activations: &QuantizedActivations,
        outputs: &mut [f32],
        features: CpuFeatures,
    ) {
        #[cfg(target_arch = "x86_64")]
        if features.avx512_vnni {
            // SAFETY: the features were detected at run time.
            unsafe { self.row_products_vnni(r, activations, outputs) };
            return;
        }
        let _ = features;
        self.row_products_portable(r, activations, outputs);
    }

    fn row_products_portable(
        &self,
        r: usize,
        activations: &QuantizedActivations,
        outputs: &mut [f32],
    ) {
        let blocks = self.cols / BLOCK;
        let codes = self.row_codes(r);
        let offset = self.kind.offset();
        for (m, output) in outputs.iter_mut().enumerate() {
            let mut total = 0f32;
            for b in 0..blocks {
                let x =
                    &activations.codes[m * self.cols + b * BLOCK..m * self.cols + (b + 1) * BLOCK];
                let w = &codes[b * BLOCK..(b + 1) * BLOCK];
                let raw: i32 = w.iter().zip(x).map(|(&w, &x)| w as i32 * x as i32).sum();
                let dot = raw - offset * activations.sums[m * blocks + b];
                total +=
                    self.scales[r * blocks + b] * activations.scales[m * blocks + b] * dot as f32;
            }
            *output = total;
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    unsafe fn row_products_vnni(
        &self,
        r: usize,
        activations: &QuantizedActivations,
        outputs: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        /// Inputs handled together, so that each unpacked weight vector is reused.
        const GROUP: usize = 2;
        /// Independent sums per input, so that consecutive pairs do not wait on each
        /// other's multiply-add.
        const CHAINS: usize = 4;
        let blocks = self.cols / BLOCK;
        let row_bytes = blocks * self.kind.block_bytes();
        let packed = &self.codes[r * row_bytes..(r + 1) * row_bytes];
        let row_scales = &self.scales[r * blocks..(r + 1) * blocks];
        let pairs = blocks / 2;
        // Lanes 0-7 take the first scale, lanes 8-15 the second.
        let spread = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        for (group, group_outputs) in outputs.chunks_mut(GROUP).enumerate() {
            let first = group * GROUP;
            let count = group_outputs.len();
            let mut acc = [[_mm512_setzero_ps(); CHAINS]; GROUP];
            for p in 0..pairs {
                // Two blocks: lanes 0-7 sum the first block, lanes 8-15 the second.
                let weights = match self.kind {
                    // SAFETY: 64 bytes starting at 64·p lie within the row.
                    QuantKind::Q8 => unsafe {
                        _mm512_loadu_si512(packed.as_ptr().add(64 * p).cast())
                    },
                    // SAFETY: 32 bytes starting at 32·p lie within the row.
                    QuantKind::Q4 => unsafe { unpack_pair_avx512(packed.as_ptr().add(32 * p)) },
                };
                // SAFETY: the pair's two scales lie within the row's scales.
                let two =
                    unsafe { _mm_castpd_ps(_mm_load_sd(row_scales.as_ptr().add(2 * p).cast())) };
                let weight_scales = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(two));
                for (j, sums) in acc.iter_mut().enumerate().take(count) {
                    let sum = &mut sums[p % CHAINS];
                    let m = first + j;
                    // SAFETY: every index below lies within input m's codes (64 per pair),
                    // corrections (16 per pair) and pair scales (16 per pair).
                    let (x, start, x_scales) = unsafe {
                        (
                            _mm512_loadu_si512(
                                activations
                                    .codes
                                    .as_ptr()
                                    .add(m * self.cols + 64 * p)
                                    .cast(),
                            ),
                            _mm512_loadu_si512(
                                activations
                                    .lane_corrections
                                    .as_ptr()
                                    .add(m * self.cols / 4 + 16 * p)
                                    .cast(),
                            ),
                            _mm512_loadu_ps(
                                activations
                                    .pair_scales
                                    .as_ptr()
                                    .add(m * pairs * 16 + 16 * p),
                            ),
                        )
                    };
                    // Starting from the offset correction makes each lane the exact signed
                    // product of its four weights and codes.
                    let dot = _mm512_dpbusd_epi32(start, weights, x);
                    *sum = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(dot),
                        _mm512_mul_ps(weight_scales, x_scales),
                        *sum,
                    );
                }
            }
            for (j, output) in group_outputs.iter_mut().enumerate() {
                let m = first + j;
                let [a, b, c, d] = acc[j];
                let mut total =
                    _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
                if blocks % 2 == 1 {
                    // The last, unpaired block.
                    let b = blocks - 1;
                    let codes = match self.kind {
                        QuantKind::Q8 => packed[b * BLOCK..].to_vec(),
                        QuantKind::Q4 => {
                            unpack_row_nibbles(packed, self.cols)[b * BLOCK..].to_vec()
                        }
                    };
                    let x_codes =
                        &activations.codes[m * self.cols + b * BLOCK..(m + 1) * self.cols];
                    let raw: i32 = codes
                        .iter()
                        .zip(x_codes)
                        .map(|(&w, &x)| w as i32 * x as i32)
                        .sum();
                    let dot = raw - self.kind.offset() * activations.sums[m * blocks + b];
                    total += row_scales[b] * activations.scales[m * blocks + b] * dot as f32;
                }
                *output = total;
            }
        }
    }
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
        let mut codes = Vec::with_capacity(inputs * cols);
        let mut scales = Vec::with_capacity(inputs * blocks);
        let mut sums = Vec::with_capacity(inputs * blocks);
        let mut lane_corrections = Vec::with_capacity(inputs * cols / 4);
        for block in x.chunks(BLOCK) {
            let (scale, q) = quantize_block(block, 127.0);
            scales.push(scale);
            sums.push(q.iter().sum());
            lane_corrections.extend(q.chunks(4).map(|lane| -offset * lane.iter().sum::<i32>()));
            codes.extend(q.iter().map(|&c| c as i8));
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
        for (rows, cols, inputs) in [(70, 96, 1), (130, 256, 3), (64, 2560, 2)] {
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
                let mut portable = vec![0f32; inputs];
                let activations = QuantizedActivations::new(&x, inputs, cols, kind.offset());
                q.row_products_portable(0, &activations, &mut portable);
                for m in 0..inputs {
                    assert!(
                        (portable[m] - out[m * rows]).abs() < 1e-3,
                        "{kind:?}: portable and chosen kernels differ"
                    );
                }
            }
        }
    }

    #[test]
    fn unaligned_widths_are_refused() {
        assert!(QuantMatrix::quantize(QuantKind::Q8, &[0.0; 40], 1, 40).is_err());
    }
}
