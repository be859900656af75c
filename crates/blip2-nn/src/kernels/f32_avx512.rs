//! `out = x · wᵀ` in float32 for many input rows, on AVX-512.
//!
//! The layout is the classic blocked one. Each task owns a few panels of 32 output
//! columns. For one slice of `DEPTH` inputs at a time (fewer with few rows) it copies
//! those weight rows transposed (`[depth][32]`), with 16 × 16 in-register transposes. The
//! copy is read from the first-level cache while every input row goes past it, at most
//! `TILE_ROWS` rows at a time: each input value is broadcast and multiplied into two
//! vectors of 16 outputs. The input rows are interleaved once per product so that a
//! tile's values for one step sit side by side. The weights stay where they are
//! (memory-mapped), and each weight value is copied once per product.

use std::arch::x86_64::*;

use rayon::prelude::*;

/// Output columns of one register tile: two vectors.
const PANEL: usize = 32;
/// Inputs summed per pass over a panel. The transposed panel (32 KiB) stays in the
/// first-level cache while every input row goes past it.
const DEPTH: usize = 256;
/// The depth for products with at most `SHALLOW_ROWS` input rows (a prompt's tokens).
/// With 33 rows of OPT-2.7B's shapes, slices half as deep ran 4–20 % faster. With 64 to
/// 128 rows they ran as fast or a little faster, and with the vision encoder's 257 rows a
/// few per cent slower.
const SHALLOW_DEPTH: usize = 128;
/// The most input rows that take `SHALLOW_DEPTH`.
const SHALLOW_ROWS: usize = 128;
/// Input rows of the largest register tile: 12 rows × 2 vectors of sums. Tiles have 1
/// to this many rows.
const TILE_ROWS: usize = 12;
// `multiply_panel` has one match arm per tile size, written out up to 12.
const _: () = assert!(TILE_ROWS == 12);
/// Panels per parallel task.
const TASK_PANELS: usize = 2;

/// The output, written by tasks that own disjoint columns.
#[derive(Clone, Copy)]
struct Output(*mut f32);
// SAFETY: every task writes only its own columns, and the caller waits for all tasks.
unsafe impl Send for Output {}
unsafe impl Sync for Output {}

/// Writes `out = x · wᵀ + bias`, with `w` `[n_out, k]`, `x` `[rows, k]`, `out`
/// `[rows, n_out]`, all row-major, and `bias` `[n_out]` (none counts as zeros). The sums
/// start from the bias, so `out` is neither cleared first nor read again to add it.
///
/// # Safety
/// The processor must have AVX-512 F.
pub(super) unsafe fn gemm(
    w: &[f32],
    x: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    rows: usize,
    n_out: usize,
    k: usize,
) {
    assert_eq!(w.len(), n_out * k, "weights must be n_out × k");
    assert_eq!(x.len(), rows * k, "inputs must be rows × k");
    assert_eq!(out.len(), rows * n_out, "outputs must be rows × n_out");
    if let Some(bias) = bias {
        assert_eq!(bias.len(), n_out, "the bias must have n_out values");
    }
    let output = Output(out.as_mut_ptr());
    let tiles = row_tiles(rows);
    let depth = if rows <= SHALLOW_ROWS {
        SHALLOW_DEPTH
    } else {
        DEPTH
    };
    // SAFETY: the processor has AVX-512 F (the caller's promise).
    let x = &unsafe { interleave_rows(x, k, &tiles) };
    let task_columns = PANEL * TASK_PANELS;
    (0..n_out.div_ceil(task_columns))
        .into_par_iter()
        .for_each_init(
            || vec![0f32; depth * PANEL],
            |panel, task| {
                let first = task * task_columns;
                let last = (first + task_columns).min(n_out);
                let blocks: Vec<Block> = (0..k)
                    .step_by(depth)
                    .flat_map(|start| {
                        (first..last).step_by(PANEL).map(move |n0| Block {
                            n0,
                            width: PANEL.min(last - n0),
                            start,
                            depth: depth.min(k - start),
                        })
                    })
                    .collect();
                for (i, block) in blocks.iter().enumerate() {
                    // SAFETY: AVX-512 F is present (the caller's promise). The block lies
                    // within `w`, and the task owns its columns of `out`.
                    unsafe {
                        transpose_panel(
                            &w[block.n0 * k..(block.n0 + block.width) * k],
                            k,
                            block,
                            panel,
                        );
                        let start = match block.start {
                            0 => Start::Bias(bias.map(|b| b[block.n0..].as_ptr())),
                            _ => Start::Output,
                        };
                        multiply_panel(
                            x,
                            k,
                            &tiles,
                            panel,
                            block,
                            start,
                            output,
                            n_out,
                            w,
                            blocks.get(i + 1),
                        );
                    }
                }
            },
        );
}

