//! Admission of submitted jobs: validate and expand the spec, check that the
//! farm knows every model, pin model hashes, and create the job.

use std::collections::BTreeSet;
use std::time::Duration;

use kiln_proto::error::{FieldError, quote};
use kiln_proto::ids::{JobId, TaskId};
use kiln_proto::spec::{self, JobSpec};

use crate::auth::Caller;
use crate::core::Core;
use crate::error::{CoordinatorError, CoordinatorResult};
use crate::store::{JobRecord, ModelInfo, NewJob, NewTask};

/// Validates, expands and creates a job; returns it and whether it is new.
///
/// # Errors
/// A field error naming the field and the value; nothing is queued then.
pub async fn admit(
    core: &Core,
    caller: &Caller,
    mut spec: JobSpec,
    idempotency_key: &str,
) -> CoordinatorResult<(JobRecord, bool)> {
    // A caller with one project submits there when the file names none,
    // before the validation reads the project.
    if spec.project.is_empty()
        && let Some(project) = caller.default_project()
    {
        spec.project = project.to_string();
    }
    // The job is checked by the one validation every client runs.
    spec::check_label("idempotency_key", idempotency_key)?;
    let id = JobId::new();
    // The random bits of the UUIDv7 seed the items that set no seed.
    let seed_base = u64::from_be_bytes(id.0.as_bytes()[8..16].try_into().unwrap_or([0; 8]));
    let mut items = spec::validate(&spec, seed_base)?;
    let project = spec.project_or_default().to_string();
    caller.may_submit_to(&project)?;
    check_limits(core, &project, items.len() as u64).await?;
    let needed: BTreeSet<&str> = items.iter().map(|i| i.recipe.model.as_str()).collect();
    let known = known_models(core, &needed, &spec).await?;
    for item in &mut items {
        if let Some(m) = known.iter().find(|m| m.name == item.recipe.model) {
            item.recipe.model_hash = m.hash.clone();
        }
    }
    let job = NewJob {
        id,
        name: spec.name.clone(),
        project,
        priority: spec.priority,
        idempotency_key: (!idempotency_key.is_empty()).then(|| idempotency_key.to_string()),
        tasks: items
            .into_iter()
            .map(|i| NewTask {
                id: TaskId::new(),
                index: i.index,
                file_name: i.file_name,
                recipe: i.recipe,
                series: i.series,
                avoid: Vec::new(),
            })
            .collect(),
        // Validated above: the bytes move into the job instead of being copied.
        blobs: std::mem::take(&mut spec.blobs)
            .into_iter()
            .map(|b| (b.sha256, bytes::Bytes::from(b.data)))
            .collect(),
        // A series runs on one determinism class, so every shot reproduces.
        pin_class: !spec.series.is_empty(),
        class: None,
        dedupe: true,
        verify_of: None,
        notify: core.webhooks.targets(&spec.notify),
    };
    Ok(core.store.create_job(job).await?)
}

/// Jobs read from the store to count a project's queued and running tasks.
const QUOTA_SCAN_JOBS: usize = 100_000;

/// Refuses a job of `tasks` tasks that would pass a limit of its project's
/// `[[project]]` entry in the auth file: `max_tasks_per_job`, or
/// `max_queued_tasks` counted over the project's running jobs (queued plus
/// leased tasks).
async fn check_limits(core: &Core, project: &str, tasks: u64) -> CoordinatorResult<()> {
    let Some(limits) = core.auth.limits(project) else {
        return Ok(());
    };
    let exceeded = |limit, max, has| CoordinatorError::QuotaExceeded {
        project: project.to_string(),
        limit,
        max,
        has,
        adds: tasks,
    };
    if let Some(max) = limits.max_tasks_per_job
        && tasks > max
    {
        return Err(exceeded("max_tasks_per_job", max, None));
    }
    if let Some(max) = limits.max_queued_tasks {
        let has: u64 = core
            .store
            .jobs(QUOTA_SCAN_JOBS)
            .await?
            .iter()
            .filter(|j| j.project == project && !j.is_finished())
            .map(|j| u64::from(j.counts.queued) + u64::from(j.counts.leased))
            .sum();
        if has + tasks > max {
            return Err(exceeded("max_queued_tasks", max, Some(has)));
        }
    }
    Ok(())
}

/// Returns the farm's models once every needed one is known. While the
/// coordinator is younger than its model grace, waits for workers to announce
/// missing models; after that, refuses at once.
async fn known_models(
    core: &Core,
    needed: &BTreeSet<&str>,
    spec: &JobSpec,
) -> CoordinatorResult<Vec<ModelInfo>> {
    loop {
        let known = core.store.models().await?;
        let missing = needed.iter().find(|n| !known.iter().any(|m| m.name == **n));
        let Some(missing) = missing else {
            return Ok(known);
        };
        if core.started.elapsed() >= core.config.model_grace {
            let names: Vec<&str> = known.iter().map(|m| m.name.as_str()).collect();
            let hint = if names.is_empty() {
                "no worker has announced a model yet: start one with --model NAME=DIR".to_string()
            } else {
                format!("the farm knows {}", names.join(", "))
            };
            return Err(FieldError::new(
                spec::model_field(spec, missing),
                format!("unknown model {}; {hint}", quote(missing)),
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
