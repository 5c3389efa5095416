//! Model folders in a bucket: `kiln model push` uploads every file of a
//! folder and then its manifest, [`MANIFEST_FILE`]; a worker fetches the
//! folder into its model cache, checks every file against the manifest, and
//! reuses the cached copy on later starts.
//!
//! The manifest lists each file's path, size and SHA-256, and the model's
//! content hash (the worker's, computed by the caller: this crate never
//! reaches the engine, so the hash function comes in as an argument). It is
//! written last, so a push that stopped half-way has no manifest and is never
//! taken for a model.
//!
//! The cache holds one folder per content hash, `CACHE/<hash>/`, filled under
//! a temporary name and renamed into place once every file checked out, and
//! one pointer per model name, `CACHE/<name>.kiln-model.json`: the manifest of
//! the copy that name used last, so a worker that cannot reach the bucket
//! still starts from its cache.
//!
//! Every request has the bucket's timeouts ([`crate::bucket`]); files are
//! read in ranges of [`RANGE_BYTES`] and written in parts of the same size,
//! so no single request carries a whole multi-gigabyte file.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use kiln_domain::error::quote;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The manifest's object name, beside the model's files.
pub const MANIFEST_FILE: &str = "kiln-model.json";
/// The version of the manifest's format.
pub const MANIFEST_FORMAT: u32 = 1;
/// The bytes of one ranged GET or one upload part.
pub const RANGE_BYTES: u64 = 16 << 20;
/// Upload parts in flight at once.
const PARTS_IN_FLIGHT: usize = 4;

/// What a pushed model folder holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`] when written.
    pub format: u32,
    /// The model's content hash, as the worker computes it.
    pub hash: String,
    /// Every file, sorted by path.
    pub files: Vec<ManifestFile>,
}

/// One file of a pushed model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Path relative to the model folder, `/`-separated.
    pub path: String,
    /// Length in bytes.
    pub size: u64,
    /// The hex SHA-256 of its bytes.
    pub sha256: String,
}

/// Why a model could not be pushed or fetched.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A local file or folder could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A request to the bucket failed (after its retries).
    #[error("{object}: {source}")]
    Bucket {
        /// The object, relative to the model's URL.
        object: String,
        /// The client's words.
        source: object_store::Error,
    },
    /// The bucket has no manifest: nothing pushed there, or a push that did not finish.
    #[error("no {MANIFEST_FILE}: nothing was pushed here, or the push did not finish")]
    NoManifest,
    /// The manifest is not one kiln can read.
    #[error("{MANIFEST_FILE}: {0}")]
    BadManifest(String),
    /// A downloaded (or cached) file is not what the manifest says.
    #[error("{file}: {what}; the corrupt copy is refused")]
    Corrupt {
        /// The file, relative to the model folder.
        file: String,
        /// What differs.
        what: String,
    },
    /// The folder's content hash is not the manifest's.
    #[error("the model hash is {actual}, the manifest says {expected}")]
    HashMismatch {
        /// The manifest's hash.
        expected: String,
        /// The hash of the files as fetched.
        actual: String,
    },
    /// The content hash could not be computed.
    #[error("cannot hash the model: {0}")]
    Hash(String),
}

impl ModelError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn bucket(object: &str) -> impl FnOnce(object_store::Error) -> Self + '_ {
        move |source| Self::Bucket {
            object: object.to_string(),
            source,
        }
    }
}

/// Uploads every file of `dir` (dot files left out: caches, not model
/// files), then the manifest with `hash`, the model's content hash.
///
/// # Errors
/// [`ModelError::Io`] for an unreadable file, [`ModelError::Bucket`] for a
/// refused upload; the manifest is not written then.
pub async fn push(store: &dyn ObjectStore, dir: &Path, hash: &str) -> Result<Manifest, ModelError> {
    let mut files = Vec::new();
    for rel in list_files(dir)? {
        let path = dir.join(&rel);
        let mut file = std::fs::File::open(&path).map_err(ModelError::io(&path))?;
        let upload = store
            .put_multipart(&ObjectPath::from(rel.as_str()))
            .await
            .map_err(ModelError::bucket(&rel))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, RANGE_BYTES as usize);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(ModelError::io(&path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
            writer
                .wait_for_capacity(PARTS_IN_FLIGHT)
                .await
                .map_err(ModelError::bucket(&rel))?;
            writer.write(&buf[..n]);
        }
        writer.finish().await.map_err(ModelError::bucket(&rel))?;
        files.push(ManifestFile {
            path: rel,
            size,
            sha256: hex::encode(hasher.finalize()),
        });
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        hash: hash.to_string(),
        files,
    };
    let text =
        serde_json::to_vec_pretty(&manifest).map_err(|e| ModelError::BadManifest(e.to_string()))?;
    store
        .put(&ObjectPath::from(MANIFEST_FILE), PutPayload::from(text))
        .await
        .map_err(ModelError::bucket(MANIFEST_FILE))?;
    Ok(manifest)
}

