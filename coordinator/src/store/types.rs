//! The records a [`Store`](super::Store) keeps: jobs, tasks, attempts, leases,
//! workers, events, and what live workers hold.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use kiln_proto::ids::{Epoch, JobId, TaskId, WorkerId};
use kiln_proto::model::identify;
pub use kiln_proto::model::{HashHolders, ModelIdentity};
pub use kiln_proto::preview::Preview;
use kiln_proto::recipe::Recipe;
pub use kiln_proto::spec::SeriesPlace;
use serde::{Deserialize, Serialize};

use super::state::{AbandonReason, EventKind, Fault, JobState, Outcome, TaskState, WorkerState};

/// A job to insert: its metadata and its expanded tasks.
#[derive(Clone, Debug)]
pub struct NewJob {
    /// The new job's id.
    pub id: JobId,
    /// A label for people.
    pub name: String,
    /// Owner project.
    pub project: String,
    /// Higher runs first.
    pub priority: i32,
    /// Resubmissions with this key (within the project) return this job.
    pub idempotency_key: Option<String>,
    /// The tasks, in index order.
    pub tasks: Vec<NewTask>,
    /// Images the recipes refer to, by sha256 (kept once per job).
    pub blobs: Vec<(String, Bytes)>,
    /// The job has series: all its tasks run on one determinism class,
    /// chosen by the first claim (or given here).
    pub pin_class: bool,
    /// A determinism class fixed from the start (verification jobs).
    pub class: Option<String>,
    /// Serve tasks whose recipe already has a result in the project from it.
    pub dedupe: bool,
    /// The job this one verifies.
    pub verify_of: Option<JobId>,
    /// W3C `traceparent` of the submission's span: leases of its tasks continue that trace.
    pub traceparent: Option<String>,
    /// URLs to POST to when the job ends: the batch file's `notify` and the
    /// coordinator's `--webhook`s. The store opens a [`Delivery`] for them in
    /// the transition that ends the job.
    pub notify: Vec<String>,
    /// The name of the token that submitted it (`None` without `--auth`,
    /// and for verification jobs).
    pub submitted_by: Option<String>,
}

/// One task to insert.
#[derive(Clone, Debug)]
pub struct NewTask {
    /// The task's id.
    pub id: TaskId,
    /// Position in the job.
    pub index: u32,
    /// What to render.
    pub recipe: Recipe,
    /// Output file name, `<NNNNN>-<slug>.png`.
    pub file_name: String,
    /// The task's place in a series.
    pub series: Option<SeriesPlace>,
    /// Workers that should not render it while another can (verification).
    pub avoid: Vec<WorkerId>,
}

/// Counters of a job's tasks by state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCounts {
    /// All tasks.
    pub total: u32,
    /// Waiting for a worker.
    pub queued: u32,
    /// Held by a worker.
    pub leased: u32,
    /// Finished with an image.
    pub completed: u32,
    /// Failed for good.
    pub failed: u32,
    /// Cancelled with the job.
    pub cancelled: u32,
}

impl TaskCounts {
    /// Moves one task from the `from` counter to the `to` counter.
    pub fn shift(&mut self, from: TaskState, to: TaskState) {
        *self.slot(from) = self.slot(from).saturating_sub(1);
        *self.slot(to) += 1;
    }

    fn slot(&mut self, state: TaskState) -> &mut u32 {
        match state {
            TaskState::Queued => &mut self.queued,
            TaskState::Leased => &mut self.leased,
            TaskState::Completed => &mut self.completed,
            TaskState::Failed => &mut self.failed,
            TaskState::Cancelled => &mut self.cancelled,
        }
    }

    /// Returns true when no task is queued or leased.
    pub fn all_ended(&self) -> bool {
        self.queued == 0 && self.leased == 0
    }
}

