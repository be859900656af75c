//! A searchable index of image embeddings for a photo collection.
//!
//! An index is a directory of three files, all readable without this crate:
//!
//! - `index.json`: the format name and version, the model it was made with (as given
//!   and as a fingerprint of the checkpoint files), and the embedding shape.
//! - `embeddings.npy`: `float32 [rows, queries, dim]`, the normalised image embeddings
//!   of every encoded photo in encoding order (`numpy.load(path, mmap_mode="r")`).
//! - `entries.jsonl`: the log, one JSON object per line: `{"row": R, "path": P,
//!   "size": BYTES, "modified": NANOSECONDS}` when photo P was encoded into row R, or
//!   `{"removed": P}` when it left the collection. The newest line for a path wins, so a
//!   changed photo is re-encoded into a new row and its old row is ignored.
//!
//! A row is written (and synced) before its log line, so an interrupted run leaves at
//! most an unlogged row, which the next open cuts off: re-running resumes where it
//! stopped. Search streams `embeddings.npy` in chunks instead of loading it whole.

mod npy;

use std::collections::{BTreeMap, BinaryHeap};
use std::fs::OpenOptions;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};
pub use npy::{NpyRows, write_f32_npy};

/// The `format` value of `index.json`.
pub const INDEX_FORMAT: &str = "blip2-photo-index";
/// The `version` value of `index.json` this crate writes and reads.
pub const INDEX_VERSION: u32 = 1;
const MANIFEST_FILE: &str = "index.json";
const EMBEDDINGS_FILE: &str = "embeddings.npy";
const ENTRIES_FILE: &str = "entries.jsonl";
/// Rows read at a time while searching.
const SEARCH_CHUNK_ROWS: usize = 256;

/// `index.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexManifest {
    /// Always [`INDEX_FORMAT`].
    pub format: String,
    /// Always [`INDEX_VERSION`].
    pub version: u32,
    /// The model as the user named it: a hub id, or a checkpoint directory as an absolute
    /// path (earlier versions stored the path as typed, which may be relative).
    pub model: String,
    /// A fingerprint of the checkpoint's files (see [`crate::Blip2::fingerprint`]).
    pub fingerprint: String,
    /// Queries per image.
    pub num_query_tokens: usize,
    /// Width of each embedding.
    pub embed_dim: usize,
}

/// Size and modification time of a photo file, to notice changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    /// Size in bytes.
    pub size: u64,
    /// Modification time in nanoseconds since the Unix epoch.
    pub modified: u64,
}

impl FileStamp {
    /// Reads the stamp of `path`.
    pub fn of(path: &Path) -> Result<Self> {
        let metadata = std::fs::metadata(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        let modified = metadata
            .modified()
            .ok()
            .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |duration| {
                u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
            });
        Ok(Self {
            size: metadata.len(),
            modified,
        })
    }
}

/// One line of `entries.jsonl`. It is read with [`parse_log_line`], which names the
/// missing or invalid field, instead of serde's untagged matching, which cannot.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
enum LogLine {
    Encoded(EncodedLine),
    Removed(RemovedLine),
}

/// A line of `entries.jsonl` that records a photo encoded into a row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct EncodedLine {
    row: usize,
    path: PathBuf,
    size: u64,
    modified: u64,
}

/// A line of `entries.jsonl` that records a photo that left the collection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RemovedLine {
    removed: PathBuf,
}

/// A description of a valid line of `entries.jsonl`, for error messages.
const LOG_LINE_FORMAT: &str = "each line is a JSON object, either {\"row\", \"path\", \"size\", \
     \"modified\"} (a photo encoded into that row of embeddings.npy) or {\"removed\"} (a photo that \
     left the collection)";

/// Parses one line of `entries.jsonl`. The error names what is wrong and describes a valid
/// line.
fn parse_log_line(line: &str) -> std::result::Result<LogLine, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("invalid JSON ({e}); {LOG_LINE_FORMAT}"))?;
    if !value.is_object() {
        return Err(format!("{value} is not a JSON object; {LOG_LINE_FORMAT}"));
    }
    let parsed = if value.get("removed").is_some() {
        serde_json::from_value(value).map(LogLine::Removed)
    } else {
        serde_json::from_value(value).map(LogLine::Encoded)
    };
    parsed.map_err(|e| format!("{e}; {LOG_LINE_FORMAT}"))
}

/// The current row of a photo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Indexed {
    /// Row in `embeddings.npy`.
    pub row: usize,
    /// The file's stamp when it was encoded.
    pub stamp: FileStamp,
}

/// A search result.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// The photo.
    pub path: PathBuf,
    /// Its row in `embeddings.npy`.
    pub row: usize,
    /// ITC similarity with the query text, in [-1, 1].
    pub score: f32,
}

/// An open photo index.
#[derive(Debug)]
pub struct PhotoIndex {
    dir: PathBuf,
    manifest: IndexManifest,
    embeddings: NpyRows,
    photos: BTreeMap<PathBuf, Indexed>,
}

fn damaged(path: &Path, message: impl Into<String>) -> Error {
    Error::Index {
        path: path.to_owned(),
        message: message.into(),
    }
}