/// Returns the relative paths (`/`-separated, sorted) of every file under
/// `dir`, leaving out dot files and dot folders.
fn list_files(dir: &Path) -> Result<Vec<String>, ModelError> {
    let mut out = Vec::new();
    let mut todo = vec![(dir.to_path_buf(), String::new())];
    while let Some((folder, prefix)) = todo.pop() {
        for entry in std::fs::read_dir(&folder).map_err(ModelError::io(&folder))? {
            let entry = entry.map_err(ModelError::io(&folder))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                return Err(ModelError::Io {
                    path: entry.path(),
                    source: std::io::Error::other("the file name is not UTF-8"),
                });
            };
            if name.starts_with('.') {
                continue;
            }
            let rel = format!("{prefix}{name}");
            let kind = entry.file_type().map_err(ModelError::io(&entry.path()))?;
            if kind.is_dir() {
                todo.push((entry.path(), format!("{rel}/")));
            } else {
                out.push(rel);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A model in a bucket and the local cache it is fetched into.
pub struct Fetch<'a> {
    /// The model's catalog name (names the cache's pointer file).
    pub name: &'a str,
    /// The bucket, scoped to the model's folder.
    pub store: &'a dyn ObjectStore,
    /// The cache folder.
    pub cache: &'a Path,
}

impl Fetch<'_> {
    /// Returns the folder of the model in the cache, fetching it first when
    /// the cache has no copy that matches the bucket's manifest. When the
    /// manifest cannot be read (bucket down, object gone), the copy this name
    /// used last is taken if it still checks out. `hash_of` computes a
    /// folder's content hash (the worker's function).
    ///
    /// # Errors
    /// The [`ModelError`] of the manifest, the download or the checks; a
    /// file that does not match the manifest is [`ModelError::Corrupt`] and
    /// names it.
    pub async fn run(
        &self,
        hash_of: impl Fn(&Path) -> Result<String, String>,
    ) -> Result<PathBuf, ModelError> {
        std::fs::create_dir_all(self.cache).map_err(ModelError::io(self.cache))?;
        let remote = match self.manifest().await {
            Ok(manifest) => manifest,
            Err(error @ (ModelError::Bucket { .. } | ModelError::NoManifest)) => {
                let Some(local) = self.pointer() else {
                    return Err(error);
                };
                let dir = self.cache.join(&local.hash);
                check_copy(&dir, &local, &hash_of)?;
                tracing::warn!(model = self.name, %error, dir = %dir.display(),
                    "cannot read the model's manifest; using the cached copy");
                return Ok(dir);
            }
            Err(error) => return Err(error),
        };
        let dir = self.cache.join(&remote.hash);
        if dir.is_dir() && check_copy(&dir, &remote, &hash_of).is_ok() {
            tracing::info!(model = self.name, dir = %dir.display(), "model found in the cache");
        } else {
            self.download(&remote, &dir, &hash_of).await?;
        }
        self.write_pointer(&remote)?;
        Ok(dir)
    }

    /// Reads and checks the bucket's manifest.
    async fn manifest(&self) -> Result<Manifest, ModelError> {
        let bytes = match self.store.get(&ObjectPath::from(MANIFEST_FILE)).await {
            Ok(got) => got
                .bytes()
                .await
                .map_err(ModelError::bucket(MANIFEST_FILE))?,
            Err(object_store::Error::NotFound { .. }) => return Err(ModelError::NoManifest),
            Err(e) => return Err(ModelError::bucket(MANIFEST_FILE)(e)),
        };
        parse_manifest(&bytes)
    }

    /// The pointer file of this name.
    fn pointer_path(&self) -> PathBuf {
        self.cache.join(format!("{}.{MANIFEST_FILE}", self.name))
    }

    /// The manifest of the copy this name used last, if any.
    fn pointer(&self) -> Option<Manifest> {
        parse_manifest(&std::fs::read(self.pointer_path()).ok()?).ok()
    }

    /// Records `manifest` as this name's copy, atomically.
    fn write_pointer(&self, manifest: &Manifest) -> Result<(), ModelError> {
        let path = self.pointer_path();
        let tmp = self.cache.join(format!(
            ".{}.{}.tmp",
            self.name,
            uuid::Uuid::new_v4().simple()
        ));
        let text = serde_json::to_vec_pretty(manifest)
            .map_err(|e| ModelError::BadManifest(e.to_string()))?;
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })
            .map_err(ModelError::io(&path))
    }

    /// Downloads every file of `manifest` into a temporary folder of the
    /// cache, checks them, and renames the folder to `dir`.
    async fn download(
        &self,
        manifest: &Manifest,
        dir: &Path,
        hash_of: &impl Fn(&Path) -> Result<String, String>,
    ) -> Result<(), ModelError> {
        let tmp = self.cache.join(format!(
            ".partial-{}-{}",
            self.name,
            uuid::Uuid::new_v4().simple()
        ));
        let result = self.fill(manifest, &tmp, hash_of).await;
        let result = result.and_then(|()| match std::fs::rename(&tmp, dir) {
            Ok(()) => Ok(()),
            // Another worker on the same cache finished the same hash first.
            Err(_) if check_copy(dir, manifest, hash_of).is_ok() => Ok(()),
            Err(e) => Err(ModelError::io(dir)(e)),
        });
        if tmp.exists() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result
    }

    /// Downloads and checks every file into `tmp`.
    async fn fill(
        &self,
        manifest: &Manifest,
        tmp: &Path,
        hash_of: &impl Fn(&Path) -> Result<String, String>,
    ) -> Result<(), ModelError> {
        tracing::info!(
            model = self.name,
            files = manifest.files.len(),
            bytes = manifest.files.iter().map(|f| f.size).sum::<u64>(),
            "downloading the model"
        );
        for entry in &manifest.files {
            let path = tmp.join(&entry.path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(ModelError::io(parent))?;
            }
            let mut file = std::fs::File::create(&path).map_err(ModelError::io(&path))?;
            let object = ObjectPath::from(entry.path.as_str());
            let mut hasher = Sha256::new();
            let mut at = 0u64;
            let size = match self.store.head(&object).await {
                Ok(meta) => meta.size,
                Err(e) => return Err(ModelError::bucket(&entry.path)(e)),
            };
            if size != entry.size {
                return Err(ModelError::Corrupt {
                    file: entry.path.clone(),
                    what: format!(
                        "{size} bytes in the bucket, the manifest says {}",
                        entry.size
                    ),
                });
            }
            while at < size {
                let end = (at + RANGE_BYTES).min(size);
                let bytes = self
                    .store
                    .get_range(&object, at..end)
                    .await
                    .map_err(ModelError::bucket(&entry.path))?;
                hasher.update(&bytes);
                file.write_all(&bytes).map_err(ModelError::io(&path))?;
                at += bytes.len() as u64;
            }
            file.sync_all().map_err(ModelError::io(&path))?;
            let sha256 = hex::encode(hasher.finalize());
            if sha256 != entry.sha256 {
                return Err(ModelError::Corrupt {
                    file: entry.path.clone(),
                    what: format!("sha256 {sha256}, the manifest says {}", entry.sha256),
                });
            }
        }
        let actual = hash_of(tmp).map_err(ModelError::Hash)?;
        if actual != manifest.hash {
            return Err(ModelError::HashMismatch {
                expected: manifest.hash.clone(),
                actual,
            });
        }
        Ok(())
    }
}