/// A job and its counters.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRecord {
    /// The job's id.
    pub id: JobId,
    /// A label for people.
    pub name: String,
    /// Owner project.
    pub project: String,
    /// Higher runs first.
    pub priority: i32,
    /// Life-cycle state.
    pub state: JobState,
    /// Tasks by state.
    pub counts: TaskCounts,
    /// Unix milliseconds.
    pub created_at_ms: i64,
    /// Unix milliseconds; None while running.
    pub finished_at_ms: Option<i64>,
    /// The key it was submitted with.
    pub idempotency_key: Option<String>,
    /// The determinism class the job is pinned to, once chosen.
    pub class: Option<String>,
    /// The job this one verifies.
    pub verify_of: Option<JobId>,
    /// Paused: the job keeps its place in the queue, but nothing new of it
    /// is leased ([`policy::leasable`](super::policy::leasable)).
    pub paused: bool,
    /// W3C `traceparent` of the submission's span, when it was traced.
    pub traceparent: Option<String>,
    /// The name of the token that submitted it, when it was known.
    pub submitted_by: Option<String>,
}

impl JobRecord {
    /// Returns true once the job can change no more.
    pub fn is_finished(&self) -> bool {
        self.state != JobState::Running
    }
}

/// One try at rendering a task under one epoch.
#[derive(Clone, Debug, PartialEq)]
pub struct Attempt {
    /// Who held the lease.
    pub worker: WorkerId,
    /// The lease's fencing token.
    pub epoch: Epoch,
    /// Unix milliseconds.
    pub started_at_ms: i64,
    /// Unix milliseconds; None while running.
    pub ended_at_ms: Option<i64>,
    /// How it ended.
    pub outcome: Outcome,
    /// Why it failed, when it did.
    pub fault: Option<Fault>,
    /// The worker's or the reaper's words.
    pub message: String,
}

/// The accepted output of a task.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskResult {
    /// Path in the result store of the accepted bytes, as uploaded under the epoch.
    pub object: String,
    /// sha256 of the PNG, hex.
    pub sha256: String,
    /// Size of the PNG in bytes.
    pub size: u64,
    /// Hash of the model the worker used.
    pub model_hash: String,
    /// Time spent denoising and decoding.
    pub render_ms: u64,
    /// Time spent encoding the PNG.
    pub encode_ms: u64,
    /// Determinism class of the worker that made it (set by the store).
    pub class: String,
}

/// A task with its state, lease and history.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskRecord {
    /// The task's id.
    pub id: TaskId,
    /// The job it belongs to.
    pub job: JobId,
    /// Position in the job.
    pub index: u32,
    /// What to render.
    pub recipe: Recipe,
    /// Output file name.
    pub file_name: String,
    /// Life-cycle state.
    pub state: TaskState,
    /// The current (or last) fencing token.
    pub epoch: Epoch,
    /// Every attempt, oldest first.
    pub attempts: Vec<Attempt>,
    /// Attempts before this index were made before a retry of the job
    /// (`kiln retry`): kept for the record, not counted against the limit.
    pub counted_from: u32,
    /// Denoising step of the running attempt.
    pub step: u32,
    /// The accepted output, once completed.
    pub result: Option<TaskResult>,
    /// The task's place in a series.
    pub series: Option<SeriesPlace>,
}

impl TaskRecord {
    /// Returns the worker holding the lease, if the task is leased.
    pub fn holder(&self) -> Option<&WorkerId> {
        match self.state {
            TaskState::Leased => self.attempts.last().map(|a| &a.worker),
            _ => None,
        }
    }

    /// Returns the number of attempts that count against the limit.
    pub fn faults(&self) -> usize {
        self.attempts
            .iter()
            .skip(self.counted_from as usize)
            .filter(|a| a.outcome.is_fault())
            .count()
    }
}

