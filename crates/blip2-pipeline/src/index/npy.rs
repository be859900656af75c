//! A growable `float32` NPY file: a fixed-size header whose row count is rewritten in
//! place as rows are appended, so numpy can read the file at any point
//! (`numpy.load(path, mmap_mode="r")`).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Bytes before the data: magic, version, header length and the padded header text.
pub const HEADER_BYTES: u64 = 128;
const MAGIC: &[u8] = b"\x93NUMPY\x01\x00";

fn header_text(rows: usize, inner: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = std::iter::once(rows)
        .chain(inner.iter().copied())
        .map(|d| d.to_string())
        .collect();
    let dict = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}), }}",
        dims.join(", ")
    );
    let text_len = HEADER_BYTES as usize - MAGIC.len() - 2;
    let mut text = dict.into_bytes();
    text.resize(text_len - 1, b' ');
    text.push(b'\n');
    let mut header = MAGIC.to_vec();
    header.extend_from_slice(&(text_len as u16).to_le_bytes());
    header.extend_from_slice(&text);
    header
}

/// Writes `values` as a `float32` NPY array of `shape` (C order), readable with
/// `numpy.load`.
pub fn write_f32_npy(path: &Path, shape: &[usize], values: &[f32]) -> Result<()> {
    if shape.is_empty() || shape.iter().product::<usize>() != values.len() {
        return Err(invalid(
            path,
            format!("{} values do not fill shape {shape:?}", values.len()),
        ));
    }
    let mut bytes = header_text(shape[0], &shape[1..]);
    bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    std::fs::write(path, bytes).map_err(write_error(path))
}

