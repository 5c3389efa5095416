//! What every request handler shares: the store, the result store, the
//! configuration, and the steps that follow a job's end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kiln_proto::ids::JobId;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::config::CoordinatorConfig;
use crate::contact_sheet;
use crate::error::{CoordinatorError, CoordinatorResult};
use crate::manifest;
use crate::results;
use crate::results::ResultStore;
use crate::store::Store;
use crate::store::TaskRecord;
use crate::webhook::Webhooks;

/// The coordinator's shared state: handles only, no farm state of its own.
pub struct Core {
    /// All live state.
    pub store: Arc<dyn Store>,
    /// Finished images and manifests.
    pub results: ResultStore,
    /// Tunables.
    pub config: CoordinatorConfig,
    /// Tokens and project limits (`--auth`); off by default.
    pub auth: Arc<Auth>,
    /// Webhook targets and signing (`--webhook`, ...); none by default.
    pub webhooks: Arc<Webhooks>,
    /// When this coordinator started, for the model grace period.
    pub started: Instant,
    /// Cancelled when the coordinator shuts down: long polls and watch
    /// streams end then instead of holding the server open.
    pub shutdown: CancellationToken,
    /// What never changes about recent jobs and every lease or completion
    /// needs (the result-store folder, the submission time), read from the
    /// store once per job.
    facts: Mutex<HashMap<JobId, JobFacts>>,
}

/// The unchanging facts of a job that [`Core`] remembers.
#[derive(Clone)]
struct JobFacts {
    folder: String,
    created_at_ms: i64,
}

/// Jobs whose facts [`Core`] remembers; the memory starts over when full.
const REMEMBERED_JOBS: usize = 4096;

impl Core {
    /// Returns a core over the given stores.
    pub fn new(store: Arc<dyn Store>, results: ResultStore, config: CoordinatorConfig) -> Self {
        Self {
            store,
            results,
            config,
            auth: Arc::new(Auth::off()),
            webhooks: Arc::new(Webhooks::off()),
            started: Instant::now(),
            shutdown: CancellationToken::new(),
            facts: Mutex::new(HashMap::new()),
        }
    }

    /// Writes the manifest of a finished job. Called by whichever transition
    /// ended the job; failures are logged, and the manifest is written again
    /// when a client fetches the job.
    pub async fn finalize(&self, job: JobId) {
        if let Err(e) = self.write_manifest(job).await {
            tracing::warn!(%job, error = %e, "could not write the manifest; it is retried on fetch");
        }
    }

    /// Returns the result-store folder of a job (see [`results::folder`]).
    pub async fn folder(&self, job: JobId) -> CoordinatorResult<String> {
        Ok(self.facts(job).await?.folder)
    }

    /// Returns when a job was submitted (Unix ms, the store's record).
    pub async fn submitted_at_ms(&self, job: JobId) -> CoordinatorResult<i64> {
        Ok(self.facts(job).await?.created_at_ms)
    }

    async fn facts(&self, job: JobId) -> CoordinatorResult<JobFacts> {
        if let Some(facts) = self.facts.lock().ok().and_then(|f| f.get(&job).cloned()) {
            return Ok(facts);
        }
        let record = self.store.job(job).await?;
        let facts = JobFacts {
            folder: results::folder(record.id, record.verify_of),
            created_at_ms: record.created_at_ms,
        };
        if let Ok(mut remembered) = self.facts.lock() {
            if remembered.len() >= REMEMBERED_JOBS {
                remembered.clear();
            }
            remembered.insert(job, facts.clone());
        }
        Ok(facts)
    }

    /// Writes `<series>/contact-sheet.png` for every series of a finished job:
    /// its completed tasks in order, the anchor first.
    async fn write_contact_sheets(
        &self,
        folder: &str,
        tasks: &[TaskRecord],
    ) -> CoordinatorResult<()> {
        let mut names: Vec<&str> = tasks
            .iter()
            .filter_map(|t| t.series.as_ref().map(|s| s.name.as_str()))
            .collect();
        names.dedup();
        for name in names {
            let mut tiles = Vec::new();
            for t in tasks
                .iter()
                .filter(|t| t.series.as_ref().is_some_and(|s| s.name == name))
            {
                let (Some(place), Some(result)) = (&t.series, &t.result) else {
                    continue;
                };
                let png = self
                    .results
                    .read_image(folder, &t.file_name, &result.object)
                    .await?;
                tiles.push(contact_sheet::Tile {
                    title: if place.shot == 0 {
                        "anchor".to_string()
                    } else {
                        format!("shot {}", place.shot)
                    },
                    caption: format!("seed {}", t.recipe.seed),
                    png: png.to_vec(),
                });
            }
            if tiles.is_empty() {
                continue;
            }
            let sheet = contact_sheet::compose(&tiles).map_err(|source| {
                CoordinatorError::ContactSheet {
                    series: name.to_string(),
                    source,
                }
            })?;
            self.results
                .put_artifact(folder, &contact_sheet_path(name), sheet)
                .await?;
        }
        Ok(())
    }

