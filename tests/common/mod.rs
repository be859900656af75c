//! Helpers shared by the integration tests: fixture paths, reference files and
//! tensor comparisons that report the worst element.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixtures() -> PathBuf {
    repo_root().join("tests").join("fixtures")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

pub fn photo(name: &str) -> PathBuf {
    repo_root().join("images").join(name)
}

/// The tensors transformers produced for a fixture model.
pub fn reference_tensors(name: &str) -> HashMap<String, Tensor> {
    let path = fixtures()
        .join("reference")
        .join(format!("{name}.safetensors"));
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// One recorded `generate` call.
#[derive(Debug, Deserialize)]
pub struct GenerationCase {
    pub name: String,
    pub images: Vec<usize>,
    pub prompts: Vec<String>,
    pub settings: serde_json::Map<String, serde_json::Value>,
    pub prompt_ids: Vec<Vec<u32>>,
    pub tokens: Vec<Vec<Vec<u32>>>,
    pub texts: Vec<Vec<String>>,
    pub scores: Option<Vec<Vec<f32>>>,
}

/// Warper settings of a recorded sampling distribution.
#[derive(Debug, Deserialize)]
pub struct SamplingSettings {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
}

/// transformers' next-token distribution after its sampling warpers.
#[derive(Debug, Deserialize)]
pub struct SamplingCase {
    pub settings: SamplingSettings,
    pub probabilities: HashMap<String, f32>,
}

/// The JSON half of a fixture model's reference.
#[derive(Debug, Deserialize)]
pub struct Reference {
    pub photos: Vec<String>,
    pub image_token_id: u32,
    pub eos_token_ids: Vec<u32>,
    pub logits_prompts: Vec<String>,
    pub cases: Vec<GenerationCase>,
    pub sampling: Vec<SamplingCase>,
}

pub fn reference(name: &str) -> Reference {
    let path = fixtures().join("reference").join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("invalid {}: {e}", path.display()))
}

/// Largest absolute difference between two tensors of the same shape, with the
/// multi-dimensional index where it occurs and both values there.
pub fn max_difference(actual: &Tensor, expected: &Tensor) -> (f32, Vec<usize>, f32, f32) {
    assert_eq!(actual.dims(), expected.dims(), "shapes differ");
    let a = actual
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let e = expected
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut worst = (0f32, 0usize);
    for (i, (x, y)) in a.iter().zip(&e).enumerate() {
        let d = if x.is_nan() || y.is_nan() {
            f32::INFINITY
        } else {
            (x - y).abs()
        };
        if d > worst.0 {
            worst = (d, i);
        }
    }
    let mut index = Vec::new();
    let mut rest = worst.1;
    for &dim in actual.dims().iter().rev() {
        index.push(rest % dim);
        rest /= dim;
    }
    index.reverse();
    (
        worst.0,
        index,
        a.get(worst.1).copied().unwrap_or(0.0),
        e.get(worst.1).copied().unwrap_or(0.0),
    )
}

/// Panics with the worst element when `actual` and `expected` differ by more than `tolerance`.
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, tolerance: f32) {
    let (difference, index, a, e) = max_difference(actual, expected);
    assert!(
        difference <= tolerance,
        "{what}: max |difference| {difference:.3e} > {tolerance:.0e} at {index:?} (actual {a}, expected {e})"
    );
}
