//! Intel AMX tile kernels for the packed bfloat16 and 8-bit products.
//!
//! AMX multiplies whole tiles. `tdpbf16ps` adds the product of a 16 × 32 bfloat16 tile
//! and a 32 × 16 one to a 16 × 16 tile of `f32` sums. `tdpbusd` does the same with
//! unsigned × signed bytes, 64 deep, into `i32` sums. A weight tile is 16 rows of 64
//! bytes, each row one column pair (or quad) of 16 output rows: exactly 16 consecutive
//! steps of a panel in [`super::packed_bf16`] and [`super::packed_i8`]. Activation tiles
//! come from a copy of the input rows in [`tile_order`].
//!
//! A kernel call computes 32 input rows against one task's two panels with all eight tile
//! registers: two activation tiles, two weight tiles and four tiles of sums, so each
//! loaded tile serves two products. The caller leaves the rows that do not fill 32 to the
//! AVX-512 kernels, and uses these only when the width is a multiple of one tile step.
//!
//! Rust has no stable AMX intrinsics, so the instructions are written in `asm!`. Linux
//! gives a process the tile registers only after it requests them (`arch_prctl`), once.

use rayon::prelude::*;

use super::packed_bf16::{PANEL, TASK_WIDTH};

/// Input rows one kernel call computes.
pub(crate) const ROWS: usize = 32;
/// Packed `u32` values per row of a tile: 16 column pairs (bf16) or quads (int8).
pub(crate) const STEP: usize = 16;

/// Returns whether the processor has AMX tiles with bf16 and int8 and the operating
/// system lets this process use them. The first call checks and requests them.
pub(crate) fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE, bit 25 AMX-INT8.
    let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
    let has_amx = edx & (1 << 22) != 0 && edx & (1 << 24) != 0 && edx & (1 << 25) != 0;
    if !has_amx || !super::cpu_features().avx512 {
        return false;
    }
    // Request the tile data state (feature 18). Without it, the first tile instruction
    // faults. Linux rejects the request when it cannot save the registers.
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with this request only changes the process's permissions.
    let status = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    if status != 0 {
        tracing::debug!("AMX tile registers not granted by the kernel; using AVX-512 instead");
    }
    status == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// Copies the rows of `rows` (`width` values each) that fill whole groups of [`ROWS`] into
/// tile order: group by group, step by step, the group's 32 rows of [`STEP`] values. Each
/// activation tile is then 1 KiB in one piece, which loads faster than 16 rows a row
/// stride apart. Returns an empty vector when `inputs` is under [`ROWS`].
pub(crate) fn tile_order(rows: &[u32], inputs: usize, width: usize) -> Vec<u32> {
    let groups = inputs / ROWS;
    let mut ordered = vec![0u32; groups * ROWS * width];
    ordered
        .par_chunks_mut((ROWS * width).max(1))
        .enumerate()
        .for_each(|(group, tiles)| {
            for (step, tile) in tiles.chunks_exact_mut(ROWS * STEP).enumerate() {
                for (row, values) in tile.chunks_exact_mut(STEP).enumerate() {
                    let start = (group * ROWS + row) * width + step * STEP;
                    values.copy_from_slice(&rows[start..start + STEP]);
                }
            }
        });
    ordered
}

/// Returns the rows in [`tile_order`] when a product `width` packed values wide (pairs or
/// quads) can use the AMX kernels (`simd`: its AVX-512 kernels can run too), else nothing.
pub(crate) fn rows_for_tiles(simd: bool, rows: &[u32], inputs: usize, width: usize) -> Vec<u32> {
    if simd && width.is_multiple_of(STEP) && available() {
        tile_order(rows, inputs, width)
    } else {
        Vec::new()
    }
}

/// The tile configuration: palette 1, all eight tiles 16 rows of 64 bytes.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
impl TileConfig {
    fn sixteen_by_sixty_four() -> Self {
        let mut bytes = [0u8; 64];
        bytes[0] = 1;
        for tile in 0..8 {
            // Bytes per row (16-bit, from byte 16), then rows (8-bit, from byte 48).
            bytes[16 + 2 * tile..18 + 2 * tile].copy_from_slice(&64u16.to_le_bytes());
            bytes[48 + tile] = 16;
        }
        Self(bytes)
    }
}

/// The tile product instruction of a kernel.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[derive(Clone, Copy)]
enum Product {
    /// `tdpbf16ps`: bfloat16 pairs into `f32`.
    Bf16,
    /// `tdpbusd`: unsigned activation bytes times signed weight bytes into `i32`.
    UnsignedSigned,
}

