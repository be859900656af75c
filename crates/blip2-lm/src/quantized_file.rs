//! Saving a quantized language model's layers to a safetensors file and reading them
//! back, so that a checkpoint is quantized once rather than at every start.
//!
//! Each quantized layer `NAME` (as [`LanguageModel::linears_mut`] names it) is stored as
//! two tensors: `NAME.scales` (`f32` `[rows, cols / 32]`, one scale per block) and
//! `NAME.codes` (`u8` `[rows, bytes per row]`). The file's metadata holds the format and
//! the code width. Layers that stayed dense are not in the file; they are read from the
//! checkpoint as usual.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;

use blip2_nn::kernels::quant::{BLOCK, QuantKind, QuantMatrix};
use candle_core::{Error, Result};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::{LanguageModel, QuantizationReport};

/// The `format` metadata value of these files.
pub const FORMAT: &str = "blip2-quantized-layers";

fn file_error(path: &Path, message: impl std::fmt::Display) -> Error {
    Error::Msg(format!("{}: {message}", path.display()))
}

/// Returns whether `path` is a file of quantized layers, judged from its safetensors
/// metadata (for tools that must not replace any other file).
pub fn is_quantized_file(path: &Path) -> bool {
    map_with_metadata(path).is_ok_and(|(_, metadata)| is_quantized_metadata(&metadata))
}

/// Maps the safetensors file `path` and reads its metadata.
fn map_with_metadata(path: &Path) -> Result<(memmap2::Mmap, HashMap<String, String>)> {
    let file =
        std::fs::File::open(path).map_err(|e| file_error(path, format!("cannot open: {e}")))?;
    // SAFETY: the file is mapped read-only; callers copy out what they keep.
    let mapped = unsafe { memmap2::Mmap::map(&file) }
        .map_err(|e| file_error(path, format!("cannot map: {e}")))?;
    let (_, header) = SafeTensors::read_metadata(&mapped)
        .map_err(|e| file_error(path, format!("not a safetensors file: {e}")))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    Ok((mapped, metadata))
}

fn is_quantized_metadata(metadata: &HashMap<String, String>) -> bool {
    metadata.get("format").map(String::as_str) == Some(FORMAT)
}

/// Writes the quantized layers of `model` to `path`; returns how many were written.
/// Fails when the model has no quantized layer.
pub fn save_quantized(model: &mut dyn LanguageModel, path: &Path) -> Result<usize> {
    let mut kind = None;
    let mut buffers = Vec::new();
    for (name, linear) in model.linears_mut() {
        let Some(matrix) = linear.quantized() else {
            continue;
        };
        let (layer_kind, rows, cols, scales, codes) = matrix.parts();
        kind = Some(layer_kind);
        let scale_bytes: Vec<u8> = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
        buffers.push((name, rows, cols, scale_bytes, codes));
    }
    let Some(kind) = kind else {
        return Err(file_error(path, "the model has no quantized layer to save"));
    };
    let mut views = Vec::with_capacity(buffers.len() * 2);
    for (name, rows, cols, scales, codes) in &buffers {
        let scales = TensorView::new(Dtype::F32, vec![*rows, cols / BLOCK], scales);
        let codes = TensorView::new(Dtype::U8, vec![*rows, codes.len() / rows], codes);
        views.push((
            format!("{name}.scales"),
            scales.map_err(|e| file_error(path, e))?,
        ));
        views.push((
            format!("{name}.codes"),
            codes.map_err(|e| file_error(path, e))?,
        ));
    }
    let metadata = HashMap::from([
        ("format".to_owned(), FORMAT.to_owned()),
        ("kind".to_owned(), kind.name().to_owned()),
    ]);
    safetensors::serialize_to_file(views, Some(metadata), path)
        .map_err(|e| file_error(path, format!("cannot write: {e}")))?;
    Ok(buffers.len())
}

