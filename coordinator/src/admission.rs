//! Admission of submitted jobs: validate and expand the spec, check that the
//! farm knows every model, pin model hashes, and create the job.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kiln_proto::error::{FieldError, quote};
use kiln_proto::ids::{JobId, TaskId};
use kiln_proto::spec::{self, JobSpec};

use crate::auth::Caller;
use crate::core::Core;
use crate::error::{CoordinatorError, CoordinatorResult};
use crate::store::{JobRecord, NewJob, NewTask, Store};

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
    // Each task is pinned to what its model name means now: the hash most
    // live workers hold (`kiln_proto::model`), or for a pool scaled to zero
    // the hash its last worker held. Workers holding another hash get none
    // of these tasks.
    for item in &mut items {
        if let Some(hash) = known.get(&item.recipe.model) {
            item.recipe.model_hash = hash.clone();
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
        // The handler's span (a child of the submitter's, when it sent one).
        traceparent: kiln_proto::telemetry::traceparent(&tracing::Span::current()),
        notify: core.webhooks.targets(&spec.notify),
        submitted_by: caller.principal().map(str::to_string),
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

/// Returns what the needed model names mean (name → hash) once every one is
/// known. While the coordinator is younger than its model grace, waits for
/// workers to announce missing models; after that, refuses at once.
async fn known_models(
    core: &Core,
    needed: &BTreeSet<&str>,
    spec: &JobSpec,
) -> CoordinatorResult<BTreeMap<String, String>> {
    loop {
        let known = meanings(core.store.as_ref(), needed).await?;
        let missing = needed.iter().find(|n| !known.contains_key(**n));
        let Some(missing) = missing else {
            return Ok(known);
        };
        if core.started.elapsed() >= core.config.model_grace {
            let names: Vec<&str> = known.keys().map(String::as_str).collect();
            let hint = if names.is_empty() {
                "no worker has announced it: start one with --model NAME=DIR".to_string()
            } else {
                format!("workers have announced {}", names.join(", "))
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

/// Returns what each of the `needed` names means, for those the farm knows:
/// the rule over live workers ([`Store::models`]); for a name no live worker
/// holds (a pool scaled to zero), the hash its most recent holder that was
/// not drained held ([`kiln_proto::model::last_meanings`]). A drained
/// worker never counts, and a dead one never overrides a live one.
async fn meanings(
    store: &dyn Store,
    needed: &BTreeSet<&str>,
) -> CoordinatorResult<BTreeMap<String, String>> {
    let mut known: BTreeMap<String, String> = store
        .models()
        .await?
        .into_iter()
        .filter(|m| needed.contains(m.name.as_str()))
        .map(|m| (m.chosen().to_string(), m.name))
        .map(|(hash, name)| (name, hash))
        .collect();
    if needed.iter().all(|n| known.contains_key(*n)) {
        return Ok(known);
    }
    let workers = store.workers().await?;
    let last =
        kiln_proto::model::last_meanings(workers.iter().filter(|w| !w.draining).flat_map(|w| {
            w.registration
                .models
                .iter()
                .map(move |m| (w.last_seen_ms, m.name.as_str(), m.hash.as_str()))
        }));
    for (name, hash) in last {
        if needed.contains(name.as_str()) {
            known.entry(name).or_insert(hash);
        }
    }
    Ok(known)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kiln_proto::ids::WorkerId;

    use super::*;
    use crate::store::MemoryStore;
    use crate::store::policy::LIVE_MS;
    use crate::store::{ModelInfo, WorkerRegistration};

    fn worker(id: &str, hash: &str) -> WorkerRegistration {
        WorkerRegistration {
            id: WorkerId(id.into()),
            labels: BTreeMap::new(),
            gpu_memory_bytes: 0,
            slots: 1,
            models: vec![ModelInfo {
                name: "tiny".into(),
                hash: hash.into(),
            }],
            determinism_class: "cpu/f32".into(),
            version: "test".into(),
        }
    }

    #[tokio::test]
    async fn a_pool_scaled_to_zero_keeps_what_its_model_meant() {
        let store = MemoryStore::new();
        let needed: BTreeSet<&str> = ["tiny"].into();
        assert!(meanings(&store, &needed).await.unwrap().is_empty());
        store
            .register_worker(worker("w1", "aaa"), None)
            .await
            .unwrap();
        store
            .register_worker(worker("w2", "aaa"), None)
            .await
            .unwrap();
        // A worker that announced another build, then was drained.
        store
            .register_worker(worker("rogue", "bbb"), None)
            .await
            .unwrap();
        store.drain_worker(&WorkerId("rogue".into())).await.unwrap();
        assert_eq!(meanings(&store, &needed).await.unwrap()["tiny"], "aaa");
        // Every worker is gone: the name keeps its meaning.
        store.advance_clock(Duration::from_millis(LIVE_MS));
        assert!(store.models().await.unwrap().is_empty());
        assert_eq!(meanings(&store, &needed).await.unwrap()["tiny"], "aaa");
        // A live worker decides again, whatever the dead ones held.
        store
            .register_worker(worker("w3", "ccc"), None)
            .await
            .unwrap();
        assert_eq!(meanings(&store, &needed).await.unwrap()["tiny"], "ccc");
    }
}