impl PhotoIndex {
    /// Opens the index in `dir`, or creates it (and `dir`) with `manifest` if `dir` has
    /// no index. An existing index made with another checkpoint is refused.
    pub fn open_or_create(dir: &Path, manifest: &IndexManifest) -> Result<Self> {
        if dir.is_file() {
            return Err(Error::IndexIsFile {
                path: dir.to_owned(),
            });
        }
        if dir.join(MANIFEST_FILE).exists() {
            let index = Self::open(dir)?;
            index.check_model(manifest)?;
            return Ok(index);
        }
        if dir.exists()
            && std::fs::read_dir(dir)
                .map_err(|source| Error::Io {
                    path: dir.to_owned(),
                    source,
                })?
                .next()
                .is_some()
        {
            return Err(damaged(
                dir,
                "the directory is not empty and has no index.json; choose a new index path",
            ));
        }
        std::fs::create_dir_all(dir).map_err(|source| Error::Create {
            path: dir.to_owned(),
            source,
        })?;
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = serde_json::to_string_pretty(manifest).expect("the manifest serializes");
        std::fs::write(&manifest_path, text + "\n").map_err(|source| Error::Write {
            path: manifest_path,
            source,
        })?;
        let embeddings = NpyRows::create(
            &dir.join(EMBEDDINGS_FILE),
            &[manifest.num_query_tokens, manifest.embed_dim],
        )?;
        std::fs::write(dir.join(ENTRIES_FILE), "").map_err(|source| Error::Write {
            path: dir.join(ENTRIES_FILE),
            source,
        })?;
        Ok(Self {
            dir: dir.to_owned(),
            manifest: manifest.clone(),
            embeddings,
            photos: BTreeMap::new(),
        })
    }

    /// Opens an existing index, repairing the traces of an interrupted run.
    pub fn open(dir: &Path) -> Result<Self> {
        if dir.is_file() {
            return Err(Error::IndexIsFile {
                path: dir.to_owned(),
            });
        }
        let manifest_path = dir.join(MANIFEST_FILE);
        if !manifest_path.is_file() {
            return Err(Error::MissingFile {
                path: manifest_path,
                what: "not a photo index (make one with `blip2 index`)".into(),
            });
        }
        let manifest: IndexManifest = crate::config::read_json(&manifest_path)?;
        if manifest.format != INDEX_FORMAT || manifest.version != INDEX_VERSION {
            return Err(damaged(
                &manifest_path,
                format!(
                    "format {:?} version {} is not {INDEX_FORMAT:?} version {INDEX_VERSION}",
                    manifest.format, manifest.version
                ),
            ));
        }
        let (photos, committed) = read_log(&dir.join(ENTRIES_FILE))?;
        let embeddings = NpyRows::open(
            &dir.join(EMBEDDINGS_FILE),
            &[manifest.num_query_tokens, manifest.embed_dim],
            committed,
        )?;
        Ok(Self {
            dir: dir.to_owned(),
            manifest,
            embeddings,
            photos,
        })
    }

    /// Refuses to mix embeddings of two checkpoints.
    pub fn check_model(&self, expected: &IndexManifest) -> Result<()> {
        if self.manifest.fingerprint != expected.fingerprint
            || self.manifest.num_query_tokens != expected.num_query_tokens
            || self.manifest.embed_dim != expected.embed_dim
        {
            return Err(Error::Index {
                path: self.dir.clone(),
                message: format!(
                    "made with model {} (fingerprint {}) but the loaded model is {} (fingerprint {}); \
                     use --model {} or index into a new path",
                    self.manifest.model,
                    self.manifest.fingerprint,
                    expected.model,
                    expected.fingerprint,
                    self.manifest.model
                ),
            });
        }
        Ok(())
    }

    /// Returns the checkpoint the index was made with, as [`crate::Blip2::from_pretrained`]
    /// takes it.
    ///
    /// A relative path in `model` comes from an index made by an earlier version, which
    /// stored the path as typed. It is resolved against the folder that contains the index,
    /// which was the working directory when the index was made with `-o NAME`, rather than
    /// against the current working directory. When no directory is there, the name is
    /// returned as stored: a hub id, or a path that only the original working directory
    /// can resolve.
    pub fn model_location(&self) -> String {
        let model = Path::new(&self.manifest.model);
        if model.is_relative() {
            let index_dir = self.dir.canonicalize().ok();
            let folder = index_dir.and_then(|dir| dir.parent().map(Path::to_path_buf));
            if let Some(resolved) = folder.map(|folder| folder.join(model))
                && resolved.is_dir()
            {
                return resolved.display().to_string();
            }
        }
        self.manifest.model.clone()
    }

    /// `index.json`.
    pub fn manifest(&self) -> &IndexManifest {
        &self.manifest
    }

    /// The photos in the index with their rows, by path.
    pub fn photos(&self) -> &BTreeMap<PathBuf, Indexed> {
        &self.photos
    }

