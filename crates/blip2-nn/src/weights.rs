//! Checkpoint weights as the layers load them.
//!
//! Small tensors (norms, biases, embeddings) come from candle's [`VarBuilder`] and are
//! copied into memory in the requested dtype. The float32 weight matrices of the fully
//! connected layers, which are nearly all of a checkpoint's bytes, are used in place
//! from the memory-mapped safetensors files when the model runs in `f32`: loading reads
//! nothing, and pages are brought in by the first product that needs them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Result, Shape, Tensor};
use candle_nn::{Embedding, VarBuilder};
use memmap2::Mmap;

/// Where one tensor's bytes are in the mapped files.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    offset: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
}

/// Memory-mapped safetensors files and the position of every tensor in them.
#[derive(Debug)]
pub struct MappedTensors {
    files: Vec<Arc<Mmap>>,
    entries: HashMap<String, Entry>,
}

impl MappedTensors {
    /// Maps `paths` read-only and indexes their tensors.
    ///
    /// # Safety
    ///
    /// The files must not be modified while mapped: the weights are read in place.
    pub unsafe fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut entries = HashMap::new();
        for (index, path) in paths.iter().enumerate() {
            let file = std::fs::File::open(path).map_err(|e| io_error(path, e))?;
            // SAFETY: the caller promises the file is not modified while mapped.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| io_error(path, e))?;
            let tensors = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| {
                candle_core::Error::Msg(format!("cannot read {}: {e}", path.display()))
            })?;
            for (name, view) in tensors.tensors() {
                let offset = view.data().as_ptr() as usize - mmap.as_ptr() as usize;
                entries.insert(
                    name,
                    Entry {
                        file: index,
                        offset,
                        dtype: view.dtype(),
                        shape: view.shape().to_vec(),
                    },
                );
            }
            files.push(Arc::new(mmap));
        }
        Ok(Self { files, entries })
    }

    /// Drops the pages of every tensor whose name starts with `prefix` from this
    /// process's memory; they stay in the operating system's file cache and are read
    /// back (as minor page faults) when next used. Lowers peak memory when stages run
    /// one after another. Unix only; elsewhere it does nothing.
    pub fn release(&self, prefix: &str) {
        for entry in self
            .entries
            .iter()
            .filter(|(name, _)| name.starts_with(prefix))
            .map(|(_, e)| e)
        {
            let bytes = (entry.shape.iter().product::<usize>() * entry.dtype.bitsize()).div_ceil(8);
            release_range(&self.files[entry.file], entry.offset, bytes);
        }
    }

    /// The float32 matrix `name` of shape `[rows, cols]`, in place, when the file stores
    /// it as aligned little-endian float32 of that shape.
    fn f32_matrix(&self, name: &str, rows: usize, cols: usize) -> Option<MappedMatrix> {
        let entry = self.entries.get(name)?;
        if entry.dtype != safetensors::Dtype::F32
            || entry.shape != [rows, cols]
            || !cfg!(target_endian = "little")
        {
            return None;
        }
        let file = self.files[entry.file].clone();
        let address = file.as_ptr() as usize + entry.offset;
        if !address.is_multiple_of(std::mem::align_of::<f32>())
            || entry.offset + rows * cols * 4 > file.len()
        {
            return None;
        }
        Some(MappedMatrix {
            file,
            offset: entry.offset,
            rows,
            cols,
        })
    }
}

/// Drops the pages covering `offset..offset + bytes` of a read-only mapping; they are
/// read back from the file cache when next used. Unix only; elsewhere it does nothing.
fn release_range(file: &Mmap, offset: usize, bytes: usize) {
    #[cfg(unix)]
    {
        let page = 4096;
        let start = offset / page * page;
        let end = (offset + bytes).div_ceil(page) * page;
        let end = end.min(file.len());
        // SAFETY: the mapping is read-only, so dropping its pages loses nothing: the next
        // read brings the file's contents back.
        let result = unsafe {
            file.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
        };
        if let Err(error) = result {
            tracing::debug!(%error, "the operating system did not drop weight pages");
        }
    }
    #[cfg(not(unix))]
    let _ = (file, offset, bytes);
}

fn io_error(path: &Path, error: std::io::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("cannot map {}: {error}", path.display()))
}

/// A float32 `[rows, cols]` matrix read in place from a mapped file.
#[derive(Debug, Clone)]
pub struct MappedMatrix {
    file: Arc<Mmap>,
    offset: usize,
    rows: usize,
    cols: usize,
}

impl MappedMatrix {
    /// The values, row-major.
    pub fn values(&self) -> &[f32] {
        let bytes = &self.file[self.offset..self.offset + self.rows * self.cols * 4];
        // SAFETY: the construction checked the alignment, the length and the dtype, and
        // any bit pattern is a valid f32.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), self.rows * self.cols) }
    }

    /// `[rows, cols]`.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Drops this matrix's pages from the process's memory (see [`MappedTensors::release`]).
    pub fn release(&self) {
        release_range(&self.file, self.offset, self.rows * self.cols * 4);
    }
}

/// The weights under one prefix of a checkpoint.
#[derive(Clone)]
pub struct Weights {
    vb: VarBuilder<'static>,
    mapped: Option<Arc<MappedTensors>>,
    /// Fully connected layers read float32 in place whatever the dtype.
    matrices_in_place: bool,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("prefix", &self.vb.prefix())
            .field("dtype", &self.vb.dtype())
            .finish()
    }
}

