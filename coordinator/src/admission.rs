//! Admission of submitted jobs: validate and expand the spec, check that the
//! farm knows every model, LoRA and ControlNet, pin their hashes, find the
//! embeddings the prompts name, and create the job.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kiln_proto::error::{FieldError, quote};
use kiln_proto::extras::{EmbeddingRef, embedding_words};
use kiln_proto::ids::{JobId, TaskId, WorkerId};
use kiln_proto::recipe::Recipe;
use kiln_proto::spec::{self, ExtraKind, JobSpec};

use crate::auth::Caller;
use crate::core::Core;
use crate::error::{CoordinatorError, CoordinatorResult};
use crate::store::{HeldAssets, JobRecord, ModelInfo, NewJob, NewTask, Store};

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
    // LoRAs and ControlNets are pinned by the same rule; prompt words naming
    // an announced embedding add it. The hashes enter the recipe hash and
    // route each task to workers holding them (`policy::task_needs`).
    let assets = known_assets(core, &items, &spec).await?;
    for item in &mut items {
        assets.resolve(&mut item.recipe);
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

/// What LoRA, embedding and ControlNet names mean on the farm now: name → hash.
#[derive(Debug, Default)]
struct AssetMeanings {
    loras: BTreeMap<String, String>,
    embeddings: BTreeMap<String, String>,
    controlnets: BTreeMap<String, String>,
}

impl AssetMeanings {
    /// Returns the first LoRA or ControlNet a recipe names that the farm does not know.
    fn unknown<'a>(&self, recipe: &'a Recipe) -> Option<(ExtraKind, &'a str)> {
        let e = &recipe.extras;
        e.loras
            .iter()
            .find(|l| !self.loras.contains_key(&l.name))
            .map(|l| (ExtraKind::Lora, l.name.as_str()))
            .or_else(|| {
                e.controlnets
                    .iter()
                    .find(|c| !self.controlnets.contains_key(&c.model))
                    .map(|c| (ExtraKind::ControlNet, c.model.as_str()))
            })
    }

    /// Pins a recipe's LoRAs and ControlNets to the hashes their names mean,
    /// and adds the embeddings its prompts name (a word equal to an announced
    /// embedding's name: [`embedding_words`]), sorted by name.
    fn resolve(&self, recipe: &mut Recipe) {
        for l in &mut recipe.extras.loras {
            if let Some(hash) = self.loras.get(&l.name) {
                l.hash = hash.clone();
            }
        }
        for c in &mut recipe.extras.controlnets {
            if let Some(hash) = self.controlnets.get(&c.model) {
                c.hash = hash.clone();
            }
        }
        let words: BTreeSet<String> = embedding_words(&recipe.prompt)
            .chain(embedding_words(&recipe.negative_prompt))
            .filter(|w| self.embeddings.contains_key(w))
            .collect();
        recipe.extras.embeddings = words
            .into_iter()
            .map(|name| EmbeddingRef {
                hash: self.embeddings[&name].clone(),
                name,
            })
            .collect();
    }
}

/// Returns what LoRA, embedding and ControlNet names mean once every LoRA and
/// ControlNet the tasks name is known; waits during the model grace as
/// [`known_models`] does, then refuses the first unknown name where the spec
/// writes it.
async fn known_assets(
    core: &Core,
    items: &[spec::ExpandedItem],
    spec: &JobSpec,
) -> CoordinatorResult<AssetMeanings> {
    loop {
        let meanings = asset_meanings(core.store.as_ref()).await?;
        let Some((kind, name)) = items.iter().find_map(|i| meanings.unknown(&i.recipe)) else {
            return Ok(meanings);
        };
        if core.started.elapsed() >= core.config.model_grace {
            let (what, known, flag) = match kind {
                ExtraKind::Lora => ("LoRA", &meanings.loras, "--lora-dir DIR"),
                ExtraKind::ControlNet => (
                    "ControlNet",
                    &meanings.controlnets,
                    "--controlnet NAME=PATH",
                ),
            };
            let hint = if known.is_empty() {
                format!("no worker has announced it: start one with {flag}")
            } else {
                let names: Vec<&str> = known.keys().map(String::as_str).collect();
                format!("workers have announced {}", names.join(", "))
            };
            return Err(FieldError::new(
                spec::extra_field(spec, kind, name),
                format!("unknown {what} {}; {hint}", quote(name)),
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Returns what each LoRA, embedding and ControlNet name means: the rule
/// over live workers ([`kiln_proto::model::identify`]), and for a name no live
/// worker holds, the hash its most recent holder that was not drained held
/// ([`kiln_proto::model::last_meanings`]) — as for models ([`meanings`]).
async fn asset_meanings(store: &dyn Store) -> CoordinatorResult<AssetMeanings> {
    let live: BTreeSet<WorkerId> = store
        .live_workers()
        .await?
        .into_iter()
        .map(|w| w.id)
        .collect();
    let workers = store.workers().await?;
    let meaning = |list: fn(&HeldAssets) -> &Vec<ModelInfo>| {
        let mut out: BTreeMap<String, String> = kiln_proto::model::identify(
            workers
                .iter()
                .filter(|w| live.contains(&w.registration.id))
                .flat_map(|w| {
                    list(&w.registration.assets)
                        .iter()
                        .map(move |m| (&w.registration.id, m.name.as_str(), m.hash.as_str()))
                }),
        )
        .into_iter()
        .map(|m| (m.name.clone(), m.chosen().to_string()))
        .collect();
        let last = kiln_proto::model::last_meanings(
            workers.iter().filter(|w| !w.draining).flat_map(|w| {
                list(&w.registration.assets)
                    .iter()
                    .map(move |m| (w.last_seen_ms, m.name.as_str(), m.hash.as_str()))
            }),
        );
        for (name, hash) in last {
            out.entry(name).or_insert(hash);
        }
        out
    };
    Ok(AssetMeanings {
        loras: meaning(|a| &a.loras),
        embeddings: meaning(|a| &a.embeddings),
        controlnets: meaning(|a| &a.controlnets),
    })
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

    use super::*;
    use crate::store::MemoryStore;
    use crate::store::WorkerRegistration;
    use crate::store::policy::LIVE_MS;

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
            assets: Default::default(),
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
