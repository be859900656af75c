//! Building and searching photo indexes with a retrieval checkpoint.

use std::io::Read;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::DType;

use crate::index::{FileStamp, Hit, INDEX_FORMAT, INDEX_VERSION, IndexManifest, PhotoIndex};
use crate::{Blip2, Error, Result};

/// File extensions (lower case) that indexing treats as photos.
pub const PHOTO_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"];

/// Photos under `dir`, recursively, as absolute paths in sorted order.
pub fn find_photos(dir: &Path) -> Result<Vec<PathBuf>> {
    let root = dir.canonicalize().map_err(|source| Error::Io {
        path: dir.to_owned(),
        source,
    })?;
    let mut photos = Vec::new();
    let mut pending = vec![root];
    while let Some(folder) = pending.pop() {
        let entries = std::fs::read_dir(&folder).map_err(|source| Error::Io {
            path: folder.clone(),
            source,
        })?;
        for entry in entries {
            let path = entry
                .map_err(|source| Error::Io {
                    path: folder.clone(),
                    source,
                })?
                .path();
            if path.is_dir() {
                pending.push(path);
            } else if path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| PHOTO_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
            {
                photos.push(path);
            }
        }
    }
    photos.sort();
    Ok(photos)
}

/// Progress of [`Blip2::index_photos`].
#[derive(Debug)]
pub enum IndexEvent<'a> {
    /// The photos to look at, of which `to_encode` are new or changed.
    Planned {
        /// Photos found.
        found: usize,
        /// Photos that need encoding.
        to_encode: usize,
    },
    /// A photo was encoded and stored.
    Encoded {
        /// The photo.
        path: &'a Path,
    },
    /// A photo could not be read; it is left out and tried again next run.
    Skipped {
        /// The photo.
        path: &'a Path,
        /// Why.
        error: &'a Error,
    },
}

/// What an indexing run did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct IndexReport {
    /// Photos encoded in this run.
    pub encoded: usize,
    /// Photos already indexed and unchanged.
    pub unchanged: usize,
    /// Photos that could not be read, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
    /// Photos under the directory that the index had but that are gone.
    pub removed: usize,
    /// Photos in the index after the run.
    pub indexed: usize,
    /// Whether the caller stopped the run early.
    pub stopped: bool,
}

/// A search result, possibly re-ranked with the matching head.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchResult {
    /// The photo.
    pub path: PathBuf,
    /// ITC similarity with the query, in [-1, 1].
    pub itc_similarity: f32,
    /// With re-ranking: the ITM probability that the query describes the photo.
    pub itm_probability: Option<f32>,
    /// With re-ranking: the ranking score, the ITM "match" logit averaged over the
    /// queries plus the ITC similarity, as the original BLIP-2 retrieval evaluation ranks.
    pub rerank_score: Option<f32>,
}

/// The results of [`Blip2::search_photos`], and the candidates it left out.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SearchOutcome {
    /// The results, best first.
    pub results: Vec<SearchResult>,
    /// Re-ranking candidates whose photo could not be read, with the reason. They are left
    /// out of `results`, which then has fewer entries than asked for when too few
    /// candidates remain.
    pub left_out: Vec<(PathBuf, String)>,
}

/// Bytes sampled from each weight file for the fingerprint.
const FINGERPRINT_SAMPLES: u64 = 16;
const FINGERPRINT_SAMPLE_BYTES: usize = 4096;