fn invalid(path: &Path, message: impl Into<String>) -> Error {
    Error::Index {
        path: path.to_owned(),
        message: message.into(),
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

fn write_error(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Write {
        path: path.to_owned(),
        source,
    }
}

/// An NPY file of `float32` rows of shape `inner`.
#[derive(Debug)]
pub struct NpyRows {
    path: PathBuf,
    file: File,
    inner: Vec<usize>,
    rows: usize,
}

impl NpyRows {
    /// Creates an empty file (it must not exist).
    pub fn create(path: &Path, inner: &[usize]) -> Result<Self> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|source| Error::Create {
                path: path.to_owned(),
                source,
            })?;
        file.write_all(&header_text(0, inner))
            .map_err(write_error(path))?;
        file.sync_data().map_err(write_error(path))?;
        Ok(Self {
            path: path.to_owned(),
            file,
            inner: inner.to_vec(),
            rows: 0,
        })
    }

    /// Opens an existing file, checks that its header describes `float32` rows of shape
    /// `inner`, and keeps the first `committed` rows: rows written after the last
    /// committed one (an interrupted append) are cut off. Fewer rows than committed
    /// means the file was damaged.
    pub fn open(path: &Path, inner: &[usize], committed: usize) -> Result<Self> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io(path))?;
        let mut header = vec![0u8; HEADER_BYTES as usize];
        file.read_exact(&mut header)
            .map_err(|_| invalid(path, "the file is shorter than its NPY header"))?;
        if &header[..MAGIC.len()] != MAGIC {
            return Err(invalid(
                path,
                "not an NPY version 1.0 file written by this tool",
            ));
        }
        let text = String::from_utf8_lossy(&header[MAGIC.len() + 2..]);
        let expected_prefix = "{'descr': '<f4', 'fortran_order': False, 'shape': (";
        let shape = text
            .strip_prefix(expected_prefix)
            .and_then(|rest| rest.split(')').next())
            .ok_or_else(|| invalid(path, format!("unexpected NPY header {:?}", text.trim_end())))?;
        let dims = shape
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(|d| d.parse::<usize>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| invalid(path, format!("unreadable shape ({shape})")))?;
        if dims.len() != inner.len() + 1 || dims[1..] != *inner {
            return Err(invalid(
                path,
                format!(
                    "rows have shape {:?}, expected {inner:?}",
                    &dims[1.min(dims.len())..]
                ),
            ));
        }

        let row_bytes = (inner.iter().product::<usize>() * 4) as u64;
        let length = file.metadata().map_err(io(path))?.len();
        let complete_rows = (length.saturating_sub(HEADER_BYTES) / row_bytes) as usize;
        if complete_rows < committed {
            return Err(invalid(
                path,
                format!(
                    "it holds {complete_rows} rows but the index lists {committed}; the file was truncated"
                ),
            ));
        }
        let mut npy = Self {
            path: path.to_owned(),
            file,
            inner: inner.to_vec(),
            rows: committed,
        };
        if length != HEADER_BYTES + committed as u64 * row_bytes || dims[0] != committed {
            tracing::warn!(path = %path.display(), committed, complete_rows, "repairing an interrupted index update");
            npy.file
                .set_len(HEADER_BYTES + committed as u64 * row_bytes)
                .map_err(write_error(path))?;
            npy.write_header()?;
        }
        Ok(npy)
    }

    fn write_header(&mut self) -> Result<()> {
        self.file
            .seek(SeekFrom::Start(0))
            .map_err(write_error(&self.path))?;
        self.file
            .write_all(&header_text(self.rows, &self.inner))
            .map_err(write_error(&self.path))?;
        Ok(())
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Values per row.
    pub fn row_len(&self) -> usize {
        self.inner.iter().product()
    }

    /// Appends one row's data to the end of the file and makes it durable; the header
    /// is updated separately with [`NpyRows::commit_rows`].
    pub fn append_row(&mut self, values: &[f32]) -> Result<()> {
        if values.len() != self.row_len() {
            return Err(invalid(
                &self.path,
                format!(
                    "a row has {} values, expected {}",
                    values.len(),
                    self.row_len()
                ),
            ));
        }
        let offset = HEADER_BYTES + (self.rows * self.row_len() * 4) as u64;
        self.file.set_len(offset).map_err(write_error(&self.path))?;
        self.file
            .seek(SeekFrom::Start(offset))
            .map_err(write_error(&self.path))?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.file
            .write_all(&bytes)
            .map_err(write_error(&self.path))?;
        self.file.sync_data().map_err(write_error(&self.path))?;
        self.rows += 1;
        Ok(())
    }

    /// Rewrites the header with the current row count.
    pub fn commit_rows(&mut self) -> Result<()> {
        self.write_header()?;
        self.file.sync_data().map_err(write_error(&self.path))
    }

    /// Reads rows `start..start + count` (row-major `f32`).
    pub fn read_rows(&mut self, start: usize, count: usize) -> Result<Vec<f32>> {
        let row_len = self.row_len();
        let mut bytes = vec![0u8; count * row_len * 4];
        self.file
            .seek(SeekFrom::Start(HEADER_BYTES + (start * row_len * 4) as u64))
            .map_err(io(&self.path))?;
        self.file.read_exact(&mut bytes).map_err(io(&self.path))?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_fixed_size_and_numpy_shaped() {
        for rows in [0, 7, 123_456_789] {
            let header = header_text(rows, &[32, 256]);
            assert_eq!(header.len() as u64, HEADER_BYTES);
            let text = String::from_utf8_lossy(&header[10..]);
            assert!(
                text.contains(&format!("'shape': ({rows}, 32, 256)")),
                "{text}"
            );
            assert!(text.ends_with('\n'));
        }
    }

    #[test]
    fn interrupted_append_is_cut_off_and_truncation_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.npy");
        let mut npy = NpyRows::create(&path, &[2, 3]).unwrap();
        npy.append_row(&[1.0; 6]).unwrap();
        npy.commit_rows().unwrap();
        npy.append_row(&[2.0; 6]).unwrap();
        drop(npy);

        let mut reopened = NpyRows::open(&path, &[2, 3], 1).unwrap();
        assert_eq!(reopened.rows(), 1);
        assert_eq!(reopened.read_rows(0, 1).unwrap(), vec![1.0; 6]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), HEADER_BYTES + 24);
        drop(reopened);

        let error = NpyRows::open(&path, &[2, 3], 2).unwrap_err().to_string();
        assert!(error.contains("truncated"), "{error}");
        let error = NpyRows::open(&path, &[4], 1).unwrap_err().to_string();
        assert!(error.contains("expected [4]"), "{error}");
    }
}
