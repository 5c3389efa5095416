//! Models from object storage: `--model NAME=s3://BUCKET/models/NAME` is
//! fetched into the model cache (`--model-cache`) before the worker loads its
//! models, and from then on is a folder like any other `--model NAME=DIR`.
//!
//! The download, its checks against the pushed manifest and the reuse of the
//! cache are `kiln_storage::models`; this module supplies the bucket (from
//! the cloud's environment variables) and the worker's content hash,
//! [`kiln_diffusion::model_hash`], the one the worker announces.

use std::path::{Path, PathBuf};

use kiln_domain::error::quote;
use kiln_domain::recipe::check_model_name;
use kiln_storage::bucket::{Bucket, SCHEMES};
use kiln_storage::models::{Fetch, ModelError};

/// Why a `--model` in a bucket could not be made a local folder.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A bucket model without `--model-cache`.
    #[error("--model {name}: a model in a bucket needs --model-cache DIR (or KILN_MODEL_CACHE)")]
    NoCache {
        /// The model's name.
        name: String,
    },
    /// A bad name or URL.
    #[error("--model: {0}")]
    Arg(String),
    /// The fetch or its checks failed.
    #[error("--model {name}: {url}: {source}")]
    Fetch {
        /// The model's name.
        name: String,
        /// The quoted URL.
        url: String,
        /// What failed.
        source: ModelError,
    },
}

/// Returns `--model` arguments with every `NAME=s3://…` (or `gs://`, `az://`)
/// replaced by `NAME=DIR`, its folder in `cache`, fetched there first unless
/// the cache already holds it. Other arguments come back unchanged.
///
/// # Errors
/// [`CacheError`]: a bucket model without a cache, a bad name or URL, or a
/// fetch that failed (a corrupt file is named).
pub async fn resolve(models: &[String], cache: Option<&Path>) -> Result<Vec<String>, CacheError> {
    let mut out = Vec::with_capacity(models.len());
    for arg in models {
        let Some((name, url)) = arg
            .split_once('=')
            .filter(|(_, url)| SCHEMES.iter().any(|s| url.starts_with(&format!("{s}://"))))
        else {
            out.push(arg.clone());
            continue;
        };
        check_model_name("--model", name).map_err(|e| CacheError::Arg(e.to_string()))?;
        let cache = cache.ok_or_else(|| CacheError::NoCache {
            name: name.to_string(),
        })?;
        let dir = fetch(name, url, cache).await?;
        out.push(format!("{name}={}", dir.display()));
    }
    Ok(out)
}

/// Fetches one model into the cache and returns its folder.
async fn fetch(name: &str, url: &str, cache: &Path) -> Result<PathBuf, CacheError> {
    let store = Bucket::from_url(url)
        .and_then(|bucket| bucket.open(std::env::vars()))
        .map_err(|message| CacheError::Arg(format!("{name}: {message}")))?;
    let fetch = Fetch {
        name,
        store: store.as_ref(),
        cache,
    };
    fetch
        .run(|dir| kiln_diffusion::model_hash(dir).map_err(|e| e.to_string()))
        .await
        .map_err(|source| CacheError::Fetch {
            name: name.to_string(),
            url: quote(url),
            source,
        })
}