fn fnv1a(hash: &mut u64, bytes: &[u8]) {
    for &byte in bytes {
        *hash ^= byte as u64;
        *hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
}

impl Blip2 {
    /// A fingerprint of the checkpoint: a 64-bit FNV-1a hash of `config.json`,
    /// `tokenizer.json` and, for every weight file, its name, size and 16 samples of
    /// 4 KiB spread over it. Two different checkpoints get different fingerprints with
    /// overwhelming probability, without reading gigabytes.
    pub fn fingerprint(&self) -> Result<String> {
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        for path in [&self.files().config, &self.files().tokenizer] {
            fnv1a(
                &mut hash,
                &std::fs::read(path).map_err(|source| Error::Io {
                    path: path.clone(),
                    source,
                })?,
            );
        }
        for path in &self.files().weights {
            let io = |source| Error::Io {
                path: path.clone(),
                source,
            };
            let mut file = std::fs::File::open(path).map_err(io)?;
            let size = file.metadata().map_err(io)?.len();
            fnv1a(
                &mut hash,
                path.file_name()
                    .map(|n| n.as_encoded_bytes())
                    .unwrap_or_default(),
            );
            fnv1a(&mut hash, &size.to_le_bytes());
            let mut sample = vec![0u8; FINGERPRINT_SAMPLE_BYTES];
            for i in 0..FINGERPRINT_SAMPLES {
                let offset = size.saturating_sub(FINGERPRINT_SAMPLE_BYTES as u64) * i
                    / (FINGERPRINT_SAMPLES - 1);
                std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(offset)).map_err(io)?;
                let read = file.read(&mut sample).map_err(io)?;
                fnv1a(&mut hash, &sample[..read]);
            }
        }
        Ok(format!("{hash:016x}"))
    }

    /// The `index.json` an index made with this checkpoint has; `model` is the name the
    /// user gave it, recorded as an absolute path when it names a local directory.
    pub fn index_manifest(&self, model: &str) -> Result<IndexManifest> {
        let heads = self.model().retrieval_heads()?;
        Ok(IndexManifest {
            format: INDEX_FORMAT.into(),
            version: INDEX_VERSION,
            model: recorded_model_name(model),
            fingerprint: self.fingerprint()?,
            num_query_tokens: self.model().config().num_query_tokens,
            embed_dim: heads.vision_projection.out_features(),
        })
    }

    /// Adds the photos under `photos_dir` to the index in `index_dir` (created if
    /// needed): new and changed photos are encoded, unchanged ones skipped, vanished
    /// ones removed. `on_event` reports progress and may stop the run (the index then
    /// holds every photo finished so far, and the next run continues).
    pub fn index_photos(
        &self,
        model: &str,
        photos_dir: &Path,
        index_dir: &Path,
        load_options: &blip2_image::LoadOptions,
        on_event: &mut dyn FnMut(IndexEvent<'_>) -> ControlFlow<()>,
    ) -> Result<IndexReport> {
        let manifest = self.index_manifest(model)?;
        let mut index = PhotoIndex::open_or_create(index_dir, &manifest)?;
        let photos = find_photos(photos_dir)?;
        let root = photos_dir.canonicalize().map_err(|source| Error::Io {
            path: photos_dir.to_owned(),
            source,
        })?;
        let mut report = IndexReport::default();

        let gone: Vec<PathBuf> = index
            .photos()
            .keys()
            .filter(|path| path.starts_with(&root) && !path.exists())
            .cloned()
            .collect();
        for path in &gone {
            index.remove(path)?;
        }
        report.removed = gone.len();

        let mut to_encode = Vec::new();
        for path in photos.iter() {
            let stamp = FileStamp::of(path)?;
            if index.is_current(path, stamp) {
                report.unchanged += 1;
            } else {
                to_encode.push((path, stamp));
            }
        }
        if on_event(IndexEvent::Planned {
            found: photos.len(),
            to_encode: to_encode.len(),
        })
        .is_break()
        {
            report.stopped = true;
        }

        for (path, stamp) in to_encode {
            if report.stopped {
                break;
            }
            // A photo that cannot be read is skipped. An error of the model would repeat for
            // every photo, so it ends the run, and the photos finished so far stay indexed.
            let pixels = blip2_image::load_image(path, load_options)
                .map_err(Error::from)
                .and_then(|image| self.pixel_values(std::slice::from_ref(&image)));
            let flow = match pixels {
                Ok(pixels) => {
                    let embeddings = self.image_embeds(&self.encode_images(&pixels)?)?;
                    let values = embeddings
                        .to_dtype(DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    index.add(path, stamp, &values)?;
                    report.encoded += 1;
                    on_event(IndexEvent::Encoded { path })
                }
                Err(error) => {
                    // Reported to the caller through the event and the report, so not a warning.
                    tracing::debug!(path = %path.display(), %error, "skipping a photo that cannot be indexed");
                    let flow = on_event(IndexEvent::Skipped {
                        path,
                        error: &error,
                    });
                    report.skipped.push((path.clone(), error.to_string()));
                    flow
                }
            };
            report.stopped = flow.is_break();
        }
        report.indexed = index.photos().len();
        Ok(report)
    }

    /// Searches `index` for `query` as [`Blip2::search_photos`] does, reading photos for
    /// re-ranking with the default [`blip2_image::LoadOptions`]. Photos that can no longer
    /// be read are left out of the re-ranking with a warning.
    pub fn search(
        &self,
        index: &mut PhotoIndex,
        query: &str,
        top_k: usize,
        rerank_candidates: Option<usize>,
    ) -> Result<Vec<SearchResult>> {
        let outcome =
            self.search_photos(index, query, top_k, rerank_candidates, &Default::default())?;
        for (path, error) in &outcome.left_out {
            tracing::warn!(path = %path.display(), %error, "cannot re-rank a photo; leaving it out");
        }
        Ok(outcome.results)
    }

    /// Searches `index` for `query`: the `top_k` photos by ITC similarity, or, with
    /// `rerank_candidates` (at least `top_k`), that many by ITC re-ranked by the matching
    /// head, as the original BLIP-2 retrieval evaluation does. Re-ranking reads each
    /// candidate photo again with `load_options`. A photo that can no longer be read is
    /// left out of the results and listed in [`SearchOutcome::left_out`].
    pub fn search_photos(
        &self,
        index: &mut PhotoIndex,
        query: &str,
        top_k: usize,
        rerank_candidates: Option<usize>,
        load_options: &blip2_image::LoadOptions,
    ) -> Result<SearchOutcome> {
        if let Some(candidates) = rerank_candidates
            && candidates < top_k
        {
            return Err(Error::InvalidRequest(format!(
                "rerank_candidates is {candidates} but top_k is {top_k}; re-ranking picks the \
                 top_k results among the candidates, so rerank_candidates must be at least top_k"
            )));
        }
        let manifest = self.index_manifest(&index.manifest().model)?;
        index.check_model(&IndexManifest {
            model: self.files().dir.display().to_string(),
            ..manifest
        })?;
        let text = self.text_embeds(&[query])?.squeeze(0)?.to_vec1::<f32>()?;
        let Some(candidates) = rerank_candidates else {
            return Ok(SearchOutcome {
                results: index
                    .search(&text, top_k)?
                    .into_iter()
                    .map(plain_result)
                    .collect(),
                left_out: Vec::new(),
            });
        };
        let hits = index.search(&text, candidates)?;
        let mut results = Vec::with_capacity(hits.len());
        let mut left_out = Vec::new();
        for hit in hits {
            let pixels = blip2_image::load_image(&hit.path, load_options)
                .map_err(Error::from)
                .and_then(|image| self.pixel_values(std::slice::from_ref(&image)));
            let pixels = match pixels {
                Ok(pixels) => pixels,
                Err(error) => {
                    tracing::debug!(path = %hit.path.display(), %error, "cannot re-rank a photo; leaving it out");
                    left_out.push((hit.path, error.to_string()));
                    continue;
                }
            };
            let features = self.encode_images(&pixels)?;
            let logits = self.matching_logits(&features, &[query])?.flatten_all()?;
            let probability = candle_nn::ops::softmax_last_dim(&logits)?.to_vec1::<f32>()?[1];
            let match_logit = logits.to_vec1::<f32>()?[1];
            results.push(SearchResult {
                rerank_score: Some(match_logit + hit.score),
                itm_probability: Some(probability),
                ..plain_result(hit)
            });
        }
        results.sort_by(|a, b| {
            b.rerank_score
                .unwrap_or(f32::MIN)
                .total_cmp(&a.rerank_score.unwrap_or(f32::MIN))
        });
        results.truncate(top_k);
        Ok(SearchOutcome { results, left_out })
    }
}

/// Returns the model name an index records: a local checkpoint directory as an absolute
/// path, so that `search` finds it from any working directory, and a hub id as given.
fn recorded_model_name(model: &str) -> String {
    let path = Path::new(model);
    match path.canonicalize() {
        Ok(absolute) if path.is_dir() => absolute.display().to_string(),
        _ => model.to_owned(),
    }
}

fn plain_result(hit: Hit) -> SearchResult {
    SearchResult {
        path: hit.path,
        itc_similarity: hit.score,
        itm_probability: None,
        rerank_score: None,
    }
}