/// A lease handed to a worker.
#[derive(Clone, Debug, PartialEq)]
pub struct Lease {
    /// The leased task.
    pub task: TaskId,
    /// Its job.
    pub job: JobId,
    /// Its position in the job.
    pub index: u32,
    /// The fencing token every report must carry.
    pub epoch: Epoch,
    /// What to render.
    pub recipe: Recipe,
    /// The output file's name (`TaskRecord::file_name`).
    pub file_name: String,
    /// How long the lease lasts without a heartbeat.
    pub ttl: Duration,
    /// For a shot: the index of its anchor, whose image is the init image.
    pub anchor: Option<u32>,
}

/// What a claim returns.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Claim {
    /// New leases, possibly none.
    pub leases: Vec<Lease>,
    /// The worker is draining and gets no more work.
    pub drain: bool,
    /// Tasks the claim completed from earlier results instead of leasing:
    /// the coordinator copies their images.
    pub deduped: Vec<Deduped>,
    /// Jobs that those completions finished.
    pub finished: Vec<JobRecord>,
}

/// A task served from an earlier result of the same recipe and class.
#[derive(Clone, Debug, PartialEq)]
pub struct Deduped {
    /// The task.
    pub task: TaskId,
    /// Its job.
    pub job: JobId,
    /// Its output file name.
    pub file_name: String,
    /// The result store path of the earlier image to copy.
    pub source: String,
    /// The task's model (for the completion counters).
    pub model: String,
}

/// A model (or LoRA, embedding, ControlNet) a worker holds.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct ModelInfo {
    /// Catalog name.
    pub name: String,
    /// Content hash.
    pub hash: String,
}

/// A live worker's models, as the store sees them (live:
/// [`policy::is_live`](super::policy::is_live)).
#[derive(Clone, Debug, PartialEq)]
pub struct LiveWorker {
    /// The worker.
    pub id: WorkerId,
    /// The models it announced, with their hashes.
    pub models: Vec<ModelInfo>,
    /// The models it reported loaded at its last claim (none reported: its
    /// whole catalog counts as loaded, as the policy reads it).
    pub resident: Vec<String>,
}

impl LiveWorker {
    /// Returns true when the worker has `model` loaded.
    pub fn has_resident(&self, model: &str) -> bool {
        if self.resident.is_empty() {
            self.models.iter().any(|m| m.name == model)
        } else {
            self.resident.iter().any(|m| m == model)
        }
    }
}

/// Applies the farm's model rule ([`kiln_proto::model::identify`]) to live workers.
pub fn identities(live: &[LiveWorker]) -> Vec<ModelIdentity> {
    identify(live.iter().flat_map(|w| {
        w.models
            .iter()
            .map(move |m| (&w.id, m.name.as_str(), m.hash.as_str()))
    }))
}

/// The unfinished tasks of running jobs pinned to one (model, hash).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PinnedTasks {
    /// The model name.
    pub model: String,
    /// The hash the tasks were pinned to at admission (empty: any).
    pub hash: String,
    /// Tasks waiting in the queue for a worker (shots waiting for their
    /// anchor are not counted).
    pub queued: u32,
    /// Tasks held by a worker.
    pub running: u32,
}

/// What [`Store::fail_unheld`](super::Store::fail_unheld) did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Unheld {
    /// Queued tasks failed (their waiting shots not counted).
    pub failed: u32,
    /// Jobs those failures ended.
    pub finished: Vec<JobRecord>,
}

/// What a worker says about itself when it registers.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerRegistration {
    /// The worker's id.
    pub id: WorkerId,
    /// Free-form labels (node, zone, GPU model).
    pub labels: BTreeMap<String, String>,
    /// Device memory in bytes.
    pub gpu_memory_bytes: u64,
    /// Tasks it renders at once.
    pub slots: u32,
    /// Models it holds.
    pub models: Vec<ModelInfo>,
    /// Backend, device, dtype and pipeline version.
    pub determinism_class: String,
    /// kiln version of the worker.
    pub version: String,
    /// LoRAs, embeddings and ControlNets it can apply.
    pub assets: HeldAssets,
}