/// Multiplies 32 input rows (`width` packed values each, in [`tile_order`]) by `count`
/// (1 or 2) panels of bfloat16 weights. `out` receives [`TASK_WIDTH`] sums per row.
///
/// # Safety
/// [`available`] must have returned true and `width` must be a multiple of [`STEP`].
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub(crate) unsafe fn tile_bf16(
    weights: &[u32],
    count: usize,
    rows: &[u32],
    width: usize,
    out: &mut [f32],
) {
    // SAFETY: as the caller guarantees.
    unsafe { tiles(Product::Bf16, weights, count, rows, width, out) }
}

/// Multiplies 32 input rows of unsigned byte quads (in [`tile_order`]) by `count` panels
/// of signed byte quads. `out` receives [`TASK_WIDTH`] exact sums per row.
///
/// # Safety
/// [`available`] must have returned true and `width` must be a multiple of [`STEP`].
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub(crate) unsafe fn tile_i8(
    weights: &[u32],
    count: usize,
    rows: &[u32],
    width: usize,
    out: &mut [i32],
) {
    // SAFETY: as the caller guarantees.
    unsafe { tiles(Product::UnsignedSigned, weights, count, rows, width, out) }
}

/// Runs one kernel call with `product`, whose sums (`f32` or `i32`, four bytes each) go
/// to `out`. Tile registers: tmm0 and tmm1 hold input rows
/// 0-15 and 16-31, tmm2 and tmm3 the two panels' weights, tmm4-tmm7 the sums (rows 0-15
/// × panel 0, × panel 1, rows 16-31 × panel 0, × panel 1).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
unsafe fn tiles<S>(
    product: Product,
    weights: &[u32],
    count: usize,
    rows: &[u32],
    width: usize,
    out: &mut [S],
) {
    use std::arch::asm;
    assert_eq!(std::mem::size_of::<S>(), 4, "tile sums are four bytes");
    assert!(width.is_multiple_of(STEP));
    assert!(count == 1 || count == 2);
    assert!(weights.len() >= count * width * PANEL);
    assert!(rows.len() >= ROWS * width);
    assert!(out.len() >= ROWS * TASK_WIDTH);

    let first = weights.as_ptr();
    // With one panel the second product repeats it; those sums are never read.
    let second = if count == 2 {
        // SAFETY: the second panel starts `width · 16` values in, within `weights`.
        unsafe { first.add(width * PANEL) }
    } else {
        first
    };
    let config = TileConfig::sixteen_by_sixty_four();
    let out = out.as_mut_ptr();

    // SAFETY (all asm): the configuration is valid and the caller promises AMX is enabled.
    // Each load reads 16 rows of 64 bytes inside `rows` or a panel (k < width, checked
    // lengths above), and each store writes 16 rows of 64 bytes inside `out`.
    unsafe {
        asm!(
            "ldtilecfg [{config}]",
            "tilezero tmm4",
            "tilezero tmm5",
            "tilezero tmm6",
            "tilezero tmm7",
            config = in(reg) config.0.as_ptr(),
            options(nostack, readonly),
        );

        for k in (0..width).step_by(STEP) {
            let a0 = rows.as_ptr().add(k * ROWS);
            let a1 = a0.add(16 * STEP);
            let (b0, b1) = (first.add(k * PANEL), second.add(k * PANEL));
            // Each product follows the loads it needs, so it can start while the next
            // tiles load. This order measured about 7 % faster than four loads first.
            macro_rules! step {
                ($product:literal) => {
                    asm!(
                        "tileloadd tmm0, [{a0} + {sixty_four}]",
                        "tileloadd tmm2, [{b0} + {sixty_four}]",
                        concat!($product, " tmm4, tmm0, tmm2"),
                        "tileloadd tmm3, [{b1} + {sixty_four}]",
                        concat!($product, " tmm5, tmm0, tmm3"),
                        "tileloadd tmm1, [{a1} + {sixty_four}]",
                        concat!($product, " tmm6, tmm1, tmm2"),
                        concat!($product, " tmm7, tmm1, tmm3"),
                        a0 = in(reg) a0,
                        a1 = in(reg) a1,
                        b0 = in(reg) b0,
                        b1 = in(reg) b1,
                        sixty_four = in(reg) 64usize,
                        options(nostack, readonly),
                    )
                };
            }
            match product {
                Product::Bf16 => step!("tdpbf16ps"),
                Product::UnsignedSigned => step!("tdpbusd"),
            }
        }

        let out_stride = TASK_WIDTH * 4;
        asm!(
            "tilestored [{c00} + {stride}], tmm4",
            "tilestored [{c01} + {stride}], tmm5",
            "tilestored [{c10} + {stride}], tmm6",
            "tilestored [{c11} + {stride}], tmm7",
            "tilerelease",
            c00 = in(reg) out,
            c01 = in(reg) out.add(PANEL),
            c10 = in(reg) out.add(16 * TASK_WIDTH),
            c11 = in(reg) out.add(16 * TASK_WIDTH + PANEL),
            stride = in(reg) out_stride,
            options(nostack),
        );
    }
}
