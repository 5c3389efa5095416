//! Live farm state behind one trait: jobs, tasks, leases, workers and events.
//!
//! Every method is one atomic state transition, so any number of coordinator
//! replicas may call them at once (the Redis store in #4 makes each one a Lua
//! script). Lease deadlines come from the store's own clock, never a worker's.
//! A lease is identified by (task, epoch): the epoch is a fencing token that
//! grows on every claim and every reap, and a report under an older epoch is
//! answered `Stale` without changing anything.

mod memory;
pub mod policy;
mod redis;
mod state;
mod types;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use kiln_proto::ids::{Epoch, JobId, TaskId, WorkerId};
use kiln_proto::lora_set::ReadyLoraSet;

pub use self::redis::{RedisConfig, RedisStore, redacted};
pub use memory::MemoryStore;
pub use state::{
    AbandonReason, EventKind, Fault, JobState, Outcome, StateName, TaskState, WorkerState,
};
pub use types::*;

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The job does not exist (or is past retention).
    #[error("job {0} not found")]
    JobNotFound(JobId),
    /// The task does not exist.
    #[error("task {0} not found")]
    TaskNotFound(TaskId),
    /// The job has no task at this index.
    #[error("job {job} has no task {index}")]
    NoTaskAt {
        /// The job.
        job: JobId,
        /// The index asked for.
        index: u32,
    },
    /// The worker has no session: it must register (again).
    #[error("worker {0} is not registered")]
    UnknownWorker(WorkerId),
    /// The worker id belongs to a session another token opened (see
    /// [`policy::acts_for`], [`policy::may_register`]).
    #[error("worker id {0} is registered by another token")]
    WorkerBound(WorkerId),
    /// The backing service cannot be reached; the call may be retried.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The backing service answered with an error that a retry will not fix.
    #[error("store error: {0}")]
    Backend(String),
    /// Stored data could not be read back.
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    /// The store is set up in a way kiln refuses to run on.
    #[error("{0}")]
    Misconfigured(String),
}

impl StoreError {
    /// Returns true when the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// Result of a store call.
pub type StoreResult<T> = Result<T, StoreError>;

/// The farm's live state. Each method is atomic; see the module docs.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Inserts the job and queues all its tasks in one step. If the project
    /// already has a job under the same idempotency key, returns that job and
    /// `false` and inserts nothing.
    async fn create_job(&self, job: NewJob) -> StoreResult<(JobRecord, bool)>;

    /// Returns a job.
    async fn job(&self, id: JobId) -> StoreResult<JobRecord>;

    /// Returns up to `limit` jobs, newest first.
    async fn jobs(&self, limit: usize) -> StoreResult<Vec<JobRecord>>;

    /// Returns a job's tasks in index order.
    async fn tasks(&self, id: JobId) -> StoreResult<Vec<TaskRecord>>;

    /// Returns one task.
    async fn task(&self, id: TaskId) -> StoreResult<TaskRecord>;

    /// Returns the task at `index` of job `job` (a shot's anchor, say) in a
    /// constant number of lookups, whatever the job's size. A plain read.
    ///
    /// # Errors
    /// `JobNotFound` for an unknown job, `NoTaskAt` for an index past its end.
    async fn task_at(&self, job: JobId, index: u32) -> StoreResult<TaskRecord>;

    /// Returns the job's blobs with the given sha256s (unknown ones are left out).
    async fn blobs(&self, id: JobId, sha256s: &[String]) -> StoreResult<Vec<(String, Bytes)>>;

    /// Returns the job's leased tasks with their progress.
    async fn running(&self, id: JobId) -> StoreResult<Vec<RunningTask>>;

    /// Cancels a running job: queued and leased tasks become cancelled at once
    /// (their holders learn it at their next heartbeat). A finished job is
    /// returned unchanged.
    async fn cancel_job(&self, id: JobId) -> StoreResult<JobRecord>;

    /// Pauses (`paused`) or resumes a running job: a paused job keeps its
    /// place in the queue but nothing new of it is leased
    /// ([`policy::leasable`]); its running tasks finish. A finished job, or
    /// one already so, is returned unchanged.
    async fn pause_job(&self, id: JobId, paused: bool) -> StoreResult<JobRecord>;

    /// Sets a running job's priority (higher runs first, [`policy::job_rank`]).
    /// A finished job is returned unchanged.
    async fn set_priority(&self, id: JobId, priority: i32) -> StoreResult<JobRecord>;

    /// Puts the failed tasks of a job back in the queue with fresh attempts
    /// ([`policy::retryable`], [`policy::job_retryable`]); a finished job runs
    /// again. Returns the job and how many tasks went back.
    async fn retry_job(&self, id: JobId) -> StoreResult<(JobRecord, u32)>;

    /// Returns the usage buckets of day `since_day` (days since the Unix
    /// epoch, [`usage_day`]) and later, ordered by day, project and model.
    async fn usage(&self, since_day: i64) -> StoreResult<Vec<UsageRow>>;