/// The LoRAs, textual-inversion embeddings and ControlNets a worker announced,
/// each by name with its content hash.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HeldAssets {
    /// LoRAs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<ModelInfo>,
    /// Textual-inversion embeddings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub embeddings: Vec<ModelInfo>,
    /// ControlNets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub controlnets: Vec<ModelInfo>,
}

/// A worker as the store sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerRecord {
    /// What it registered with.
    pub registration: WorkerRegistration,
    /// Gets no new work when true.
    pub draining: bool,
    /// Unix milliseconds of its last call.
    pub last_seen_ms: i64,
    /// Tasks it holds leases on.
    pub running: Vec<TaskId>,
    /// Tasks it completed.
    pub completed: u64,
    /// Attempts of its that failed or expired.
    pub failed: u64,
}

/// One heartbeat entry: a task the worker holds and how far it got.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgressReport {
    /// The task.
    pub task: TaskId,
    /// The epoch the worker holds it under.
    pub epoch: Epoch,
    /// Denoising steps done.
    pub step: u32,
}

/// What a heartbeat returns.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeartbeatOutcome {
    /// Leases extended by the TTL.
    pub extended: Vec<TaskId>,
    /// Tasks the worker must drop, with the epoch it reported and why.
    pub abandon: Vec<(TaskId, Epoch, AbandonReason)>,
    /// The worker is draining.
    pub drain: bool,
}

/// What a completion's next claim asks for (`Store::complete_and_claim`):
/// a claim's arguments but the worker and its owner, which are the
/// completion's, and the wait (a next claim never waits).
#[derive(Clone, Copy, Debug)]
pub struct NextClaim<'a> {
    /// Most tasks to lease.
    pub max: usize,
    /// Lease TTL.
    pub ttl: Duration,
    /// The models the worker has loaded.
    pub resident: &'a [String],
    /// The LoRA sets the worker holds merged.
    pub ready: &'a [kiln_proto::lora_set::ReadyLoraSet],
    /// Each capped project's `max_running_tasks`.
    pub caps: &'a RunningCaps,
}

/// What a completion returns.
#[derive(Clone, Debug, PartialEq)]
// The job record rides along only when the report ended the job; boxing
// it would allocate on that path for no gain.
#[allow(clippy::large_enum_variant)]
pub enum CompleteOutcome {
    /// The result is the task's; `job_finished` is set when this was the job's last task.
    Accepted {
        /// The job, when this completion ended it.
        job_finished: Option<JobRecord>,
    },
    /// The epoch is no longer current; the result must be discarded.
    Stale {
        /// Why, for the worker's log.
        reason: String,
    },
}

/// What a fail report returns.
#[derive(Clone, Debug, PartialEq)]
// The job record rides along only when the report ended the job; boxing
// it would allocate on that path for no gain.
#[allow(clippy::large_enum_variant)]
pub enum FailOutcome {
    /// Recorded; the task was requeued when `will_retry`.
    Recorded {
        /// The task went back to the queue.
        will_retry: bool,
        /// The job, when this failure ended it.
        job_finished: Option<JobRecord>,
    },
    /// The epoch is no longer current; nothing changed.
    Stale {
        /// Why, for the worker's log.
        reason: String,
    },
}

/// A lease the reaper took back.
#[derive(Clone, Debug, PartialEq)]
pub struct Reaped {
    /// The task.
    pub task: TaskId,
    /// Its job.
    pub job: JobId,
    /// Who held the lease.
    pub worker: WorkerId,
    /// The epoch that expired.
    pub epoch: Epoch,
    /// The task went back to the queue (false: it ran out of attempts).
    pub requeued: bool,
    /// The job, when this ended it.
    pub job_finished: Option<JobRecord>,
}

/// Progress of one running task, for watchers.
#[derive(Clone, Debug, PartialEq)]
pub struct RunningTask {
    /// The task.
    pub task: TaskId,
    /// Its position in the job.
    pub index: u32,
    /// Steps done.
    pub step: u32,
    /// Steps in all.
    pub steps: u32,
    /// Who renders it.
    pub worker: WorkerId,
}