/// The starting values of a tile's sums.
#[derive(Clone, Copy)]
enum Start {
    /// The sums of the earlier depth slices, in the output.
    Output,
    /// The bias from the block's first column on (or zeros), for the first depth slice.
    Bias(Option<*const f32>),
}

/// The part of the product one transposed panel covers: `width` output columns from
/// `n0` and `depth` inputs from `start`.
struct Block {
    n0: usize,
    width: usize,
    start: usize,
    depth: usize,
}

/// Writes `panel[i][j] = w[j][start + i]` for `i < depth`, `j < 32`, with zeros for
/// the rows `w` lacks (`w` contains `rows ≤ 32` rows of `k` values).
#[target_feature(enable = "avx512f")]
unsafe fn transpose_panel(w: &[f32], k: usize, block: &Block, panel: &mut [f32]) {
    let (start, depth) = (block.start, block.depth);
    let rows = w.len() / k;
    let whole = depth / 16 * 16;
    for half in 0..2 {
        let first_row = half * 16;
        if rows >= first_row + 16 {
            for i in (0..whole).step_by(16) {
                // SAFETY: 16 rows from first_row exist, and start + i + 16 <= k.
                let block: [__m512; 16] = std::array::from_fn(|j| unsafe {
                    _mm512_loadu_ps(w.as_ptr().add((first_row + j) * k + start + i))
                });
                let columns = transpose16(block);
                for (c, column) in columns.into_iter().enumerate() {
                    // SAFETY: (i + c) * 32 + first_row + 16 <= depth * 32 <= panel.len().
                    unsafe {
                        _mm512_storeu_ps(
                            panel.as_mut_ptr().add((i + c) * PANEL + first_row),
                            column,
                        )
                    };
                }
            }
        }
        let done = if rows >= first_row + 16 { whole } else { 0 };
        for i in done..depth {
            for j in first_row..first_row + 16 {
                panel[i * PANEL + j] = if j < rows { w[j * k + start + i] } else { 0.0 };
            }
        }
    }
}

/// Transposes 16 rows of 16 values: interleaves pairs of values, then pairs of pairs,
/// then 128-bit lanes twice.
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    let t: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    // u[4g + e] holds, in each 128-bit lane l, element 4l + e of rows 4g..4g + 4.
    let u: [__m512; 16] = std::array::from_fn(|i| {
        let (g, e) = (i / 4, i % 4);
        let lo = _mm512_castps_pd(t[4 * g + e / 2]);
        let hi = _mm512_castps_pd(t[4 * g + e / 2 + 2]);
        _mm512_castpd_ps(if e % 2 == 0 {
            _mm512_unpacklo_pd(lo, hi)
        } else {
            _mm512_unpackhi_pd(lo, hi)
        })
    });
    let mut out = [_mm512_setzero_ps(); 16];
    for e in 0..4 {
        let v_even = _mm512_shuffle_f32x4::<0x88>(u[e], u[4 + e]);
        let v_odd = _mm512_shuffle_f32x4::<0xdd>(u[e], u[4 + e]);
        let w_even = _mm512_shuffle_f32x4::<0x88>(u[8 + e], u[12 + e]);
        let w_odd = _mm512_shuffle_f32x4::<0xdd>(u[8 + e], u[12 + e]);
        out[e] = _mm512_shuffle_f32x4::<0x88>(v_even, w_even);
        out[8 + e] = _mm512_shuffle_f32x4::<0xdd>(v_even, w_even);
        out[4 + e] = _mm512_shuffle_f32x4::<0x88>(v_odd, w_odd);
        out[12 + e] = _mm512_shuffle_f32x4::<0xdd>(v_odd, w_odd);
    }
    out
}

