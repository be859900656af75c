//! Fetching checkpoints from the Hugging Face hub into the standard cache.
//!
//! The cache layout and environment variables are those of `huggingface_hub`:
//! `HF_HOME` moves the cache (default `~/.cache/huggingface`), `HF_ENDPOINT` the
//! server, and `HF_HUB_OFFLINE=1` forbids network access (files must be cached).

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo};

use crate::checkpoint::{
    CONFIG_FILE, GENERATION_CONFIG_FILE, PICKLE_FILES, PREPROCESSOR_FILE, PROCESSOR_FILE,
    TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE, shard_names,
};
use crate::{Error, Result};

/// Whether `HF_HUB_OFFLINE` asks for no network access.
fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// Whether `model` names a hub repository (`owner/name`) rather than a local path.
pub fn looks_like_repo_id(model: &str) -> bool {
    let parts: Vec<&str> = model.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

fn no_network_hint(repo_id: &str) -> String {
    format!(
        "to use a checkpoint without network access, download it on a connected machine \
         (for example `huggingface-cli download {repo_id} --local-dir DIR`) and pass `--model DIR`, \
         a directory with config.json, model.safetensors (or its shards), tokenizer.json and \
         preprocessor_config.json"
    )
}

enum Fetch {
    Found(PathBuf),
    NotOnServer,
}

/// Gets one file, from the cache or the server.
fn fetch(repo: &ApiRepo, cache: &hf_hub::CacheRepo, repo_id: &str, name: &str) -> Result<Fetch> {
    if let Some(path) = cache.get(name) {
        return Ok(Fetch::Found(path));
    }
    if offline() {
        return Ok(Fetch::NotOnServer);
    }
    match repo.download(name) {
        Ok(path) => Ok(Fetch::Found(path)),
        Err(hf_hub::api::sync::ApiError::RequestError(error))
            if matches!(*error, ureq::Error::Status(404, _)) =>
        {
            Ok(Fetch::NotOnServer)
        }
        Err(error) => Err(Error::Hub(format!(
            "cannot download {name} of {repo_id} from {}: {error}; {}",
            endpoint(),
            no_network_hint(repo_id)
        ))),
    }
}

fn endpoint() -> String {
    std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into())
}

/// Downloads (or finds in the cache) the files of hub repository `repo_id` and
/// returns the snapshot directory that holds them.
pub fn fetch_checkpoint(repo_id: &str) -> Result<PathBuf> {
    let cache = Cache::from_env();
    let cache_repo = cache.repo(Repo::model(repo_id.to_owned()));
    let api = ApiBuilder::from_env()
        .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .build()
        .map_err(|e| Error::Hub(format!("cannot set up the hub client: {e}")))?;
    let repo = api.model(repo_id.to_owned());
    let missing = |name: &str| {
        let reason = if offline() {
            format!(
                "{name} of {repo_id} is not in the cache {} and HF_HUB_OFFLINE is set",
                cache.path().display()
            )
        } else {
            format!("{repo_id} has no {name} on {}", endpoint())
        };
        Error::Hub(format!("{reason}; {}", no_network_hint(repo_id)))
    };
    let get = |name: &str| -> Result<Option<PathBuf>> {
        Ok(match fetch(&repo, &cache_repo, repo_id, name)? {
            Fetch::Found(path) => Some(path),
            Fetch::NotOnServer => None,
        })
    };

    let config = get(CONFIG_FILE)?.ok_or_else(|| missing(CONFIG_FILE))?;
    get(TOKENIZER_FILE)?.ok_or_else(|| missing(TOKENIZER_FILE))?;
    get(TOKENIZER_CONFIG_FILE)?;
    get(GENERATION_CONFIG_FILE)?;
    if get(PREPROCESSOR_FILE)?.is_none() {
        get(PROCESSOR_FILE)?.ok_or_else(|| missing(PREPROCESSOR_FILE))?;
    }
    if let Some(index) = get(WEIGHTS_INDEX_FILE)? {
        for shard in shard_names(&index)? {
            get(&shard)?.ok_or_else(|| missing(&shard))?;
        }
    } else if get(WEIGHTS_FILE)?.is_none() {
        // Only ask whether pickle weights exist (a HEAD request): they are never downloaded.
        if !offline() {
            for pickle in PICKLE_FILES {
                if matches!(ureq::head(&repo.url(pickle)).call(), Ok(response) if response.status() == 200)
                {
                    return Err(Error::PickleOnly {
                        dir: PathBuf::from(repo_id),
                        file: pickle.into(),
                    });
                }
            }
        }
        return Err(missing(WEIGHTS_FILE));
    }
    Ok(snapshot_dir(&config))
}

fn snapshot_dir(file_in_snapshot: &Path) -> PathBuf {
    file_in_snapshot
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_told_apart_from_paths() {
        assert!(looks_like_repo_id("Salesforce/blip2-opt-2.7b"));
        assert!(!looks_like_repo_id("./models/blip2"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert!(!looks_like_repo_id("models/blip2/extra"));
        assert!(!looks_like_repo_id("../x"));
    }
}
