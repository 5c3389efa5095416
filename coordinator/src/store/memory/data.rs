//! The memory store's data: the records of jobs, tasks and workers, the
//! indexes kept beside them so a claim or a reap never scans everything, and
//! the read-only questions asked of a record (who holds it, why a report is
//! stale).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use bytes::Bytes;
use kiln_proto::ids::{Epoch, JobId, TaskId, WorkerId};

use crate::store::{
    Event, JobRecord, LiveWorker, Preview, StoreError, StoreResult, TaskRecord, TaskResult,
    TaskState, Usage, WorkerRecord, policy,
};

/// Everything the memory store holds, behind its one mutex.
#[derive(Default)]
pub(super) struct State {
    pub(super) jobs: BTreeMap<JobId, JobEntry>,
    pub(super) tasks: HashMap<TaskId, TaskEntry>,
    /// Tasks in the Leased state, so the reaper scans only those.
    pub(super) leased: BTreeSet<TaskId>,
    pub(super) idempotency: HashMap<(String, String), JobId>,
    pub(super) workers: BTreeMap<WorkerId, WorkerEntry>,
    /// Fair-share clock: bumped every time a job is served.
    pub(super) served: u64,
    /// When each project was last served.
    pub(super) project_served: HashMap<String, u64>,
    /// Earlier results by project, then dedupe key (recipe hash and class).
    pub(super) results: HashMap<String, HashMap<String, TaskResult>>,
    /// Projects a claim found at their `max_running_tasks`: when one of
    /// their leases ends, waiting claims are woken.
    pub(super) capped: HashSet<String>,
    /// Set when a lease of such a project ended; cleared by the transition
    /// that ended it, which wakes waiting claims.
    pub(super) cap_freed: bool,
    /// Usage by (day, project, model).
    pub(super) usage: BTreeMap<(i64, String, String), Usage>,
    /// Webhook deliveries of ended jobs, open until settled for good.
    pub(super) outbox: BTreeMap<JobId, Outbox>,
}

/// An open webhook delivery (see `Store::claim_deliveries`).
pub(super) struct Outbox {
    /// Targets not delivered yet.
    pub(super) pending: Vec<String>,
    /// Claims so far.
    pub(super) attempt: u32,
    /// When it is next due, Unix milliseconds: webhook retries are minutes
    /// apart and need no paused test clock, unlike leases.
    pub(super) due: u64,
    /// When the job ended, Unix milliseconds.
    pub(super) ended: u64,
}

impl State {
    /// Returns the live workers ([`policy::is_live`]) at store time `now`, by id.
    pub(super) fn live_workers(&self, now: u64) -> Vec<LiveWorker> {
        self.workers
            .values()
            .filter(|w| policy::is_live(w.record.draining, now.saturating_sub(w.last_seen)))
            .map(|w| LiveWorker {
                id: w.record.registration.id.clone(),
                models: w.record.registration.models.clone(),
                resident: w.resident.clone(),
            })
            .collect()
    }
}

/// A job, its tasks' ids, its queues and its event log.
pub(super) struct JobEntry {
    pub(super) record: JobRecord,
    /// Task ids in index order.
    pub(super) tasks: Vec<TaskId>,
    /// Queued, claimable tasks.
    pub(super) queued: Queued,
    /// Shots waiting for their anchor: anchor index -> shot indices.
    pub(super) waiting: BTreeMap<u32, Vec<u32>>,
    pub(super) events: Vec<Event>,
    pub(super) blobs: HashMap<String, Bytes>,
    pub(super) pin_class: bool,
    pub(super) dedupe: bool,
    /// When this job was last served.
    pub(super) served: u64,
    /// Faults per worker, for quarantine.
    pub(super) faults: HashMap<WorkerId, u32>,
    /// Webhook targets, for the delivery opened when the job ends.
    pub(super) notify: Vec<String>,
}

/// A job's claimable tasks by model, in item order, so a claim looks at the
/// first task of each model instead of scanning the whole queue.
#[derive(Default)]
pub(super) struct Queued {
    pub(super) by_model: BTreeMap<String, BTreeSet<u32>>,
}

impl Queued {
    pub(super) fn insert(&mut self, model: &str, index: u32) {
        self.by_model
            .entry(model.to_string())
            .or_default()
            .insert(index);
    }