    /// Whether `path` is indexed with this stamp (so it need not be encoded again).
    pub fn is_current(&self, path: &Path, stamp: FileStamp) -> bool {
        self.photos
            .get(path)
            .is_some_and(|indexed| indexed.stamp == stamp)
    }

    fn append_log(&self, line: &LogLine) -> Result<()> {
        let path = self.dir.join(ENTRIES_FILE);
        let io = |source| Error::Write {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new().append(true).open(&path).map_err(io)?;
        let text = serde_json::to_string(line).expect("log lines serialize") + "\n";
        file.write_all(text.as_bytes()).map_err(io)?;
        file.sync_data().map_err(io)
    }

    /// Stores the embeddings `[queries × dim]` of `path` (replacing an older version).
    pub fn add(&mut self, path: &Path, stamp: FileStamp, embeddings: &[f32]) -> Result<usize> {
        let row = self.embeddings.rows();
        self.embeddings.append_row(embeddings)?;
        self.append_log(&LogLine::Encoded(EncodedLine {
            row,
            path: path.to_owned(),
            size: stamp.size,
            modified: stamp.modified,
        }))?;
        self.embeddings.commit_rows()?;
        self.photos.insert(path.to_owned(), Indexed { row, stamp });
        Ok(row)
    }

    /// Records that `path` left the collection.
    pub fn remove(&mut self, path: &Path) -> Result<()> {
        if self.photos.remove(path).is_some() {
            self.append_log(&LogLine::Removed(RemovedLine {
                removed: path.to_owned(),
            }))?;
        }
        Ok(())
    }

    /// The `top_k` photos whose embeddings are most similar to `text_embed` (`[dim]`,
    /// normalised), by ITC similarity, best first.
    pub fn search(&mut self, text_embed: &[f32], top_k: usize) -> Result<Vec<Hit>> {
        let (queries, dim) = (self.manifest.num_query_tokens, self.manifest.embed_dim);
        if text_embed.len() != dim {
            return Err(damaged(
                &self.dir,
                format!(
                    "the text embedding has {} values, the index {dim}",
                    text_embed.len()
                ),
            ));
        }
        let live: BTreeMap<usize, &PathBuf> = self
            .photos
            .iter()
            .map(|(path, indexed)| (indexed.row, path))
            .collect();
        let mut best: BinaryHeap<std::cmp::Reverse<(OrderedScore, usize)>> = BinaryHeap::new();
        let rows = self.embeddings.rows();
        let mut start = 0;
        while start < rows {
            let count = SEARCH_CHUNK_ROWS.min(rows - start);
            let chunk = self.embeddings.read_rows(start, count)?;
            for (offset, row_values) in chunk.chunks_exact(queries * dim).enumerate() {
                let row = start + offset;
                if !live.contains_key(&row) {
                    continue;
                }
                let score = row_values
                    .chunks_exact(dim)
                    .map(|query| {
                        query
                            .iter()
                            .zip(text_embed)
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                    })
                    .fold(f32::NEG_INFINITY, f32::max);
                best.push(std::cmp::Reverse((OrderedScore(score), row)));
                if best.len() > top_k {
                    best.pop();
                }
            }
            start += count;
        }
        let mut hits: Vec<Hit> = best
            .into_iter()
            .map(|std::cmp::Reverse((score, row))| Hit {
                path: live[&row].clone(),
                row,
                score: score.0,
            })
            .collect();
        hits.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.row.cmp(&b.row)));
        Ok(hits)
    }
}

/// A score with a total order, for the top-k heap.
#[derive(Debug, Clone, Copy, PartialEq)]
struct OrderedScore(f32);

impl Eq for OrderedScore {}

impl PartialOrd for OrderedScore {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OrderedScore {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Replays `entries.jsonl`; returns the current photos and the number of committed rows.
/// A last line without its newline is an interrupted write and is cut off.
fn read_log(path: &Path) -> Result<(BTreeMap<PathBuf, Indexed>, usize)> {
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let bytes = std::fs::read(path).map_err(io)?;
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if complete != bytes.len() {
        tracing::warn!(path = %path.display(), "dropping a partly written last line of the index log");
        OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(complete as u64))
            .map_err(|source| Error::Write {
                path: path.to_owned(),
                source,
            })?;
    }
    let mut photos = BTreeMap::new();
    let mut rows = 0;
    for (number, line) in bytes[..complete].lines().enumerate() {
        let line = line.map_err(io)?;
        let parsed = parse_log_line(&line)
            .map_err(|message| damaged(path, format!("line {}: {message}", number + 1)))?;
        match parsed {
            LogLine::Encoded(EncodedLine {
                row,
                path: photo,
                size,
                modified,
            }) => {
                if row != rows {
                    return Err(damaged(
                        path,
                        format!(
                            "line {}: row {row} out of order (expected {rows})",
                            number + 1
                        ),
                    ));
                }
                rows += 1;
                photos.insert(
                    photo,
                    Indexed {
                        row,
                        stamp: FileStamp { size, modified },
                    },
                );
            }
            LogLine::Removed(RemovedLine { removed }) => {
                photos.remove(&removed);
            }
        }
    }
    Ok((photos, rows))
}
