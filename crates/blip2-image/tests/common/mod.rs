//! Fixture access and comparisons shared by the integration tests.
//!
//! The fixtures come from `scripts/fixture_images.py`, which records Pillow 13.0 and
//! transformers 5.23 outputs.

#![allow(dead_code)]

use std::path::PathBuf;

use safetensors::{Dtype, SafeTensors};

/// `tests/fixtures/images` at the workspace root.
pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/images")
}

/// `images/` (the full-size photos) at the workspace root.
pub fn photo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../images")
}

pub fn manifest() -> serde_json::Value {
    let path = fixture_dir().join("manifest.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("invalid JSON in {}: {e}", path.display()))
}

/// One safetensors fixture file, read into memory.
pub struct Tensors {
    name: String,
    bytes: Vec<u8>,
}

/// A reference tensor: its shape and its values.
pub struct Reference<T> {
    pub shape: Vec<usize>,
    pub values: Vec<T>,
}

impl Tensors {
    pub fn open(file_name: &str) -> Self {
        let path = fixture_dir().join(file_name);
        let bytes =
            std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        Tensors {
            name: file_name.to_string(),
            bytes,
        }
    }

    fn view(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes)
            .unwrap_or_else(|e| panic!("invalid safetensors {}: {e}", self.name))
    }

    pub fn u8(&self, key: &str) -> Reference<u8> {
        let view = self.view();
        let tensor = view
            .tensor(key)
            .unwrap_or_else(|e| panic!("{}: no tensor {key}: {e}", self.name));
        assert_eq!(
            tensor.dtype(),
            Dtype::U8,
            "{}: tensor {key} is not uint8",
            self.name
        );
        Reference {
            shape: tensor.shape().to_vec(),
            values: tensor.data().to_vec(),
        }
    }

    pub fn f32(&self, key: &str) -> Reference<f32> {
        let view = self.view();
        let tensor = view
            .tensor(key)
            .unwrap_or_else(|e| panic!("{}: no tensor {key}: {e}", self.name));
        assert_eq!(
            tensor.dtype(),
            Dtype::F32,
            "{}: tensor {key} is not float32",
            self.name
        );
        let values = tensor
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Reference {
            shape: tensor.shape().to_vec(),
            values,
        }
    }
}

/// Row-major multi-index of flat position `flat` in `shape`.
pub fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (axis, &size) in shape.iter().enumerate().rev() {
        index[axis] = flat % size;
        flat /= size;
    }
    index
}

/// Asserts that an RGB image equals a uint8 reference of shape `[H, W, 3]`, showing the
/// number of differing values, the largest difference, and both values at its index.
pub fn assert_rgb_equal(
    what: &str,
    width: u32,
    height: u32,
    actual: &[u8],
    expected: &Reference<u8>,
) {
    let actual_shape = vec![height as usize, width as usize, 3];
    assert_eq!(
        actual_shape, expected.shape,
        "{what}: shape [H, W, C] differs from Pillow's"
    );

    let mut worst: Option<(usize, u8)> = None;
    let mut differing = 0;
    for (index, (&a, &e)) in actual.iter().zip(&expected.values).enumerate() {
        let difference = a.abs_diff(e);
        if difference > 0 {
            differing += 1;
            if worst.is_none_or(|(_, d)| difference > d) {
                worst = Some((index, difference));
            }
        }
    }
    if let Some((index, difference)) = worst {
        panic!(
            "{what}: {differing} of {} values differ from Pillow's; largest difference {difference} at \
             [y, x, c] = {:?}: got {}, Pillow {}",
            actual.len(),
            unravel(index, &expected.shape),
            actual[index],
            expected.values[index]
        );
    }
}

/// Returns the largest absolute difference between `actual` and the float32 reference,
/// asserting first that it is within `tolerance`.
pub fn assert_f32_close(
    what: &str,
    actual_shape: &[usize],
    actual: &[f32],
    expected: &Reference<f32>,
    tolerance: f32,
) -> f32 {
    assert_eq!(
        actual_shape,
        expected.shape.as_slice(),
        "{what}: shape differs from the reference"
    );
    let (index, difference) = actual
        .iter()
        .zip(&expected.values)
        .map(|(a, e)| (a - e).abs())
        .enumerate()
        .fold((0, 0f32), |worst, (index, d)| {
            if d > worst.1 || d.is_nan() {
                (index, d)
            } else {
                worst
            }
        });
    assert!(
        difference <= tolerance,
        "{what}: largest difference {difference:e} (tolerance {tolerance:e}) at [c, y, x] = {:?}: got {}, reference {}",
        unravel(index, &expected.shape),
        actual[index],
        expected.values[index]
    );
    difference
}