impl Weights {
    /// Weights read through `vb`, with float32 matrices used in place from `mapped`.
    pub fn new(vb: VarBuilder<'static>, mapped: Option<Arc<MappedTensors>>) -> Self {
        Self {
            vb,
            mapped,
            matrices_in_place: false,
        }
    }

    /// Weights read through `vb` only (every tensor copied).
    pub fn from_var_builder(vb: VarBuilder<'static>) -> Self {
        Self {
            vb,
            mapped: None,
            matrices_in_place: false,
        }
    }

    /// Returns the same weights, with fully connected layers and token embeddings
    /// reading the file's float32 values in place whatever the dtype. Layers about to be
    /// quantized then never hold a converted copy.
    pub fn with_matrices_in_place(self) -> Self {
        Self {
            matrices_in_place: true,
            ..self
        }
    }

    /// The weights under `prefix.name`.
    pub fn pp(&self, name: impl ToString) -> Self {
        Self {
            vb: self.vb.pp(name),
            mapped: self.mapped.clone(),
            matrices_in_place: self.matrices_in_place,
        }
    }

    /// The same weights, loaded as `dtype`.
    pub fn set_dtype(self, dtype: DType) -> Self {
        Self {
            vb: self.vb.set_dtype(dtype),
            ..self
        }
    }

    /// The dtype tensors are loaded as.
    pub fn dtype(&self) -> DType {
        self.vb.dtype()
    }

    /// The device tensors are loaded on.
    pub fn var_device(&self) -> candle_core::Device {
        self.vb.device().clone()
    }

    /// The dotted prefix, for messages.
    pub fn prefix(&self) -> String {
        self.vb.prefix()
    }

    /// Whether the checkpoint has `name` under this prefix.
    pub fn contains_tensor(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }

    /// Loads `name` with the expected shape (an error names the tensor and both shapes).
    pub fn get<S: Into<Shape>>(&self, shape: S, name: &str) -> Result<Tensor> {
        self.vb.get(shape, name)
    }

    /// The float32 matrix `name` `[rows, cols]` in place, when the model runs in `f32`
    /// (or [`Weights::with_matrices_in_place`] asked for it) and the file stores it so.
    pub fn mapped_matrix(&self, name: &str, rows: usize, cols: usize) -> Option<MappedMatrix> {
        if self.vb.dtype() != DType::F32 && !self.matrices_in_place {
            return None;
        }
        self.f32_matrix_in_file(name, rows, cols)
    }

    /// Returns the float32 matrix `name` `[rows, cols]` in place when the file stores it so,
    /// whatever dtype the model runs in (for converting it once, in parallel).
    pub fn f32_matrix_in_file(&self, name: &str, rows: usize, cols: usize) -> Option<MappedMatrix> {
        if !self.vb.device().is_cpu() {
            return None;
        }
        self.mapped
            .as_ref()?
            .f32_matrix(&self.full_name(name), rows, cols)
    }

    fn full_name(&self, name: &str) -> String {
        if self.vb.prefix().is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.vb.prefix())
        }
    }

    /// An embedding table `weight` `[entries, width]`.
    pub fn embedding(&self, entries: usize, width: usize) -> Result<Embedding> {
        Ok(Embedding::new(self.get((entries, width), "weight")?, width))
    }

    /// An embedding table `weight` `[entries, width]`, read in place when it can be (a
    /// language model's word embeddings are its largest tensor after the layers).
    pub fn token_embedding(&self, entries: usize, width: usize) -> Result<TokenEmbedding> {
        if let Some(mapped) = self.mapped_matrix("weight", entries, width) {
            return Ok(TokenEmbedding::Mapped(mapped));
        }
        Ok(TokenEmbedding::Loaded(
            self.get((entries, width), "weight")?,
        ))
    }
}

/// A token embedding table `[entries, width]`, in memory or read in place.
#[derive(Debug, Clone)]
pub enum TokenEmbedding {
    /// A tensor in memory, in the model dtype.
    Loaded(Tensor),
    /// float32 read in place from the mapped checkpoint.
    Mapped(MappedMatrix),
}

impl TokenEmbedding {
    /// Rows `ids` (u32, any shape) → `[..ids, width]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Loaded(table) => {
                let width = table.dim(1)?;
                let mut shape = ids.dims().to_vec();
                shape.push(width);
                table.index_select(&ids.flatten_all()?, 0)?.reshape(shape)
            }
            Self::Mapped(matrix) => {
                let (entries, width) = matrix.shape();
                let values = matrix.values();
                let flat = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                let mut rows = Vec::with_capacity(flat.len() * width);
                for &id in &flat {
                    let id = id as usize;
                    if id >= entries {
                        candle_core::bail!(
                            "token id {id} is outside the embedding table of {entries} entries"
                        );
                    }
                    rows.extend_from_slice(&values[id * width..(id + 1) * width]);
                }
                let mut shape = ids.dims().to_vec();
                shape.push(width);
                Tensor::from_vec(rows, shape, ids.device())
            }
        }
    }

    /// The table as the weight of an output layer that shares it.
    pub fn as_linear(&self) -> crate::Linear {
        match self {
            Self::Loaded(table) => crate::Linear::new(table.clone(), None),
            Self::Mapped(matrix) => crate::Linear::from_mapped(matrix.clone(), None),
        }
    }

    /// The dtype of the rows it returns.
    pub fn dtype(&self) -> DType {
        match self {
            Self::Loaded(table) => table.dtype(),
            Self::Mapped(_) => DType::F32,
        }
    }
}