/// Adds the products of every input row with one transposed panel to its block's output
/// columns. Meanwhile it prefetches the `next` block's weights, spread over the row tiles.
/// Each block reads short pieces of many weight rows, which the hardware prefetchers do
/// not see coming, so without this the next transpose would wait on memory.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn multiply_panel(
    x: &[f32],
    k: usize,
    tiles: &[usize],
    panel: &[f32],
    block: &Block,
    start: Start,
    output: Output,
    n_out: usize,
    w: &[f32],
    next: Option<&Block>,
) {
    let masks = [
        lane_mask(block.width),
        lane_mask(block.width.saturating_sub(16)),
    ];
    let mut m = 0;
    for (t, &tile) in tiles.iter().enumerate() {
        if let Some(next) = next {
            let (from, to) = (
                t * next.width / tiles.len(),
                (t + 1) * next.width / tiles.len(),
            );
            for row in next.n0 + from..next.n0 + to {
                for offset in (0..next.depth).step_by(16) {
                    let at = w[row * k + next.start + offset..].as_ptr();
                    _mm_prefetch::<_MM_HINT_T1>(at.cast());
                }
            }
        }
        // SAFETY: rows m..m + tile of `x` (interleaved) and of `out` exist. The block's
        // columns of `out` belong to this task.
        let x_rows = unsafe { x.as_ptr().add(m * k + block.start * tile) };
        let out_rows = unsafe { output.0.add(m * n_out + block.n0) };
        let depth = block.depth;
        unsafe {
            match tile {
                TILE_ROWS => {
                    tile_rows::<TILE_ROWS>(x_rows, panel, depth, start, out_rows, n_out, masks)
                }
                11 => tile_rows::<11>(x_rows, panel, depth, start, out_rows, n_out, masks),
                10 => tile_rows::<10>(x_rows, panel, depth, start, out_rows, n_out, masks),
                9 => tile_rows::<9>(x_rows, panel, depth, start, out_rows, n_out, masks),
                8 => tile_rows::<8>(x_rows, panel, depth, start, out_rows, n_out, masks),
                7 => tile_rows::<7>(x_rows, panel, depth, start, out_rows, n_out, masks),
                6 => tile_rows::<6>(x_rows, panel, depth, start, out_rows, n_out, masks),
                5 => tile_rows::<5>(x_rows, panel, depth, start, out_rows, n_out, masks),
                4 => tile_rows::<4>(x_rows, panel, depth, start, out_rows, n_out, masks),
                3 => tile_rows::<3>(x_rows, panel, depth, start, out_rows, n_out, masks),
                2 => tile_rows::<2>(x_rows, panel, depth, start, out_rows, n_out, masks),
                _ => tile_rows::<1>(x_rows, panel, depth, start, out_rows, n_out, masks),
            }
        }
        m += tile;
    }
}

/// Copies the input rows of each tile of `R` rows interleaved, `[k][R]`, at the tile's
/// first row × `k`, so that a tile's inputs for one step are `R` adjacent values.
///
/// # Safety
/// The processor must have AVX-512 F.
unsafe fn interleave_rows(x: &[f32], k: usize, tiles: &[usize]) -> Vec<f32> {
    let mut interleaved = vec![0f32; x.len()];
    let mut pieces = Vec::with_capacity(tiles.len());
    let mut rest = interleaved.as_mut_slice();
    let mut first_row = 0;
    for &tile in tiles {
        let (piece, tail) = rest.split_at_mut(tile * k);
        pieces.push((&x[first_row * k..(first_row + tile) * k], piece));
        rest = tail;
        first_row += tile;
    }
    pieces.into_par_iter().for_each(|(rows, piece)| {
        // SAFETY: the caller promised AVX-512 F.
        unsafe { interleave_tile(rows, k, piece) }
    });
    interleaved
}

