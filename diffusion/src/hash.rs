//! The content hash of a model folder, cached beside the files it covers.
//!
//! The hash is SHA-256 over the files the pipeline reads (configs, weights,
//! tokenizer files; see `layout::ModelFiles::read_set`), in sorted order of
//! their relative paths. For each file it absorbs the path (UTF-8, `/`
//! separators), a 0 byte, the length as a little-endian u64, then the bytes;
//! the framing keeps two different folders from ever feeding the same stream.
//!
//! Hashing a 5 GB model takes seconds, so the result is cached in
//! `<dir>/.kiln-model-hash.json` together with each file's (path, size,
//! mtime); any difference recomputes it. A folder that cannot be written
//! (read-only mounts, shared caches) is simply hashed every time.

use std::io::Read;
use std::path::Path;
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::PipelineError;
use super::layout::ModelFiles;

/// Name of the cache file inside the model folder.
const CACHE_FILE: &str = ".kiln-model-hash.json";
/// Version of the cache format and of the hash framing above.
const CACHE_FORMAT: u32 = 1;

/// The cache file's contents.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Cache {
    /// [`CACHE_FORMAT`] when written.
    format: u32,
    /// The hex SHA-256.
    sha256: String,
    /// The files hashed, as they were when hashed.
    files: Vec<Stamp>,
}

/// What identifies one version of a file without reading it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    /// Path relative to the model folder.
    path: String,
    /// Length in bytes.
    size: u64,
    /// Modification time: seconds since the Unix epoch.
    mtime_s: u64,
    /// Modification time: nanoseconds within the second.
    mtime_ns: u32,
}

/// Returns the content hash of a model folder, from the cache when it is current.
///
/// # Errors
///
/// `Io` when a file the pipeline needs is missing or unreadable; the errors of
/// locating the files (`Tokenizer`, `Weights`) when the folder is incomplete.
pub fn model_hash(dir: &Path) -> Result<String, PipelineError> {
    let files = ModelFiles::locate(dir)?.read_set();
    let before = stamps(dir, &files)?;
    if let Some(stamps) = &before
        && let Some(hash) = read_cache(dir, stamps)
    {
        return Ok(hash);
    }
    let hash = hash_files(dir, &files)?;
    // Cache only if no file changed while it was read (and mtimes are available).
    if let (Some(before), Ok(Some(after))) = (before, stamps(dir, &files))
        && before == after
    {
        write_cache(dir, &hash, before);
    }
    Ok(hash)
}

/// Returns the stamps of `files`, or `None` when the platform has no modification times.
fn stamps(dir: &Path, files: &[String]) -> Result<Option<Vec<Stamp>>, PipelineError> {
    let mut out = Vec::with_capacity(files.len());
    for rel in files {
        let path = dir.join(rel);
        let meta = std::fs::metadata(&path).map_err(|e| PipelineError::io(&path, e))?;
        let Some(mtime) = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        else {
            return Ok(None);
        };
        out.push(Stamp {
            path: rel.clone(),
            size: meta.len(),
            mtime_s: mtime.as_secs(),
            mtime_ns: mtime.subsec_nanos(),
        });
    }
    Ok(Some(out))
}

/// Returns the cached hash if the cache describes exactly these files.
fn read_cache(dir: &Path, stamps: &[Stamp]) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(CACHE_FILE)).ok()?;
    let cache: Cache = serde_json::from_str(&text).ok()?;
    (cache.format == CACHE_FORMAT && cache.files == stamps).then_some(cache.sha256)
}

/// Writes the cache, atomically; failures (read-only folders) are logged and ignored.
fn write_cache(dir: &Path, hash: &str, files: Vec<Stamp>) {
    let cache = Cache {
        format: CACHE_FORMAT,
        sha256: hash.to_string(),
        files,
    };
    let result = serde_json::to_vec_pretty(&cache)
        .map_err(std::io::Error::other)
        .and_then(|bytes| {
            let tmp = dir.join(format!("{CACHE_FILE}.{}.tmp", std::process::id()));
            std::fs::write(&tmp, bytes)
                .and_then(|()| std::fs::rename(&tmp, dir.join(CACHE_FILE)))
                .inspect_err(|_| {
                    let _ = std::fs::remove_file(&tmp);
                })
        });
    if let Err(error) = result {
        tracing::debug!(dir = %dir.display(), %error, "model hash not cached");
    }
}

/// Hashes `files` (sorted relative paths) with the framing described in the module doc.
fn hash_files(dir: &Path, files: &[String]) -> Result<String, PipelineError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for rel in files {
        let path = dir.join(rel);
        let io = |e| PipelineError::io(&path, e);
        let mut file = std::fs::File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        hasher.update(rel.as_bytes());
        hasher.update([0]);
        hasher.update(len.to_le_bytes());
        let mut read = 0u64;
        loop {
            let n = file.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            read += n as u64;
        }
        if read != len {
            return Err(PipelineError::io(
                &path,
                std::io::Error::other(format!(
                    "changed while hashed: {len} bytes expected, {read} read"
                )),
            ));
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::super::{layout, write_tiny_model};
    use super::*;

    #[test]
    fn hash_is_stable_cached_and_follows_content() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        write_tiny_model(dir.path())?;
        let first = model_hash(dir.path())?;
        assert_eq!(first.len(), 64);
        assert!(dir.path().join(CACHE_FILE).is_file());
        assert_eq!(model_hash(dir.path())?, first);
        // Recomputing without the cache gives the same answer.
        std::fs::remove_file(dir.path().join(CACHE_FILE))?;
        assert_eq!(model_hash(dir.path())?, first);

        // New bytes and a new mtime: the cache is stale and the hash changes.
        let config = dir.path().join(layout::SCHEDULER_CONFIG);
        let text = std::fs::read_to_string(&config)?.replace("\"leading\"", "\"linspace\"");
        std::fs::write(&config, text)?;
        let file = std::fs::File::options().write(true).open(&config)?;
        file.set_modified(SystemTime::now() + Duration::from_secs(5))?;
        let changed = model_hash(dir.path())?;
        assert_ne!(changed, first);
        assert_eq!(model_hash(dir.path())?, changed);
        Ok(())
    }

    #[test]
    fn files_the_pipeline_ignores_do_not_change_the_hash() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        write_tiny_model(dir.path())?;
        let before = model_hash(dir.path())?;
        std::fs::write(dir.path().join("README.md"), "# tiny\n")?;
        std::fs::write(dir.path().join(layout::SPECIAL_TOKENS_MAP), "{}")?;
        assert_eq!(model_hash(dir.path())?, before);
        Ok(())
    }

    #[test]
    fn a_stale_cache_written_by_hand_is_ignored() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        write_tiny_model(dir.path())?;
        let real = model_hash(dir.path())?;
        let text = std::fs::read_to_string(dir.path().join(CACHE_FILE))?;
        let mut cache: Cache = serde_json::from_str(&text)?;
        cache.sha256 = "0".repeat(64);
        cache.files[0].size += 1;
        std::fs::write(dir.path().join(CACHE_FILE), serde_json::to_vec(&cache)?)?;
        assert_eq!(model_hash(dir.path())?, real);
        Ok(())
    }
}