/// Replaces the layers of `model` with the quantized ones saved in `path`. Every layer
/// that can be quantized must be in the file, and the file must contain no other layer,
/// so a file saved from another checkpoint is rejected.
pub fn load_quantized(model: &mut dyn LanguageModel, path: &Path) -> Result<QuantizationReport> {
    let (mapped, metadata) = map_with_metadata(path)?;
    if !is_quantized_metadata(&metadata) {
        return Err(file_error(
            path,
            format!(
                "not a file of quantized layers (its metadata lacks format = {FORMAT:?}); write one with `blip2 quantize`"
            ),
        ));
    }
    let kind = metadata
        .get("kind")
        .and_then(|name| QuantKind::from_name(name))
        .ok_or_else(|| {
            file_error(
                path,
                match metadata.get("kind") {
                    Some(kind) => format!(
                        "unknown kind \"{kind}\" in the metadata; expected \"q8\" or \"q4\""
                    ),
                    None => "the metadata has no kind; expected \"q8\" or \"q4\"".to_owned(),
                },
            )
        })?;

    let tensors = SafeTensors::deserialize(&mapped).map_err(|e| file_error(path, e))?;
    let mut unused: HashSet<String> = tensors.names().into_iter().map(str::to_owned).collect();
    let mut report = QuantizationReport::default();
    for (name, linear) in model.linears_mut() {
        report.bytes_before += linear.weight_bytes();
        let (rows, cols) = (linear.out_features(), linear.in_features());
        if !unused.remove(&format!("{name}.codes")) {
            if cols.is_multiple_of(BLOCK) {
                return Err(file_error(
                    path,
                    format!("layer {name} is missing; was the file saved from this checkpoint?"),
                ));
            }
            report.left_dense += 1;
            report.bytes_after += linear.weight_bytes();
            continue;
        }
        unused.remove(&format!("{name}.scales"));
        let scales = read_tensor(
            &tensors,
            path,
            &format!("{name}.scales"),
            Dtype::F32,
            &[rows, cols / BLOCK],
        )?;
        let row_bytes = cols / BLOCK * kind.block_bytes();
        let codes = read_tensor(
            &tensors,
            path,
            &format!("{name}.codes"),
            Dtype::U8,
            &[rows, row_bytes],
        )?;
        let scales: Vec<f32> = scales
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if let Some(bad) = scales.iter().find(|s| !s.is_finite()) {
            return Err(file_error(
                path,
                format!("tensor {name}.scales holds {bad}; scales must be finite numbers"),
            ));
        }
        let matrix = QuantMatrix::from_parts(kind, rows, cols, scales, codes.to_vec())
            .map_err(|e| file_error(path, format!("layer {name}: {e}")))?;
        linear
            .set_quantized(matrix)
            .map_err(|e| file_error(path, format!("layer {name}: {e}")))?;
        report.quantized += 1;
        report.bytes_after += linear.weight_bytes();
    }

    if let Some(extra) = unused.into_iter().collect::<BTreeSet<_>>().first() {
        return Err(file_error(
            path,
            format!(
                "holds {extra}, which this model does not have; was the file saved from this checkpoint?"
            ),
        ));
    }
    Ok(report)
}

/// Returns the bytes of tensor `name`, checked against the expected dtype and shape.
fn read_tensor<'a>(
    tensors: &'a SafeTensors<'a>,
    path: &Path,
    name: &str,
    dtype: Dtype,
    shape: &[usize],
) -> Result<&'a [u8]> {
    let view = tensors
        .tensor(name)
        .map_err(|_| file_error(path, format!("tensor {name} is missing")))?;
    if view.dtype() != dtype || view.shape() != shape {
        return Err(file_error(
            path,
            format!(
                "tensor {name} is {:?} {:?}; expected {dtype:?} {shape:?}",
                view.dtype(),
                view.shape()
            ),
        ));
    }
    Ok(view.data())
}