/// Writes `piece[i * tile + r] = rows[r * k + i]` for the `tile ≤ 16` rows of `k` values
/// in `rows`: 16 steps at a time as one in-register transpose, with the rows past `tile`
/// left out.
#[target_feature(enable = "avx512f")]
unsafe fn interleave_tile(rows: &[f32], k: usize, piece: &mut [f32]) {
    let tile = rows.len() / k;
    let mask = lane_mask(tile);
    let whole = k / 16 * 16;
    for i in (0..whole).step_by(16) {
        let block: [__m512; 16] = std::array::from_fn(|r| {
            if r < tile {
                // SAFETY: row r exists and i + 16 <= k.
                unsafe { _mm512_loadu_ps(rows.as_ptr().add(r * k + i)) }
            } else {
                _mm512_setzero_ps()
            }
        });
        for (c, column) in transpose16(block).into_iter().enumerate() {
            // SAFETY: the first `tile` lanes land at (i + c) * tile.., within the piece.
            unsafe { _mm512_mask_storeu_ps(piece.as_mut_ptr().add((i + c) * tile), mask, column) };
        }
    }
    for r in 0..tile {
        for i in whole..k {
            piece[i * tile + r] = rows[r * k + i];
        }
    }
}

/// Splits `rows` into the fewest tiles of at most `TILE_ROWS` rows, with sizes that differ
/// by at most one. A tile of a few rows waits on its own additions rather than on the
/// multipliers, so even sizes beat a small last tile.
fn row_tiles(rows: usize) -> Vec<usize> {
    let count = rows.div_ceil(TILE_ROWS);
    (0..count)
        .map(|i| (i + 1) * rows / count - i * rows / count)
        .collect()
}

/// Returns the mask of the first `width` of 16 lanes (all of them for 16 or more).
fn lane_mask(width: usize) -> __mmask16 {
    if width >= 16 {
        u16::MAX
    } else {
        (1u16 << width) - 1
    }
}

/// Multiplies `R` input rows (interleaved, `[depth][R]`) by one panel of `depth` × 32,
/// starting from `start`, and stores the sums in `R` output rows (`out_stride` apart)
/// under `masks`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn tile_rows<const R: usize>(
    x: *const f32,
    panel: &[f32],
    depth: usize,
    start: Start,
    out: *mut f32,
    out_stride: usize,
    masks: [__mmask16; 2],
) {
    // SAFETY: the masked lanes are within the task's columns of each row, and within
    // the bias.
    let mut sums: [[__m512; 2]; R] = std::array::from_fn(|r| {
        std::array::from_fn(|half| unsafe {
            match start {
                Start::Output => {
                    _mm512_maskz_loadu_ps(masks[half], out.add(r * out_stride + 16 * half))
                }
                Start::Bias(Some(bias)) => _mm512_maskz_loadu_ps(masks[half], bias.add(16 * half)),
                Start::Bias(None) => _mm512_setzero_ps(),
            }
        })
    });
    for i in 0..depth {
        // SAFETY: i < depth and the panel contains depth × 32 values.
        let b0 = unsafe { _mm512_loadu_ps(panel.as_ptr().add(i * PANEL)) };
        let b1 = unsafe { _mm512_loadu_ps(panel.as_ptr().add(i * PANEL + 16)) };
        for (r, row_sums) in sums.iter_mut().enumerate() {
            // SAFETY: the caller gives R rows of at least depth values.
            let a = _mm512_set1_ps(unsafe { *x.add(i * R + r) });
            row_sums[0] = _mm512_fmadd_ps(a, b0, row_sums[0]);
            row_sums[1] = _mm512_fmadd_ps(a, b1, row_sums[1]);
        }
    }
    for (r, row_sums) in sums.iter().enumerate() {
        for (half, (&sum, &mask)) in row_sums.iter().zip(&masks).enumerate() {
            // SAFETY: the masked lanes are within the task's columns of row r.
            unsafe { _mm512_mask_storeu_ps(out.add(r * out_stride + 16 * half), mask, sum) };
        }
    }
}
