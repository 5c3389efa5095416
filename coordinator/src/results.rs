//! Where finished images live: an `object_store` bucket (a local directory by
//! default) laid out as `<job>/<NNNNN>-<slug>.png` plus `<job>/manifest.jsonl`.
//! A verification job's files go inside the folder of the job it verifies,
//! as `<job>/.verify/<verification job>/...` (see [`folder`]).
//!
//! An upload is first staged under its lease epoch
//! (`<job>/.staging/<task>-e<epoch>.png`) and only renamed to its final name
//! after the store accepted that epoch's completion, so the final name only
//! ever holds the accepted output.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use kiln_proto::error::quote;
use kiln_proto::ids::{Epoch, JobId, TaskId};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

/// Why a result-store call failed.
#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    /// The result location given at start-up cannot be used.
    #[error("result store {location:?}: {message}")]
    Open {
        /// What the user gave.
        location: String,
        /// What is wrong with it.
        message: String,
    },
    /// An object operation failed.
    #[error("result store: cannot {op} {path}: {}", reason(source))]
    Object {
        /// What was tried: read, write, rename, ...
        op: &'static str,
        /// The object concerned, relative to the store.
        path: String,
        /// The underlying error.
        source: object_store::Error,
    },
}

impl ResultsError {
    /// Returns true when the object does not exist: an accepted image that
    /// is gone is lost data, not a passing fault.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            ResultsError::Object {
                source: object_store::Error::NotFound { .. },
                ..
            }
        )
    }

    /// Returns true when the same call may succeed later: the backend's
    /// I/O or network failed, rather than refusing the request.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ResultsError::Object {
                source: object_store::Error::Generic { .. },
                ..
            }
        )
    }
}

/// Says why an object operation failed. A missing object is just "not
/// found": the backend's own words would repeat the path, and for a local
/// directory name where it lives on the coordinator's disk.
fn reason(source: &object_store::Error) -> String {
    match source {
        object_store::Error::NotFound { .. } => "not found".to_string(),
        other => other.to_string(),
    }
}

/// The result store of one farm.
#[derive(Clone, Debug)]
pub struct ResultStore {
    objects: Arc<dyn ObjectStore>,
    /// How the store was named, for logs.
    location: String,
}

/// Returns the folder of a job's files: its id, or for a verification job
/// `<verified job>/.verify/<its id>`.
pub fn folder(job: JobId, verify_of: Option<JobId>) -> String {
    match verify_of {
        Some(original) => format!("{original}/.verify/{job}"),
        None => job.to_string(),
    }
}

/// Returns the path of a job's manifest.
fn manifest_path(folder: &str) -> Path {
    Path::from(format!("{folder}/manifest.jsonl"))
}

/// Returns the final path of a job's image.
pub fn image_path(folder: &str, file_name: &str) -> Path {
    Path::from(format!("{folder}/{file_name}"))
}

impl ResultStore {
    /// Opens the result store named by `location`: a local directory
    /// (created if missing) or `file:///DIR`, `memory://` for a store that
    /// lives only in this process, or a bucket: `s3://BUCKET/PREFIX`,
    /// `gs://BUCKET/PREFIX`, `az://CONTAINER/PREFIX`, configured from the
    /// usual environment variables of each cloud (`AWS_*`, `GOOGLE_*`,
    /// `AZURE_*`). Makes no network call: see [`ResultStore::check`].
    ///
    /// # Errors
    /// `Open`, naming the location, for an unknown scheme, a bucket URL
    /// without a bucket, or settings the backend refuses.
    pub fn open(location: &str) -> Result<Self, ResultsError> {
        Self::open_with_env(location, std::env::vars())
    }

