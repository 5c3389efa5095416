//! What every request handler shares: the store, the result store, the
//! configuration, and the steps that follow a job's end.

use std::sync::Arc;

use kiln_proto::ids::JobId;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::CoordinatorConfig;
use crate::manifest;
use crate::results::ResultStore;
use crate::store::Store;

/// The coordinator's shared state: handles only, no farm state of its own.
pub struct Core {
    /// All live state.
    pub store: Arc<dyn Store>,
    /// Finished images and manifests.
    pub results: ResultStore,
    /// Tunables.
    pub config: CoordinatorConfig,
    /// When this coordinator started, for the model grace period.
    pub started: Instant,
    /// Cancelled when the coordinator shuts down: long polls and watch
    /// streams end then instead of holding the server open.
    pub shutdown: CancellationToken,
}

impl Core {
    /// Returns a core over the given stores.
    pub fn new(store: Arc<dyn Store>, results: ResultStore, config: CoordinatorConfig) -> Self {
        Self {
            store,
            results,
            config,
            started: Instant::now(),
            shutdown: CancellationToken::new(),
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

    /// Writes the manifest of a job from the store's records. For a finished
    /// job it first publishes every accepted upload still staged (a crash
    /// between acceptance and publication) and deletes the rest of the staging.
    pub async fn write_manifest(&self, job: JobId) -> Result<(), tonic::Status> {
        let record = self.store.job(job).await?;
        let tasks = self.store.tasks(job).await?;
        if record.is_finished() {
            let mut keep = Vec::new();
            for t in &tasks {
                if let Some(r) = &t.result {
                    self.results.publish(job, &t.file_name, &r.object).await?;
                    keep.push(r.object.clone());
                }
            }
            let removed = self.results.clear_staging(job, &keep).await?;
            if removed > 0 {
                tracing::info!(%job, removed, "removed staged uploads that were never accepted");
            }
        }
        let lines: Vec<String> = tasks.iter().map(|t| manifest::line(&record, t)).collect();
        self.results.write_manifest(job, &lines).await?;
        tracing::info!(%job, state = ?record.state, items = lines.len(), "job finished; manifest written");
        Ok(())
    }
}