/// One entry of a job's event log.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Position in the log, from 1.
    pub seq: u64,
    /// Unix milliseconds.
    pub at_ms: i64,
    /// What happened.
    pub kind: EventKind,
    /// The task it concerns, if any.
    pub task: Option<TaskId>,
    /// That task's index.
    pub index: u32,
    /// The worker involved, if any.
    pub worker: Option<WorkerId>,
    /// The epoch involved.
    pub epoch: Epoch,
    /// The fault, for failures and cancellations.
    pub fault: Option<Fault>,
    /// Free text.
    pub message: String,
}

/// The farm at a glance, counted by the store in one read: what
/// `/api/v1/queue` and the farm-wide gauges show, the same from every
/// coordinator of one store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FarmCounts {
    /// Work and workers per model: every model a worker ever announced, and
    /// every model that running jobs have tasks for.
    pub models: BTreeMap<String, ModelLoad>,
    /// Jobs the store holds (finished ones until their retention ends), by state.
    pub jobs: BTreeMap<JobState, u64>,
    /// Registered workers by state ([`policy::worker_state`](super::policy::worker_state)).
    pub workers: BTreeMap<WorkerState, u64>,
}

/// Tasks of running jobs and live workers for one model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelLoad {
    /// Tasks waiting for a worker, shots waiting for their anchor included.
    pub queued: u64,
    /// Tasks under a lease.
    pub running: u64,
    /// Live workers that announce the model and take work (not draining):
    /// [`policy::LIVE_MS`](super::policy::LIVE_MS) decides what is live.
    pub workers: u64,
}

impl FarmCounts {
    /// Returns the tasks queued in all, over every model.
    pub fn queued(&self) -> u64 {
        self.models.values().map(|m| m.queued).sum()
    }

    /// Returns the tasks running in all, over every model.
    pub fn running(&self) -> u64 {
        self.models.values().map(|m| m.running).sum()
    }
}

/// A webhook delivery of an ended job, claimed from the store's outbox.
///
/// The store opens one in the same atomic step that ends a job with webhook
/// targets, so a delivery is never lost with the coordinator that saw the
/// end; any coordinator may claim it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The ended job.
    pub job: JobId,
    /// How many times the delivery has been claimed, this claim included;
    /// [`Store::settle_delivery`](super::Store::settle_delivery) takes it back
    /// as a fencing token.
    pub attempt: u32,
    /// The targets not delivered yet, in the job's order.
    pub pending: Vec<String>,
    /// How long ago the job ended, by the store's clock.
    pub age: Duration,
}

/// Each capped project's `max_running_tasks`, by project name: read from the
/// auth file in force when a claim is made. A project not listed has no cap.
pub type RunningCaps = BTreeMap<String, u64>;

/// Length of a usage bucket: one UTC day, in milliseconds. Usage is kept per
/// day, so `kiln usage --since` counts whole days.
pub const USAGE_DAY_MS: i64 = 86_400_000;

/// Returns the usage bucket (days since the Unix epoch, UTC) of a time in
/// Unix milliseconds.
pub fn usage_day(unix_ms: i64) -> i64 {
    unix_ms.div_euclid(USAGE_DAY_MS)
}

/// What one project used of one model on one day: counted by the
/// transitions that end a lease (a completion, a failure, an expiry).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Images rendered and accepted (not those served from earlier results).
    pub images: u64,
    /// Render time of those images, as their workers reported it.
    pub render_ms: u64,
    /// Attempts that failed or expired.
    pub failed_attempts: u64,
}

/// One usage bucket: a day, a project and a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageRow {
    /// Days since the Unix epoch (UTC).
    pub day: i64,
    /// The job's project.
    pub project: String,
    /// The task's model.
    pub model: String,
    /// The counters.
    pub usage: Usage,
}