    /// Opens a worker session bound to `owner` (the registering token's
    /// name; `None` without `--auth`). Leases still held under the same
    /// worker id belong to a dead incarnation: they are expired and requeued
    /// at once.
    ///
    /// # Errors
    /// `WorkerBound`, changing nothing, while the id's session is alive and
    /// another owner opened it ([`policy::may_register`]).
    async fn register_worker(
        &self,
        registration: WorkerRegistration,
        owner: Option<&str>,
    ) -> StoreResult<Vec<Reaped>>;

    /// Returns every worker known to the store.
    async fn workers(&self) -> StoreResult<Vec<WorkerRecord>>;

    /// Marks a worker draining: it gets no new leases.
    async fn drain_worker(&self, id: &WorkerId) -> StoreResult<WorkerRecord>;

    /// Returns the live workers ([`policy::is_live`]) with their models.
    async fn live_workers(&self) -> StoreResult<Vec<LiveWorker>>;

    /// Returns what each model name means: the farm's one rule
    /// ([`kiln_proto::model::identify`]) over the live workers' hashes, in
    /// name order. Drained, lost or expired workers change nothing here.
    async fn models(&self) -> StoreResult<Vec<ModelIdentity>> {
        Ok(identities(&self.live_workers().await?))
    }

    /// Returns the queued and running tasks of running jobs by pinned
    /// (model, hash), sorted. A job pins one hash per model (admission), so
    /// each (job, model) queue counts under the hash of its first task.
    async fn pinned_tasks(&self) -> StoreResult<Vec<PinnedTasks>>;

    /// Fails, in one atomic step, every queued task of a running job pinned
    /// to (`model`, `hash`) — unless a live worker holds `model` under
    /// `hash` (any hash when `hash` is empty), in which case nothing
    /// changes. Each task fails for good with `message` and the
    /// `ModelUnavailable` fault, its waiting shots with it, and jobs that
    /// this ends finish as failed. Idempotent: a second call finds nothing
    /// queued to fail.
    async fn fail_unheld(&self, model: &str, hash: &str, message: &str) -> StoreResult<Unheld>;

    /// Leases up to `max` queued tasks to `worker` in the order of
    /// [`policy`], each with a new epoch and a deadline `ttl` from now;
    /// `resident` names the models the worker has loaded, `ready` the LoRA
    /// sets it holds merged (for this claim only; not kept); no project gets
    /// more leased tasks than its cap in `caps`. Tasks whose recipe already
    /// has a result in the project for the worker's class are completed from
    /// it on the way (`Claim::deduped`). When nothing is claimable, waits up
    /// to `wait` for work before answering an empty claim.
    ///
    /// # Errors
    /// `UnknownWorker` without a session; `WorkerBound`, changing nothing,
    /// when `owner` is not the session's owner ([`policy::acts_for`]).
    ///
    /// # Cancel safety
    /// Cancel-safe: a claim that was dropped while waiting leased nothing.
    // The worker's identity, its ask and the policy's inputs are each one
    // argument; a struct around them would only rename them at every call.
    #[allow(clippy::too_many_arguments)]
    async fn claim(
        &self,
        worker: &WorkerId,
        owner: Option<&str>,
        max: usize,
        ttl: Duration,
        wait: Duration,
        resident: &[String],
        ready: &[ReadyLoraSet],
        caps: &RunningCaps,
    ) -> StoreResult<Claim>;

    /// Extends the leases the worker still holds under the reported epochs and
    /// records progress; every other reported task is to be abandoned.
    ///
    /// # Errors
    /// `UnknownWorker` without a session; `WorkerBound`, changing nothing,
    /// when `owner` is not the session's owner.
    async fn heartbeat(
        &self,
        worker: &WorkerId,
        owner: Option<&str>,
        progress: &[ProgressReport],
        ttl: Duration,
    ) -> StoreResult<HeartbeatOutcome>;

    /// Accepts `result` as the task's output if `worker` holds the lease
    /// under `epoch` (a replay of the same accepted completion is accepted
    /// again); otherwise answers `Stale` and changes nothing but the event
    /// log. Shots waiting for this task (their anchor) are queued with its
    /// image as their init image, and the result is remembered for dedupe.
    ///
    /// # Errors
    /// `WorkerBound`, changing nothing, when the worker has a session and
    /// `owner` is not its owner.
    async fn complete(
        &self,
        worker: &WorkerId,
        owner: Option<&str>,
        task: TaskId,
        epoch: Epoch,
        result: TaskResult,
    ) -> StoreResult<CompleteOutcome>;

