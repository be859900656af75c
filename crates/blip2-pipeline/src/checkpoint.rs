//! Finding the files of a checkpoint directory in the layout Hugging Face publishes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{Error, Result};

/// The weight index of a sharded checkpoint (`model.safetensors.index.json`).
#[derive(Debug, Deserialize)]
struct WeightIndex {
    weight_map: std::collections::HashMap<String, String>,
}

/// Paths of everything a BLIP-2 checkpoint directory provides.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointFiles {
    /// The directory.
    pub dir: PathBuf,
    /// `config.json`.
    pub config: PathBuf,
    /// `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub weights: Vec<PathBuf>,
    /// `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// `tokenizer_config.json`, when present.
    pub tokenizer_config: Option<PathBuf>,
    /// `preprocessor_config.json`, or `processor_config.json` when that is all there is.
    pub image_processor: PathBuf,
    /// `generation_config.json`, when present.
    pub generation_config: Option<PathBuf>,
}

/// Names of the files a checkpoint may have, for downloads.
pub const CONFIG_FILE: &str = "config.json";
/// Single-file safetensors weights.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The shard index of sharded safetensors weights.
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
/// The tokenizer.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Tokenizer settings (`add_bos_token`, ...).
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// Image processor settings as older checkpoints store them.
pub const PREPROCESSOR_FILE: &str = "preprocessor_config.json";
/// Processor settings as transformers 5 stores them.
pub const PROCESSOR_FILE: &str = "processor_config.json";
/// Decoding defaults.
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
/// PyTorch pickle weights, which are never loaded.
pub const PICKLE_FILES: [&str; 2] = ["pytorch_model.bin", "pytorch_model.bin.index.json"];

fn optional(dir: &Path, name: &str) -> Option<PathBuf> {
    let path = dir.join(name);
    path.is_file().then_some(path)
}

fn required(dir: &Path, name: &str, what: &str) -> Result<PathBuf> {
    optional(dir, name).ok_or_else(|| Error::MissingFile {
        path: dir.join(name),
        what: what.into(),
    })
}

impl CheckpointFiles {
    /// Lists the files of the checkpoint in `dir`, checking that the required ones exist.
    pub fn discover(dir: &Path) -> Result<Self> {
        if dir.is_file() {
            return Err(Error::ModelIsFile {
                path: dir.to_owned(),
            });
        }
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                path: dir.to_owned(),
                what: "the checkpoint directory does not exist".into(),
            });
        }
        let config = required(dir, CONFIG_FILE, "every checkpoint needs its model config")?;
        let weights = find_weights(dir)?;
        let tokenizer = required(
            dir,
            TOKENIZER_FILE,
            "the fast tokenizer file is required; transformers writes it with `processor.save_pretrained(DIR)`",
        )?;
        let image_processor = optional(dir, PREPROCESSOR_FILE)
            .or_else(|| optional(dir, PROCESSOR_FILE))
            .ok_or_else(|| Error::MissingFile {
                path: dir.join(PREPROCESSOR_FILE),
                what: format!("the image processor settings are required (or {PROCESSOR_FILE} with an image_processor entry)"),
            })?;
        Ok(Self {
            dir: dir.to_owned(),
            config,
            weights,
            tokenizer,
            tokenizer_config: optional(dir, TOKENIZER_CONFIG_FILE),
            image_processor,
            generation_config: optional(dir, GENERATION_CONFIG_FILE),
        })
    }
}

/// Shard file names listed in a weight index, in a stable order.
pub fn shard_names(index_path: &Path) -> Result<Vec<String>> {
    let index: WeightIndex = crate::config::read_json(index_path)?;
    let names: BTreeSet<String> = index.weight_map.into_values().collect();
    if names.is_empty() {
        return Err(Error::InvalidJson {
            path: index_path.to_owned(),
            message: "weight_map is empty".into(),
        });
    }
    for name in &names {
        if name.contains('/') || name.contains('\\') || name.starts_with('.') {
            return Err(Error::InvalidJson {
                path: index_path.to_owned(),
                message: format!(
                    "shard name {name:?} must be a plain file name in the checkpoint directory"
                ),
            });
        }
    }
    Ok(names.into_iter().collect())
}

fn find_weights(dir: &Path) -> Result<Vec<PathBuf>> {
    if let Some(index) = optional(dir, WEIGHTS_INDEX_FILE) {
        let mut shards = Vec::new();
        for name in shard_names(&index)? {
            shards.push(required(
                dir,
                &name,
                &format!("listed as a shard in {WEIGHTS_INDEX_FILE}"),
            )?);
        }
        return Ok(shards);
    }
    if let Some(single) = optional(dir, WEIGHTS_FILE) {
        return Ok(vec![single]);
    }
    for pickle in PICKLE_FILES {
        if dir.join(pickle).is_file() {
            return Err(Error::PickleOnly {
                dir: dir.to_owned(),
                file: pickle.into(),
            });
        }
    }
    Err(Error::MissingFile {
        path: dir.join(WEIGHTS_FILE),
        what: format!("no safetensors weights ({WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE})"),
    })
}
