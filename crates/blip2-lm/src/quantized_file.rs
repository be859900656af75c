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
    write_safetensors(views, Some(metadata), path)
        .map_err(|e| file_error(path, format!("cannot write: {e}")))?;
    Ok(buffers.len())
}

/// Writes `tensors` to the safetensors file `path`, replacing it atomically, with the
/// permissions any newly created file there gets (on Unix, 0o666 less the umask).
///
/// [`safetensors::serialize_to_file`] alone leaves the file accessible to its owner only,
/// because it writes a temporary file, created with mode 0o600, and renames it to `path`.
pub fn write_safetensors<S, V, I>(
    tensors: I,
    metadata: Option<HashMap<String, String>>,
    path: &Path,
) -> std::result::Result<(), safetensors::SafeTensorError>
where
    S: AsRef<str> + Ord + std::fmt::Display,
    V: safetensors::View,
    I: IntoIterator<Item = (S, V)>,
{
    safetensors::serialize_to_file(tensors, metadata, path)?;
    // The file is complete at this point, so permissions that cannot be set are a warning,
    // not a failed write.
    #[cfg(unix)]
    if let Err(error) = set_new_file_permissions(path) {
        tracing::warn!(path = %path.display(), %error, "cannot give the file the usual permissions; it stays readable by its owner only");
    }
    Ok(())
}

/// Gives `path` the permissions of a file newly created next to it. A probe file is
/// created and removed to learn them, because the umask cannot be read without changing
/// it for every thread, and the directory's default ACL may apply instead.
#[cfg(unix)]
fn set_new_file_permissions(path: &Path) -> std::io::Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let probe = path.with_file_name(format!(".{name}.{}.permissions", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)?;
    let permissions = file.metadata().map(|metadata| metadata.permissions());
    drop(file);
    std::fs::remove_file(&probe)?;
    std::fs::set_permissions(path, permissions?)
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
        let in_file = unused.remove(&format!("{name}.codes"));
        if in_file {
            unused.remove(&format!("{name}.scales"));
        }
        match (in_file, cols.is_multiple_of(BLOCK)) {
            (true, true) => {}
            (false, false) => {
                report.left_dense += 1;
                report.bytes_after += linear.weight_bytes();
                continue;
            }
            (false, true) => {
                return Err(other_checkpoint(
                    path,
                    kind,
                    format!("it has no layer {name}, which this checkpoint quantizes"),
                ));
            }
            (true, false) => {
                return Err(other_checkpoint(
                    path,
                    kind,
                    format!(
                        "it has layer {name}, which this checkpoint keeps unquantized (its input \
                         width {cols} is not a multiple of {BLOCK})"
                    ),
                ));
            }
        }
        let scales = read_tensor(
            &tensors,
            path,
            kind,
            &format!("{name}.scales"),
            Dtype::F32,
            &[rows, cols / BLOCK],
        )?;
        let row_bytes = cols / BLOCK * kind.block_bytes();
        let codes = read_tensor(
            &tensors,
            path,
            kind,
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
        return Err(other_checkpoint(
            path,
            kind,
            format!("it has tensor {extra}, which belongs to no layer of this checkpoint"),
        ));
    }
    Ok(report)
}

/// Returns the error for a file whose layers do not match the model's. `mismatch`
/// describes the difference, and the message gives the command that makes a file that fits.
fn other_checkpoint(path: &Path, kind: QuantKind, mismatch: String) -> Error {
    file_error(
        path,
        format!(
            "this file of quantized layers was made from a different checkpoint: {mismatch}. \
             Make one from this checkpoint with `blip2 quantize --model CHECKPOINT --kind {} -o \
             {}`",
            kind.name(),
            path.display()
        ),
    )
}

/// Returns the bytes of tensor `name`, checked against the expected dtype and shape. A
/// wrong shape means the file was made from another checkpoint.
fn read_tensor<'a>(
    tensors: &'a SafeTensors<'a>,
    path: &Path,
    kind: QuantKind,
    name: &str,
    dtype: Dtype,
    shape: &[usize],
) -> Result<&'a [u8]> {
    let view = tensors
        .tensor(name)
        .map_err(|_| file_error(path, format!("tensor {name} is missing")))?;
    if view.dtype() != dtype {
        return Err(file_error(
            path,
            format!("tensor {name} is {:?}; expected {dtype:?}", view.dtype()),
        ));
    }
    if view.shape() != shape {
        return Err(other_checkpoint(
            path,
            kind,
            format!(
                "tensor {name} has shape {:?}, but this checkpoint expects {shape:?}",
                view.shape()
            ),
        ));
    }
    Ok(view.data())
}
