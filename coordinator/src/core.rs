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
            let mut keep = Vec::new();
            for t in &tasks {
                if let Some(r) = &t.result {
                    self.results
                        .publish(&folder, &t.file_name, &r.object)
                        .await?;
                    keep.push(r.object.clone());
                }
            }
            let removed = self.results.clear_staging(&folder, &keep).await?;
            if removed > 0 {
                tracing::info!(%job, removed, "removed staged uploads that were never accepted");
            }
            self.write_contact_sheets(&folder, &tasks).await?;
        }
        let lines: Vec<String> = tasks.iter().map(|t| manifest::line(&record, t)).collect();
        self.results.write_manifest(&folder, &lines).await?;
        tracing::info!(%job, state = ?record.state, items = lines.len(), "job finished; manifest written");
        Ok(())
    }
}

/// Returns where a series' contact sheet lives in its job's folder.
pub fn contact_sheet_path(series: &str) -> String {
    format!("{series}/contact-sheet.png")
}