/// Checks a cached copy against its manifest: every file there with its
/// size, and the folder's content hash (cheap when the hash's own cache is
/// current).
fn check_copy(
    dir: &Path,
    manifest: &Manifest,
    hash_of: &impl Fn(&Path) -> Result<String, String>,
) -> Result<(), ModelError> {
    for entry in &manifest.files {
        let path = dir.join(&entry.path);
        let size = std::fs::metadata(&path)
            .map_err(ModelError::io(&path))?
            .len();
        if size != entry.size {
            return Err(ModelError::Corrupt {
                file: entry.path.clone(),
                what: format!(
                    "{size} bytes in the cache, the manifest says {}",
                    entry.size
                ),
            });
        }
    }
    let actual = hash_of(dir).map_err(ModelError::Hash)?;
    if actual != manifest.hash {
        return Err(ModelError::HashMismatch {
            expected: manifest.hash.clone(),
            actual,
        });
    }
    Ok(())
}

/// Parses a manifest and refuses what could escape the model folder.
fn parse_manifest(bytes: &[u8]) -> Result<Manifest, ModelError> {
    let manifest: Manifest =
        serde_json::from_slice(bytes).map_err(|e| ModelError::BadManifest(e.to_string()))?;
    if manifest.format != MANIFEST_FORMAT {
        return Err(ModelError::BadManifest(format!(
            "format {}, this kiln reads {MANIFEST_FORMAT}",
            manifest.format
        )));
    }
    if manifest.hash.len() != 64 || !manifest.hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ModelError::BadManifest(format!(
            "hash must be 64 hex digits, got {}",
            quote(&manifest.hash)
        )));
    }
    for entry in &manifest.files {
        let safe = !entry.path.is_empty()
            && !entry.path.contains('\\')
            && entry
                .path
                .split('/')
                .all(|part| !part.is_empty() && !part.starts_with('.'));
        if !safe {
            return Err(ModelError::BadManifest(format!(
                "file path {} is not a plain relative path",
                quote(&entry.path)
            )));
        }
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use object_store::memory::InMemory;

    use super::*;

    /// A stand-in content hash: SHA-256 of the sorted files' bytes.
    fn hash_of(dir: &Path) -> Result<String, String> {
        let mut hasher = Sha256::new();
        for rel in list_files(dir).map_err(|e| e.to_string())? {
            hasher.update(std::fs::read(dir.join(rel)).map_err(|e| e.to_string())?);
        }
        Ok(hex::encode(hasher.finalize()))
    }

    fn model() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("unet")).unwrap();
        std::fs::write(dir.path().join("unet/weights.bin"), vec![7u8; 100]).unwrap();
        std::fs::write(dir.path().join("model_index.json"), "{}").unwrap();
        std::fs::write(dir.path().join(".cache.json"), "x").unwrap();
        dir
    }

    #[tokio::test]
    async fn push_fetch_reuse_and_refuse() -> Result<(), Box<dyn std::error::Error>> {
        let src = model();
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let hash = hash_of(src.path())?;
        let manifest = push(store.as_ref(), src.path(), &hash).await?;
        let paths: Vec<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["model_index.json", "unet/weights.bin"]);
        assert_eq!(manifest.files[1].size, 100);

        let cache = tempfile::tempdir()?;
        let fetch = Fetch {
            name: "tiny",
            store: store.as_ref(),
            cache: cache.path(),
        };
        let dir = fetch.run(hash_of).await?;
        assert_eq!(dir, cache.path().join(&hash));
        assert_eq!(std::fs::read(dir.join("unet/weights.bin"))?, vec![7u8; 100]);

        // Gone from the bucket: the cached copy is used.
        store.delete(&ObjectPath::from(MANIFEST_FILE)).await?;
        assert_eq!(fetch.run(hash_of).await?, dir);

        // A corrupt object in a fresh cache is refused, naming the file.
        push(store.as_ref(), src.path(), &hash).await?;
        store
            .put(
                &ObjectPath::from("unet/weights.bin"),
                PutPayload::from(vec![8u8; 100]),
            )
            .await?;
        let other = tempfile::tempdir()?;
        let fetch = Fetch {
            name: "tiny",
            store: store.as_ref(),
            cache: other.path(),
        };
        let error = fetch.run(hash_of).await.unwrap_err().to_string();
        assert!(error.starts_with("unet/weights.bin: sha256 "), "{error}");
        assert!(!other.path().join(&hash).exists());
        Ok(())
    }

    #[test]
    fn manifests_that_escape_the_folder_are_refused() {
        let text = format!(
            r#"{{"format":1,"hash":"{}","files":[{{"path":"../x","size":1,"sha256":"00"}}]}}"#,
            "a".repeat(64)
        );
        let error = parse_manifest(text.as_bytes()).unwrap_err().to_string();
        assert_eq!(
            error,
            "kiln-model.json: file path \"../x\" is not a plain relative path"
        );
    }
}