    pub(super) fn remove(&mut self, model: &str, index: u32) {
        if let Some(set) = self.by_model.get_mut(model) {
            set.remove(&index);
            if set.is_empty() {
                self.by_model.remove(model);
            }
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.by_model.is_empty()
    }

    pub(super) fn len_of(&self, model: &str) -> usize {
        self.by_model.get(model).map_or(0, BTreeSet::len)
    }

    /// Removes and returns every queued index.
    pub(super) fn drain(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.by_model)
            .into_values()
            .flatten()
            .collect()
    }
}

/// A task and what the store keeps beside its record.
pub(super) struct TaskEntry {
    pub(super) record: TaskRecord,
    /// The recipe's hash, cached: dedupe looks it up on every claim.
    pub(super) hash: String,
    /// The task's [`policy::task_batch_key`](crate::store::policy::task_batch_key),
    /// fixed at creation: free slots are filled with tasks of the same key.
    pub(super) batch_key: String,
    /// The task's [`policy::task_lora_set`](crate::store::policy::task_lora_set),
    /// fixed at creation: a worker holding it ready prefers the task.
    pub(super) lora_set: String,
    /// Lease deadline on the store clock, in ms since `origin`.
    pub(super) deadline: Option<u64>,
    /// Workers that failed this task: it is retried elsewhere when possible.
    pub(super) avoid: BTreeSet<WorkerId>,
    /// The latest live preview and until when it lives (store clock, ms):
    /// only while the lease holds (`end_lease` drops it).
    pub(super) preview: Option<(Preview, u64)>,
}

/// A worker session.
pub(super) struct WorkerEntry {
    pub(super) record: WorkerRecord,
    /// The name of the token that opened the session (`None` without
    /// `--auth`): the only one that may act under this worker id.
    pub(super) owner: Option<String>,
    pub(super) running: BTreeSet<TaskId>,
    /// Last call on the store clock.
    pub(super) last_seen: u64,
    /// Models loaded at the last claim.
    pub(super) resident: Vec<String>,
    /// The model a claim switched the worker to, while it is still loading
    /// it ([`policy::still_loading`]): model affinity counts the worker for
    /// that model alone ([`policy::holds_for_affinity`]).
    pub(super) loading: Option<String>,
}

impl State {
    /// Refuses a call under `worker` by a token that is not the owner of its
    /// session ([`policy::acts_for`]); a worker without a session has no
    /// owner to refuse for.
    pub(super) fn check_owner(&self, worker: &WorkerId, owner: Option<&str>) -> StoreResult<()> {
        match self.workers.get(worker) {
            Some(w) if !policy::acts_for(w.owner.as_deref(), owner) => {
                Err(StoreError::WorkerBound(worker.clone()))
            }
            _ => Ok(()),
        }
    }
}

/// Describes why (worker, epoch) no longer holds the task.
pub(super) fn stale_reason(task: &TaskRecord, worker: &WorkerId, epoch: Epoch) -> String {
    match task.state {
        TaskState::Cancelled => "the job was cancelled".to_string(),
        TaskState::Completed => format!(
            "task already completed under epoch {} (this report: epoch {epoch})",
            task.epoch
        ),
        TaskState::Failed => "the task already failed for good".to_string(),
        _ if epoch > task.epoch => format!(
            "epoch {epoch} was never issued for this task (the latest is epoch {})",
            task.epoch
        ),
        TaskState::Leased if task.epoch != epoch => {
            let holder = task
                .holder()
                .map(|w| w.as_str())
                .unwrap_or("another worker");
            if holder == worker.as_str() {
                format!(
                    "epoch {epoch} is stale: this worker holds the task under epoch {}",
                    task.epoch
                )
            } else {
                format!(
                    "epoch {epoch} is stale: the lease expired and {holder} holds the task under epoch {}",
                    task.epoch
                )
            }
        }
        TaskState::Leased => format!(
            "lease held by {}, not {worker}",
            task.holder().map(|w| w.as_str()).unwrap_or("nobody")
        ),
        TaskState::Queued => format!(
            "epoch {epoch} expired and the task is queued again (epoch {})",
            task.epoch
        ),
    }
}

/// Returns true if `worker` holds `task` under `epoch`.
pub(super) fn holds_lease(task: &TaskRecord, worker: &WorkerId, epoch: Epoch) -> bool {
    task.state == TaskState::Leased && task.epoch == epoch && task.holder() == Some(worker)
}