    /// Opens the store like [`ResultStore::open`], with the cloud's
    /// settings read from `env` instead of the process environment.
    ///
    /// # Errors
    /// As [`ResultStore::open`].
    pub fn open_with_env(
        location: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ResultsError> {
        if location == "memory://" {
            return Ok(Self::in_memory());
        }
        let Some((scheme, rest)) = location.split_once("://") else {
            return Self::open_dir(location, location);
        };
        let bucket = match scheme {
            "file" => return Self::open_dir(location, rest),
            "s3" | "gs" | "az" => kiln_storage::bucket::Bucket::parse(location, scheme, rest),
            _ => Err(format!(
                "unknown scheme {}: give a directory, file://, memory://, s3://, gs:// or az://",
                quote(scheme)
            )),
        }
        .and_then(|b| b.open(env))
        .map_err(|message| ResultsError::Open {
            location: location.into(),
            message,
        })?;
        Ok(Self {
            objects: bucket,
            location: location.into(),
        })
    }

    /// Opens a local directory, creating it if missing.
    fn open_dir(location: &str, dir: &str) -> Result<Self, ResultsError> {
        std::fs::create_dir_all(dir).map_err(|e| ResultsError::Open {
            location: location.into(),
            message: format!("cannot create the directory: {e}"),
        })?;
        let fs = LocalFileSystem::new_with_prefix(dir).map_err(|e| ResultsError::Open {
            location: location.into(),
            message: e.to_string(),
        })?;
        Ok(Self {
            objects: Arc::new(fs),
            location: location.into(),
        })
    }

    /// Reads the first entry of a listing of the store: a bucket that does
    /// not exist, wrong credentials or an unreachable endpoint stop the
    /// coordinator at start instead of failing every completion.
    ///
    /// # Errors
    /// `Object` with the backend's words.
    pub async fn check(&self) -> Result<(), ResultsError> {
        // The first object only: one request, however large the store.
        match self.objects.list(None).next().await {
            None | Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(Self::err("list", &Path::from(""), e)),
        }
    }

    /// Returns where a job's manifest lives, as a URL of the store
    /// (`s3://bucket/prefix/<job>/manifest.jsonl`, or a directory path).
    pub fn manifest_url(&self, folder: &str) -> String {
        format!(
            "{}/{}",
            self.location.trim_end_matches('/'),
            manifest_path(folder)
        )
    }

    /// Returns a store that keeps everything in this process's memory.
    pub fn in_memory() -> Self {
        Self {
            objects: Arc::new(InMemory::new()),
            location: "memory://".into(),
        }
    }

    /// Returns how the store was named.
    pub fn location(&self) -> &str {
        &self.location
    }

    fn err(op: &'static str, path: &Path, source: object_store::Error) -> ResultsError {
        ResultsError::Object {
            op,
            path: path.to_string(),
            source,
        }
    }

    /// Stores an upload under its lease epoch and returns its path.
    pub async fn stage(
        &self,
        folder: &str,
        task: TaskId,
        epoch: Epoch,
        png: Bytes,
    ) -> Result<String, ResultsError> {
        let path = Path::from(format!("{folder}/.staging/{task}-e{epoch}.png"));
        self.objects
            .put(&path, PutPayload::from(png))
            .await
            .map_err(|e| Self::err("write", &path, e))?;
        Ok(path.to_string())
    }

    /// Deletes a staged upload that the store refused.
    pub async fn discard(&self, staged: &str) -> Result<(), ResultsError> {
        let path = Path::from(staged);
        match self.objects.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Self::err("delete", &path, e)),
        }
    }

    /// Puts an accepted result under its final name: a staged upload is
    /// renamed; a result served from another job's image is copied. Idempotent:
    /// publishing again after a crash finds the final object in place.
    pub async fn publish(
        &self,
        folder: &str,
        file_name: &str,
        source: &str,
    ) -> Result<(), ResultsError> {
        let from = Path::from(source);
        let to = image_path(folder, file_name);
        if from == to {
            return Ok(());
        }
        let (verb, moved) = if source.contains("/.staging/") {
            ("rename", self.objects.rename(&from, &to).await)
        } else {
            ("copy", self.objects.copy(&from, &to).await)
        };
        match moved {
            Ok(()) => Ok(()),
            Err(object_store::Error::NotFound { .. }) => {
                self.objects
                    .head(&to)
                    .await
                    .map_err(|e| Self::err("find", &to, e))?;
                Ok(())
            }
            Err(e) => Err(Self::err(verb, &from, e)),
        }
    }

    /// Writes a job-level file that is not an item (a contact sheet) at `<job>/<name>`.
    pub async fn put_artifact(
        &self,
        folder: &str,
        name: &str,
        data: Vec<u8>,
    ) -> Result<(), ResultsError> {
        let path = Path::from(format!("{folder}/{name}"));
        self.objects
            .put(&path, PutPayload::from(data))
            .await
            .map_err(|e| Self::err("write", &path, e))?;
        Ok(())
    }

    /// Reads a job-level file written by [`ResultStore::put_artifact`]; None if absent.
    pub async fn get_artifact(
        &self,
        folder: &str,
        name: &str,
    ) -> Result<Option<Bytes>, ResultsError> {
        let path = Path::from(format!("{folder}/{name}"));
        match self.get(&path).await {
            Ok(b) => Ok(Some(b)),
            Err(ResultsError::Object {
                source: object_store::Error::NotFound { .. },
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads an accepted image: its final object, or the staged upload if a
    /// crash came between acceptance and publication (then it is published).
    pub async fn read_image(
        &self,
        folder: &str,
        file_name: &str,
        staged: &str,
    ) -> Result<Bytes, ResultsError> {
        let path = image_path(folder, file_name);
        match self.get(&path).await {
            Err(missing) if missing.is_not_found() => {
                match self.publish(folder, file_name, staged).await {
                    Ok(()) => self.get(&path).await,
                    // Neither published nor staged: the image itself is
                    // what is missing, so that is the error to report.
                    Err(e) if e.is_not_found() => Err(missing),
                    Err(e) => Err(e),
                }
            }
            other => other,
        }
    }

    async fn get(&self, path: &Path) -> Result<Bytes, ResultsError> {
        let got = self
            .objects
            .get(path)
            .await
            .map_err(|e| Self::err("read", path, e))?;
        got.bytes().await.map_err(|e| Self::err("read", path, e))
    }

    /// Returns the path of every object in a job's folder, its staged
    /// uploads included: one listing (a request per thousand objects on a
    /// bucket) where asking about each image costs a call per image.
    pub async fn objects_in(&self, folder: &str) -> Result<HashSet<String>, ResultsError> {
        let prefix = Path::from(folder);
        let mut listing = self.objects.list(Some(&prefix));
        let mut found = HashSet::new();
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| Self::err("list", &prefix, e))?;
            found.insert(meta.location.to_string());
        }
        Ok(found)
    }

    /// Deletes every staged upload of a job that is not in `keep`: once a job
    /// has ended, staged objects left by refused or abandoned reports are garbage.
    pub async fn clear_staging(
        &self,
        folder: &str,
        keep: &[String],
    ) -> Result<usize, ResultsError> {
        let prefix = Path::from(format!("{folder}/.staging"));
        let listed: Vec<_> = self.objects.list(Some(&prefix)).collect::<Vec<_>>().await;
        let keep: HashSet<&str> = keep.iter().map(String::as_str).collect();
        let mut removed = 0;
        for meta in listed {
            let meta = meta.map_err(|e| Self::err("list", &prefix, e))?;
            if keep.contains(meta.location.as_ref()) {
                continue;
            }
            self.discard(meta.location.as_ref()).await?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Writes a job's manifest, one JSON line per item, replacing any earlier one.
    pub async fn write_manifest(&self, folder: &str, lines: &[String]) -> Result<(), ResultsError> {
        let mut text = lines.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        let path = manifest_path(folder);
        self.objects
            .put(&path, PutPayload::from(text.into_bytes()))
            .await
            .map_err(|e| Self::err("write", &path, e))?;
        Ok(())
    }

    /// Returns true if the job's manifest exists.
    pub async fn has_manifest(&self, folder: &str) -> Result<bool, ResultsError> {
        let path = manifest_path(folder);
        match self.objects.head(&path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(Self::err("find", &path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn staged_upload_appears_only_when_published() {
        let dir = tempfile::tempdir().unwrap();
        let store = ResultStore::open(dir.path().to_str().unwrap()).unwrap();
        let (job, task) = (JobId::new(), TaskId::new());
        let staged = store
            .stage(&job.to_string(), task, Epoch(2), Bytes::from_static(b"png"))
            .await
            .unwrap();
        let final_file = dir.path().join(job.to_string()).join("00003-fox.png");
        assert!(!final_file.exists());
        store
            .publish(&job.to_string(), "00003-fox.png", &staged)
            .await
            .unwrap();
        assert_eq!(std::fs::read(&final_file).unwrap(), b"png");
        // Publishing again (a retry after a crash) is harmless.
        store
            .publish(&job.to_string(), "00003-fox.png", &staged)
            .await
            .unwrap();
        let staged_dir = dir.path().join(job.to_string()).join(".staging");
        assert_eq!(std::fs::read_dir(staged_dir).unwrap().count(), 0);
        assert_eq!(
            store
                .read_image(&job.to_string(), "00003-fox.png", &staged)
                .await
                .unwrap(),
            Bytes::from_static(b"png")
        );
    }

    #[tokio::test]
    async fn a_lost_image_is_named_as_missing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ResultStore::open(dir.path().to_str().unwrap()).unwrap();
        let (job, task) = (JobId::new(), TaskId::new());
        let folder = job.to_string();
        let staged = store
            .stage(&folder, task, Epoch(1), Bytes::from_static(b"png"))
            .await
            .unwrap();
        store
            .publish(&folder, "00001-fox.png", &staged)
            .await
            .unwrap();
        std::fs::remove_file(dir.path().join(&folder).join("00001-fox.png")).unwrap();
        let e = store
            .read_image(&folder, "00001-fox.png", &staged)
            .await
            .unwrap_err();
        assert!(e.is_not_found());
        assert_eq!(
            e.to_string(),
            format!("result store: cannot read {job}/00001-fox.png: not found")
        );
    }

    #[tokio::test]
    async fn discarded_upload_leaves_nothing() {
        let store = ResultStore::in_memory();
        let (job, task) = (JobId::new(), TaskId::new());
        let staged = store
            .stage(&job.to_string(), task, Epoch(1), Bytes::from_static(b"x"))
            .await
            .unwrap();
        store.discard(&staged).await.unwrap();
        store.discard(&staged).await.unwrap();
        assert!(
            store
                .read_image(&job.to_string(), "00000-x.png", &staged)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn clearing_staging_keeps_what_is_asked() {
        let dir = tempfile::tempdir().unwrap();
        let store = ResultStore::open(dir.path().to_str().unwrap()).unwrap();
        let job = JobId::new();
        let a = store
            .stage(
                &job.to_string(),
                TaskId::new(),
                Epoch(1),
                Bytes::from_static(b"a"),
            )
            .await
            .unwrap();
        store
            .stage(
                &job.to_string(),
                TaskId::new(),
                Epoch(1),
                Bytes::from_static(b"b"),
            )
            .await
            .unwrap();
        assert_eq!(
            store
                .clear_staging(&job.to_string(), std::slice::from_ref(&a))
                .await
                .unwrap(),
            1
        );
        let left = std::fs::read_dir(dir.path().join(job.to_string()).join(".staging"))
            .unwrap()
            .count();
        assert_eq!(left, 1);
    }

    #[tokio::test]
    async fn manifest_round_trip() {
        let store = ResultStore::in_memory();
        let job = JobId::new();
        assert!(!store.has_manifest(&job.to_string()).await.unwrap());
        store
            .write_manifest(&job.to_string(), &["{\"index\":0}".into()])
            .await
            .unwrap();
        assert!(store.has_manifest(&job.to_string()).await.unwrap());
    }

    #[test]
    fn verification_files_live_inside_the_verified_job() {
        let (job, check) = (JobId::new(), JobId::new());
        assert_eq!(folder(job, None), job.to_string());
        assert_eq!(folder(check, Some(job)), format!("{job}/.verify/{check}"));
    }

    #[test]
    fn unknown_schemes_are_refused_with_the_location() {
        let e = ResultStore::open("ftp://host/x").unwrap_err();
        assert_eq!(
            e.to_string(),
            "result store \"ftp://host/x\": unknown scheme \"ftp\": give a directory, file://, memory://, s3://, gs:// or az://"
        );
        let e = ResultStore::open("s3:///prefix").unwrap_err();
        assert!(e.to_string().contains("no bucket"), "{e}");
    }
}