    /// Completes as [`Store::complete`] and, when the result is accepted
    /// (a replay included), claims as [`Store::claim`] with `next` and no
    /// wait: a worker's Complete that carries its next lease. The claim's
    /// outcome is `None` when the completion was not accepted; its error
    /// never undoes the accepted result. The Redis store makes both in one
    /// script run; this default makes them one after the other.
    ///
    /// # Errors
    /// As [`Store::complete`].
    async fn complete_and_claim(
        &self,
        worker: &WorkerId,
        owner: Option<&str>,
        task: TaskId,
        epoch: Epoch,
        result: TaskResult,
        next: NextClaim<'_>,
    ) -> StoreResult<(CompleteOutcome, Option<StoreResult<Claim>>)> {
        let outcome = self.complete(worker, owner, task, epoch, result).await?;
        let claim = match outcome {
            CompleteOutcome::Accepted { .. } => Some(
                self.claim(
                    worker,
                    owner,
                    next.max,
                    next.ttl,
                    Duration::ZERO,
                    next.resident,
                    next.ready,
                    next.caps,
                )
                .await,
            ),
            CompleteOutcome::Stale { .. } => None,
        };
        Ok((outcome, claim))
    }

    /// Records a fault under the lease's epoch, in one atomic step with the
    /// decision ([`policy::retry_after_fault`]): the task is requeued (to be
    /// tried by another worker when one can) unless the fault is `BadInput`,
    /// it has used up `max_attempts`, or the fault quarantines the worker for
    /// the job while no other worker can take the task (it fails for good
    /// with this message rather than wait forever). `Cancelled` from a worker
    /// hands the task back without counting against the limit.
    ///
    /// # Errors
    /// `WorkerBound`, changing nothing, when the worker has a session and
    /// `owner` is not its owner.
    #[allow(clippy::too_many_arguments)]
    async fn fail(
        &self,
        worker: &WorkerId,
        owner: Option<&str>,
        task: TaskId,
        epoch: Epoch,
        fault: Fault,
        message: &str,
        max_attempts: u32,
    ) -> StoreResult<FailOutcome>;

    /// Takes back every lease past its deadline: the epoch grows (fencing the
    /// old holder) and the task is requeued, or failed after `max_attempts`.
    /// Safe to run from several coordinators at once.
    async fn reap(&self, max_attempts: u32) -> StoreResult<Vec<Reaped>>;

    /// Keeps `preview` as the latest live preview of `task` for at most
    /// `ttl`, if `worker` holds its lease under `epoch`; returns whether it
    /// was kept (a stale or unknown lease changes nothing). Atomic with the
    /// lease check; every transition that ends the lease drops the preview,
    /// so a preview lives only while its task runs. Previews never reach the
    /// result store.
    async fn put_preview(
        &self,
        worker: &WorkerId,
        task: TaskId,
        epoch: Epoch,
        preview: &Preview,
        ttl: Duration,
    ) -> StoreResult<bool>;

    /// Returns the latest live preview of a leased task: `None` when it has
    /// none, its lease ended, or its TTL ran out. A plain read.
    async fn preview(&self, task: TaskId) -> StoreResult<Option<Preview>>;

    /// Returns the job's running tasks that have a live preview, with it,
    /// in index order.
    ///
    /// # Errors
    /// `JobNotFound` for an unknown job.
    async fn previews(&self, job: JobId) -> StoreResult<Vec<(RunningTask, Preview)>> {
        let mut out = Vec::new();
        for running in self.running(job).await? {
            if let Some(p) = self.preview(running.task).await? {
                out.push((running, p));
            }
        }
        out.sort_by_key(|(r, _)| r.index);
        Ok(out)
    }

    /// Returns up to `limit` events of the job with a sequence number above `after`.
    async fn events(&self, id: JobId, after: u64, limit: usize) -> StoreResult<Vec<Event>>;

    /// Waits until the job has an event above `after`, or `timeout` passes.
    async fn wait_events(&self, id: JobId, after: u64, timeout: Duration) -> StoreResult<()>;

    /// Counts the farm in one consistent read (see [`FarmCounts`]): queued
    /// and leased tasks of running jobs and the live workers taking work, per
    /// model; jobs by state; workers by [`policy::worker_state`]. A plain
    /// read; every state appears in the maps, with zero when none is in it.
    async fn farm_counts(&self) -> StoreResult<FarmCounts>;

    /// Answers when the store is reachable, without retrying: the readiness
    /// probe's question.
    ///
    /// # Errors
    /// `Unavailable` when the backing service does not answer.
    async fn ping(&self) -> StoreResult<()>;

    /// Claims up to `max` webhook deliveries that are due (opened when their
    /// job ended, or whose retry time or claim has run out), each for `lease`:
    /// no other claim returns it before then unless it is settled. Every
    /// claim counts one more attempt.
    async fn claim_deliveries(&self, max: usize, lease: Duration) -> StoreResult<Vec<Delivery>>;

    /// Records what one claim of a delivery achieved: the `done` targets
    /// (delivered, or refused for good) leave it. With `retry_in`, the targets left are due again
    /// after it; without, the delivery is closed (all delivered, or given
    /// up). A settle under an `attempt` that is no longer the latest claim's
    /// records its deliveries only: the later claim decides the rest.
    /// Settling a closed or unknown delivery changes nothing.
    async fn settle_delivery(
        &self,
        job: JobId,
        attempt: u32,
        done: &[String],
        retry_in: Option<Duration>,
    ) -> StoreResult<()>;
}

#[cfg(test)]
pub(crate) mod conformance;
#[cfg(test)]
mod differential;
