//! Resizing the grid of patch position embeddings, for images of another size than
//! the checkpoint was trained on.
//!
//! This reproduces `torch.nn.functional.interpolate(mode="bicubic",
//! align_corners=False)` (PyTorch 2.x CPU kernel): cubic convolution with `A = -0.75`,
//! source coordinates `(dst + 0.5) * in / out - 0.5` computed in `f32`, neighbours
//! clamped at the borders, columns blended first and then rows.

const CUBIC_A: f32 = -0.75;

/// Weight of the neighbour at distance `x` in `[0, 1]`.
fn near_weight(x: f32) -> f32 {
    ((CUBIC_A + 2.0) * x - (CUBIC_A + 3.0)) * x * x + 1.0
}

/// Weight of the neighbour at distance `x` in `[1, 2]`.
fn far_weight(x: f32) -> f32 {
    ((CUBIC_A * x - 5.0 * CUBIC_A) * x + 8.0 * CUBIC_A) * x - 4.0 * CUBIC_A
}

/// The four source indices and weights that make output index `dst`.
fn taps(dst: usize, in_size: usize, out_size: usize) -> ([usize; 4], [f32; 4]) {
    let scale = in_size as f32 / out_size as f32;
    let real = scale * (dst as f32 + 0.5) - 0.5;
    let base = real.floor();
    let t = real - base;
    let base = base as i64;
    let last = in_size as i64 - 1;
    let index = |offset: i64| (base + offset).clamp(0, last) as usize;
    let indices = [index(-1), index(0), index(1), index(2)];
    let weights = [
        far_weight(t + 1.0),
        near_weight(t),
        near_weight(1.0 - t),
        far_weight(2.0 - t),
    ];
    (indices, weights)
}

/// Resizes a channel-last grid `[in_side, in_side, channels]` (row-major) to
/// `[out_height, out_width, channels]`.
pub fn resize_position_grid(
    grid: &[f32],
    in_side: usize,
    channels: usize,
    out_height: usize,
    out_width: usize,
) -> Vec<f32> {
    assert_eq!(
        grid.len(),
        in_side * in_side * channels,
        "grid length must be side² × channels"
    );
    let at = |y: usize, x: usize, c: usize| grid[(y * in_side + x) * channels + c];
    let mut out = vec![0f32; out_height * out_width * channels];
    for oy in 0..out_height {
        let (rows, row_weights) = taps(oy, in_side, out_height);
        for ox in 0..out_width {
            let (cols, col_weights) = taps(ox, in_side, out_width);
            for c in 0..channels {
                let mut value = 0f32;
                for (r, &row) in rows.iter().enumerate() {
                    let mut row_value = 0f32;
                    for (k, &col) in cols.iter().enumerate() {
                        row_value += at(row, col, c) * col_weights[k];
                    }
                    value += row_value * row_weights[r];
                }
                out[(oy * out_width + ox) * channels + c] = value;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_identity() {
        let grid: Vec<f32> = (0..2 * 2 * 3).map(|v| v as f32).collect();
        let resized = resize_position_grid(&grid, 2, 3, 2, 2);
        for (i, (a, b)) in resized.iter().zip(&grid).enumerate() {
            assert!((a - b).abs() < 1e-6, "index {i}: {a} vs {b}");
        }
    }

    #[test]
    fn weights_sum_to_one() {
        for dst in 0..7 {
            let (_, weights) = taps(dst, 4, 7);
            let sum: f32 = weights.iter().sum();
            assert!(
                (sum - 1.0).abs() < 1e-6,
                "output {dst}: weights sum to {sum}"
            );
        }
    }
}