    /// Writes the manifest of a job from the store's records. For a finished
    /// job it first publishes every accepted upload still staged (a crash
    /// between acceptance and publication) and deletes the rest of the staging.
    pub async fn write_manifest(&self, job: JobId) -> CoordinatorResult<()> {
        let record = self.store.job(job).await?;
        let tasks = self.store.tasks(job).await?;
        let folder = results::folder(record.id, record.verify_of);
        if record.is_finished() {
            // Publishes what a crash left unpublished. One listing tells
            // which images are in place, so a job's end costs no call per
            // image: only an accepted upload still staged, or an image
            // missing under its final name, is published (or reported lost).
            let present = self.results.objects_in(&folder).await?;
            let mut keep = Vec::new();
            for t in &tasks {
                // A result store in memory answers at once, so without this the
                // loop would hold its runtime thread for the whole job.
                tokio::task::consume_budget().await;
                if let Some(r) = &t.result {
                    let published = present
                        .contains(results::image_path(&folder, &t.file_name).as_ref())
                        && !present.contains(&r.object);
                    if !published {
                        self.results
                            .publish(&folder, &t.file_name, &r.object)
                            .await?;
                    }
                    keep.push(r.object.clone());
                }
            }
            let removed = self.results.clear_staging(&folder, &keep).await?;
            if removed > 0 {
                tracing::info!(%job, removed, "removed staged uploads that were never accepted");
            }
            self.write_contact_sheets(&folder, &tasks).await?;
        }
        // A line per task is milliseconds of CPU for a large job: made on a
        // blocking thread, so the runtime keeps serving leases, reports and
        // watch streams meanwhile (every job of a farm may end at once).
        let state = record.state;
        let lines = tokio::task::spawn_blocking(move || {
            tasks
                .iter()
                .map(|t| manifest::line(&record, t))
                .collect::<Vec<String>>()
        })
        .await
        .map_err(|e| match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(_) => CoordinatorError::ShuttingDown,
        })?;
        self.results.write_manifest(&folder, &lines).await?;
        tracing::info!(%job, state = ?state, items = lines.len(), "job finished; manifest written");
        Ok(())
    }
}

/// Returns where a series' contact sheet lives in its job's folder.
pub fn contact_sheet_path(series: &str) -> String {
    format!("{series}/contact-sheet.png")
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use kiln_proto::ids::WorkerId;

    use super::*;
    use crate::store::conformance::{claim, new_job, registration};
    use crate::store::{CompleteOutcome, MemoryStore, TaskResult};

    /// A job's end publishes an accepted upload that a crash left staged,
    /// leaves an image already published as it is, and removes the staging.
    #[tokio::test]
    async fn a_finished_job_publishes_what_a_crash_left_staged() {
        let store = Arc::new(MemoryStore::new());
        let core = Core::new(
            store.clone(),
            ResultStore::in_memory(),
            CoordinatorConfig::default(),
        );
        store
            .register_worker(registration("w1", &["tiny"]), None)
            .await
            .unwrap();
        let job = new_job(2, "tiny");
        let id = job.id;
        store.create_job(job).await.unwrap();
        let folder = results::folder(id, None);
        let worker = WorkerId("w1".into());
        for lease in claim(&*store, "w1", 2).await {
            let png = Bytes::from(format!("image {}", lease.index));
            let staged = core
                .results
                .stage(&folder, lease.task, lease.epoch, png)
                .await
                .unwrap();
            let result = TaskResult {
                object: staged,
                sha256: "00".repeat(32),
                size: 7,
                model_hash: "hash-of-tiny".into(),
                render_ms: 5,
                encode_ms: 1,
                class: String::new(),
            };
            let outcome = store
                .complete(&worker, None, lease.task, lease.epoch, result)
                .await
                .unwrap();
            assert!(matches!(outcome, CompleteOutcome::Accepted { .. }));
        }
        // The first image was published as a Complete does; the crash came
        // before the second's publication.
        let tasks = store.tasks(id).await.unwrap();
        let first = &tasks[0];
        let staged = &first.result.as_ref().unwrap().object;
        core.results
            .publish(&folder, &first.file_name, staged)
            .await
            .unwrap();
        core.write_manifest(id).await.unwrap();
        for t in &tasks {
            let image = core
                .results
                .read_image(&folder, &t.file_name, "")
                .await
                .unwrap();
            assert_eq!(image, Bytes::from(format!("image {}", t.index)));
        }
        let left = core.results.objects_in(&folder).await.unwrap();
        assert!(!left.iter().any(|p| p.contains("/.staging/")), "{left:?}");
        assert!(core.results.has_manifest(&folder).await.unwrap());
    }
}
