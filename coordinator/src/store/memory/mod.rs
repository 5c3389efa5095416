//! The embedded store: the same semantics as the Redis store under one mutex,
//! nothing persisted. Used by `kiln render` and by tests.
//!
//! This module owns [`MemoryStore`] and its [`Store`] methods: each takes the
//! mutex once, which makes it atomic. The data and its indexes are in
//! `data`, the transitions in `transitions`, and the scheduling policy's
//! application in `claim` (the rules themselves: [`policy`](super::policy)).

mod claim;
mod control;
mod data;
mod transitions;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use kiln_proto::ids::{Epoch, JobId, TaskId, WorkerId};
use kiln_proto::lora_set::ReadyLoraSet;
use tokio::sync::watch;
use tokio::time::Instant;

use self::data::{JobEntry, Queued, State, TaskEntry, WorkerEntry, holds_lease, stale_reason};
use self::transitions::push_event;
use super::policy::{self, AfterFault, dedupe_key, task_batch_key};
use super::state::{
    AbandonReason, EventKind, Fault, JobState, Outcome, StateName, TaskState, WorkerState,
};
use super::types::*;
use super::{Store, StoreError, StoreResult};
use crate::clock::unix_ms;

/// The in-memory [`Store`].
pub struct MemoryStore {
    /// A std mutex is enough: no `.await` happens while it is held.
    state: Mutex<State>,
    /// Bumped whenever a task becomes claimable, to wake long-polling claims.
    work: watch::Sender<u64>,
    /// Bumped on every event, to wake watchers.
    events: watch::Sender<u64>,
    /// Origin of the store's monotonic clock, which lease deadlines use.
    /// A tokio instant, so tests can pause and advance time.
    origin: Instant,
    /// How far tests moved the store clock ahead of `origin` (for the
    /// liveness window, which is too long to wait for).
    #[cfg(test)]
    skew_ms: std::sync::atomic::AtomicU64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// Returns an empty store.
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State::default()),
            work: watch::channel(0).0,
            events: watch::channel(0).0,
            origin: Instant::now(),
            #[cfg(test)]
            skew_ms: Default::default(),
        }
    }

    fn now(&self) -> u64 {
        let now = self.origin.elapsed().as_millis() as u64;
        #[cfg(test)]
        let now = now + self.skew_ms.load(std::sync::atomic::Ordering::Relaxed);
        now
    }

    /// Moves the store clock `by` ahead: workers fall silent and leases come
    /// due as if that time had passed.
    #[cfg(test)]
    pub(crate) fn advance_clock(&self, by: Duration) {
        self.skew_ms
            .fetch_add(by.as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-done transition
        // behind that later calls would trip over any worse than the panic
        // itself, so a poisoned lock is taken over.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake_workers(&self) {
        self.work.send_modify(|v| *v += 1);
    }

    fn wake_watchers(&self) {
        self.events.send_modify(|v| *v += 1);
    }

    // The arguments of `Store::claim`, passed on as they are; `waking` for a
    // waiting claim's retries after the first try.
    #[allow(clippy::too_many_arguments)]
    fn try_claim(
        &self,
        worker: &WorkerId,
        owner: Option<&str>,
        max: usize,
        ttl: Duration,
        resident: &[String],
        ready: &[ReadyLoraSet],
        caps: &RunningCaps,
        waking: bool,
    ) -> StoreResult<Claim> {
        let now = self.now();
        let mut guard = self.lock();
        let st = &mut *guard;
        st.check_owner(worker, owner)?;
        let w = st
            .workers
            .get_mut(worker)
            .ok_or_else(|| StoreError::UnknownWorker(worker.clone()))?;
        // A waiting claim's retry is no sign of life.
        if !waking {
            w.last_seen = now;
            w.record.last_seen_ms = unix_ms();
        } else if !policy::waiting_claim_may_lease(
            now.saturating_sub(w.last_seen),
            ttl.as_millis() as u64,
        ) {
            return Ok(Claim::default());
        }
        w.resident = resident.to_vec();
        // A switch in flight ends once the worker reports the model loaded.
        if w.loading
            .as_deref()
            .is_some_and(|l| !policy::still_loading(l, resident, w.running.len()))
        {
            w.loading = None;
        }
        if w.record.draining {
            return Ok(Claim {
                drain: true,
                ..Default::default()
            });
        }
        let mut claim = Claim::default();
        st.pick(worker, max, now, ttl, caps, ready, &mut claim);
        drop(guard);
        if !claim.deduped.is_empty() {
            // A served anchor may have released its shots to other workers.
            self.wake_workers();
        }
        if !claim.leases.is_empty() || !claim.deduped.is_empty() {
            self.wake_watchers();
        }
        Ok(claim)
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn create_job(&self, new: NewJob) -> StoreResult<(JobRecord, bool)> {
        let mut st = self.lock();
        if let Some(key) = &new.idempotency_key
            && let Some(existing) = st.idempotency.get(&(new.project.clone(), key.clone()))
            && let Some(job) = st.jobs.get(existing)
        {
            return Ok((job.record.clone(), false));
        }
        let total = new.tasks.len() as u32;
        let record = JobRecord {
            id: new.id,
            name: new.name,
            project: new.project.clone(),
            priority: new.priority,
            state: JobState::Running,
            counts: TaskCounts {
                total,
                queued: total,
                ..Default::default()
            },
            created_at_ms: unix_ms(),
            finished_at_ms: None,
            idempotency_key: new.idempotency_key.clone(),
            class: new.class.clone(),
            verify_of: new.verify_of,
            paused: false,
            traceparent: new.traceparent,
            submitted_by: new.submitted_by,
        };
        let mut entry = JobEntry {
            record: record.clone(),
            tasks: Vec::with_capacity(new.tasks.len()),
            queued: Queued::default(),
            waiting: BTreeMap::new(),
            events: Vec::new(),
            blobs: new.blobs.into_iter().collect(),
            pin_class: new.pin_class,
            dedupe: new.dedupe,
            served: 0,
            faults: HashMap::new(),
            notify: new.notify,
        };
        for t in new.tasks {
            entry.tasks.push(t.id);
            match t.series.as_ref().and_then(|s| s.depends_on) {
                Some(anchor) => entry.waiting.entry(anchor).or_default().push(t.index),
                None => entry.queued.insert(&t.recipe.model, t.index),
            }
            let waits = t.series.as_ref().is_some_and(|s| s.depends_on.is_some());
            st.tasks.insert(
                t.id,
                TaskEntry {
                    batch_key: task_batch_key(&t.recipe, waits),
                    lora_set: policy::task_lora_set(&t.recipe),
                    hash: t.recipe.hash(),
                    record: TaskRecord {
                        id: t.id,
                        job: new.id,
                        index: t.index,
                        recipe: t.recipe,
                        file_name: t.file_name,
                        state: TaskState::Queued,
                        epoch: Epoch(0),
                        attempts: Vec::new(),
                        counted_from: 0,
                        step: 0,
                        result: None,
                        series: t.series,
                    },
                    deadline: None,
                    avoid: t.avoid.into_iter().collect(),
                    preview: None,
                },
            );
        }
        if let Some(key) = new.idempotency_key {
            st.idempotency.insert((new.project, key), new.id);
        }
        st.jobs.insert(new.id, entry);
        drop(st);
        self.wake_workers();
        Ok((record, true))
    }

    async fn job(&self, id: JobId) -> StoreResult<JobRecord> {
        let st = self.lock();
        st.jobs
            .get(&id)
            .map(|j| j.record.clone())
            .ok_or(StoreError::JobNotFound(id))
    }

    async fn jobs(&self, limit: usize) -> StoreResult<Vec<JobRecord>> {
        let st = self.lock();
        Ok(st
            .jobs
            .values()
            .rev()
            .take(limit)
            .map(|j| j.record.clone())
            .collect())
    }

    async fn tasks(&self, id: JobId) -> StoreResult<Vec<TaskRecord>> {
        let st = self.lock();
        let job = st.jobs.get(&id).ok_or(StoreError::JobNotFound(id))?;
        Ok(job
            .tasks
            .iter()
            .filter_map(|t| st.tasks.get(t).map(|t| t.record.clone()))
            .collect())
    }

    async fn task(&self, id: TaskId) -> StoreResult<TaskRecord> {
        let st = self.lock();
        st.tasks
            .get(&id)
            .map(|t| t.record.clone())
            .ok_or(StoreError::TaskNotFound(id))
    }

    async fn task_at(&self, job: JobId, index: u32) -> StoreResult<TaskRecord> {
        let st = self.lock();
        let entry = st.jobs.get(&job).ok_or(StoreError::JobNotFound(job))?;
        entry
            .tasks
            .get(index as usize)
            .and_then(|id| st.tasks.get(id))
            .map(|t| t.record.clone())
            .ok_or(StoreError::NoTaskAt { job, index })
    }

    async fn blobs(&self, id: JobId, sha256s: &[String]) -> StoreResult<Vec<(String, Bytes)>> {
        let st = self.lock();
        let job = st.jobs.get(&id).ok_or(StoreError::JobNotFound(id))?;
        Ok(sha256s
            .iter()
            .filter_map(|s| job.blobs.get(s).map(|b| (s.clone(), b.clone())))
            .collect())
    }

    async fn running(&self, id: JobId) -> StoreResult<Vec<RunningTask>> {
        let st = self.lock();
        if !st.jobs.contains_key(&id) {
            return Err(StoreError::JobNotFound(id));
        }
        let mut out: Vec<RunningTask> = st
            .leased
            .iter()
            .filter_map(|t| st.tasks.get(t))
            .filter(|t| t.record.job == id)
            .filter_map(|t| {
                Some(RunningTask {
                    task: t.record.id,
                    index: t.record.index,
                    step: t.record.step,
                    steps: t.record.recipe.steps,
                    worker: t.record.holder()?.clone(),
                })
            })
            .collect();
        out.sort_by_key(|r| r.index);
        Ok(out)
    }

    async fn cancel_job(&self, id: JobId) -> StoreResult<JobRecord> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let job = st.jobs.get_mut(&id).ok_or(StoreError::JobNotFound(id))?;
        if job.record.is_finished() {
            return Ok(job.record.clone());
        }
        let mut idle: Vec<u32> = job.queued.drain();
        idle.extend(std::mem::take(&mut job.waiting).into_values().flatten());
        let tasks = job.tasks.clone();
        for index in &idle {
            if let Some(t) = tasks
                .get(*index as usize)
                .and_then(|id| st.tasks.get_mut(id))
            {
                t.record.state = TaskState::Cancelled;
            }
        }
        let job = st.jobs.get_mut(&id).ok_or(StoreError::JobNotFound(id))?;
        let n_queued = job.record.counts.queued;
        job.record.counts.queued = 0;
        job.record.counts.cancelled += n_queued;
        // Mark the job first, so ending its leases below does not finish it as failed.
        job.record.state = JobState::Cancelled;
        job.record.finished_at_ms = Some(unix_ms());
        let leased: Vec<TaskId> = st
            .leased
            .iter()
            .copied()
            .filter(|t| st.tasks.get(t).is_some_and(|t| t.record.job == id))
            .collect();
        for task in leased {
            st.end_lease(
                task,
                Outcome::Cancelled,
                Some(Fault::Cancelled),
                "job cancelled",
                TaskState::Cancelled,
                EventKind::Cancelled,
                true,
            );
        }
        st.open_delivery(id);
        let job = st.jobs.get_mut(&id).ok_or(StoreError::JobNotFound(id))?;
        push_event(
            job,
            EventKind::JobFinished,
            None,
            0,
            None,
            Epoch(0),
            None,
            JobState::Cancelled.name().to_string(),
        );
        let record = job.record.clone();
        let cap_freed = std::mem::take(&mut st.cap_freed);
        drop(guard);
        if cap_freed {
            self.wake_workers();
        }
        self.wake_watchers();
        Ok(record)
    }

    async fn pause_job(&self, id: JobId, paused: bool) -> StoreResult<JobRecord> {
        let (record, changed) = self.lock().set_paused(id, paused)?;
        if changed {
            if !paused {
                self.wake_workers();
            }
            self.wake_watchers();
        }
        Ok(record)
    }

    async fn set_priority(&self, id: JobId, priority: i32) -> StoreResult<JobRecord> {
        let (record, changed) = self.lock().set_priority(id, priority)?;
        if changed {
            self.wake_workers();
            self.wake_watchers();
        }
        Ok(record)
    }

    async fn retry_job(&self, id: JobId) -> StoreResult<(JobRecord, u32)> {
        let (record, requeued) = self.lock().retry_failed(id)?;
        if requeued > 0 {
            self.wake_workers();
            self.wake_watchers();
        }
        Ok((record, requeued))
    }

    async fn usage(&self, since_day: i64) -> StoreResult<Vec<UsageRow>> {
        let st = self.lock();
        Ok(st
            .usage
            .range((since_day, String::new(), String::new())..)
            .map(|((day, project, model), usage)| UsageRow {
                day: *day,
                project: project.clone(),
                model: model.clone(),
                usage: usage.clone(),
            })
            .collect())
    }

    async fn register_worker(
        &self,
        reg: WorkerRegistration,
        owner: Option<&str>,
    ) -> StoreResult<Vec<Reaped>> {
        let now = self.now();
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut released = Vec::new();
        if let Some(old) = st.workers.get(&reg.id) {
            let silent = now.saturating_sub(old.last_seen);
            if !policy::may_register(old.owner.as_deref(), silent, owner) {
                return Err(StoreError::WorkerBound(reg.id));
            }
            let held: Vec<TaskId> = old.running.iter().copied().collect();
            for task in held {
                let Some(t) = st.tasks.get(&task) else {
                    continue;
                };
                let (job, epoch) = (t.record.job, t.record.epoch);
                let job_finished = st.end_lease(
                    task,
                    Outcome::Expired,
                    Some(Fault::WorkerLost),
                    "the worker registered again: the old session is gone",
                    TaskState::Queued,
                    EventKind::Expired,
                    true,
                );
                released.push(Reaped {
                    task,
                    job,
                    worker: reg.id.clone(),
                    epoch,
                    requeued: true,
                    job_finished,
                });
            }
        }
        let (completed, failed) = st
            .workers
            .get(&reg.id)
            .map(|w| (w.record.completed, w.record.failed))
            .unwrap_or_default();
        st.workers.insert(
            reg.id.clone(),
            WorkerEntry {
                record: WorkerRecord {
                    registration: reg,
                    draining: false,
                    last_seen_ms: unix_ms(),
                    running: Vec::new(),
                    completed,
                    failed,
                },
                owner: owner.map(str::to_string),
                running: BTreeSet::new(),
                last_seen: now,
                resident: Vec::new(),
                loading: None,
            },
        );
        // Waking claims below covers any room a released lease made.
        st.cap_freed = false;
        drop(guard);
        self.wake_workers();
        if !released.is_empty() {
            self.wake_watchers();
        }
        Ok(released)
    }

    async fn workers(&self) -> StoreResult<Vec<WorkerRecord>> {
        let st = self.lock();
        Ok(st
            .workers
            .values()
            .map(|w| {
                let mut r = w.record.clone();
                r.running = w.running.iter().copied().collect();
                r
            })
            .collect())
    }

    async fn drain_worker(&self, id: &WorkerId) -> StoreResult<WorkerRecord> {
        let mut st = self.lock();
        let w = st
            .workers
            .get_mut(id)
            .ok_or_else(|| StoreError::UnknownWorker(id.clone()))?;
        w.record.draining = true;
        let mut r = w.record.clone();
        r.running = w.running.iter().copied().collect();
        Ok(r)
    }

    async fn live_workers(&self) -> StoreResult<Vec<LiveWorker>> {
        let now = self.now();
        Ok(self.lock().live_workers(now))
    }

    async fn pinned_tasks(&self) -> StoreResult<Vec<PinnedTasks>> {
        let st = self.lock();
        let mut pins: BTreeMap<(String, String), PinnedTasks> = BTreeMap::new();
        fn pin<'a>(
            pins: &'a mut BTreeMap<(String, String), PinnedTasks>,
            model: &str,
            hash: &str,
        ) -> &'a mut PinnedTasks {
            pins.entry((model.to_string(), hash.to_string()))
                .or_insert_with(|| PinnedTasks {
                    model: model.to_string(),
                    hash: hash.to_string(),
                    queued: 0,
                    running: 0,
                })
        }
        for job in st.jobs.values() {
            if job.record.state != JobState::Running {
                continue;
            }
            for (model, indices) in &job.queued.by_model {
                // One hash per (job, model): the first task's (see the trait).
                let first = indices
                    .first()
                    .and_then(|i| job.tasks.get(*i as usize))
                    .and_then(|id| st.tasks.get(id));
                if let Some(t) = first {
                    pin(&mut pins, model, &t.record.recipe.model_hash).queued +=
                        indices.len() as u32;
                }
            }
        }
        for t in st.leased.iter().filter_map(|id| st.tasks.get(id)) {
            let r = &t.record.recipe;
            pin(&mut pins, &r.model, &r.model_hash).running += 1;
        }
        Ok(pins.into_values().collect())
    }

    async fn fail_unheld(&self, model: &str, hash: &str, message: &str) -> StoreResult<Unheld> {
        let now = self.now();
        let mut guard = self.lock();
        let st = &mut *guard;
        let held = identities(&st.live_workers(now))
            .iter()
            .any(|m| m.name == model && m.is_held(hash));
        let mut out = Unheld::default();
        if held {
            return Ok(out);
        }
        let jobs: Vec<JobId> = st.jobs.keys().copied().collect();
        for job_id in jobs {
            if let Some(done) = st.fail_queued_of(job_id, model, hash, message, &mut out.failed) {
                out.finished.push(done);
            }
        }
        drop(guard);
        if out.failed > 0 {
            self.wake_watchers();
        }
        Ok(out)
    }

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
    ) -> StoreResult<Claim> {
        let deadline = Instant::now() + wait;
        let mut rx = self.work.subscribe();
        let mut waking = false;
        loop {
            rx.borrow_and_update();
            let claim = self.try_claim(worker, owner, max, ttl, resident, ready, caps, waking)?;
            if !claim.leases.is_empty() || !claim.deduped.is_empty() || claim.drain || max == 0 {
                return Ok(claim);
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Ok(claim);
            }
            waking = true;
        }
    }

    async fn heartbeat(
        &self,
        worker: &WorkerId,
        owner: Option<&str>,
        progress: &[ProgressReport],
        ttl: Duration,
    ) -> StoreResult<HeartbeatOutcome> {
        let now = self.now();
        let mut guard = self.lock();
        let st = &mut *guard;
        st.check_owner(worker, owner)?;
        let w = st
            .workers
            .get_mut(worker)
            .ok_or_else(|| StoreError::UnknownWorker(worker.clone()))?;
        w.last_seen = now;
        w.record.last_seen_ms = unix_ms();
        let mut out = HeartbeatOutcome {
            drain: w.record.draining,
            ..Default::default()
        };
        for p in progress {
            match st.tasks.get_mut(&p.task) {
                Some(t) if holds_lease(&t.record, worker, p.epoch) => {
                    t.deadline = Some(now + ttl.as_millis() as u64);
                    t.record.step = p.step.min(t.record.recipe.steps);
                    out.extended.push(p.task);
                }
                Some(t) if t.record.state == TaskState::Cancelled => {
                    out.abandon
                        .push((p.task, p.epoch, AbandonReason::Cancelled));
                }
                _ => out
                    .abandon
                    .push((p.task, p.epoch, AbandonReason::LeaseLost)),
            }
        }
        Ok(out)
    }

    async fn put_preview(
        &self,
        worker: &WorkerId,
        task: TaskId,
        epoch: Epoch,
        preview: &Preview,
        ttl: Duration,
    ) -> StoreResult<bool> {
        let until = self.now() + ttl.as_millis() as u64;
        let mut st = self.lock();
        match st.tasks.get_mut(&task) {
            Some(t) if holds_lease(&t.record, worker, epoch) => {
                t.preview = Some((preview.clone(), until));
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn preview(&self, task: TaskId) -> StoreResult<Option<Preview>> {
        let now = self.now();
        let st = self.lock();
        Ok(st.tasks.get(&task).and_then(|t| match &t.preview {
            Some((p, until)) if t.record.state == TaskState::Leased && now < *until => {
                Some(p.clone())
            }
            _ => None,
        }))
    }

    async fn complete(
        &self,
        worker: &WorkerId,
        owner: Option<&str>,
        task: TaskId,
        epoch: Epoch,
        mut result: TaskResult,
    ) -> StoreResult<CompleteOutcome> {
        let mut guard = self.lock();
        let st = &mut *guard;
        st.check_owner(worker, owner)?;
        let class = st
            .workers
            .get(worker)
            .map(|w| w.record.registration.determinism_class.clone())
            .unwrap_or_default();
        let t = st
            .tasks
            .get_mut(&task)
            .ok_or(StoreError::TaskNotFound(task))?;
        // A retried completion whose first answer was lost: accepted again, nothing changes.
        let replay = t.record.state == TaskState::Completed
            && t.record.epoch == epoch
            && t.record
                .attempts
                .last()
                .is_some_and(|a| &a.worker == worker);
        if replay {
            return Ok(CompleteOutcome::Accepted { job_finished: None });
        }
        if !holds_lease(&t.record, worker, epoch) {
            let reason = stale_reason(&t.record, worker, epoch);
            let (job, index) = (t.record.job, t.record.index);
            if let Some(j) = st.jobs.get_mut(&job) {
                push_event(
                    j,
                    EventKind::StaleRefused,
                    Some(task),
                    index,
                    Some(worker),
                    epoch,
                    None,
                    reason.clone(),
                );
            }
            drop(guard);
            self.wake_watchers();
            return Ok(CompleteOutcome::Stale { reason });
        }
        result.class = class.clone();
        t.record.step = t.record.recipe.steps;
        t.record.result = Some(result.clone());
        let (job_id, index, hash, file) = (
            t.record.job,
            t.record.index,
            t.hash.clone(),
            t.record.file_name.clone(),
        );
        if let Some(job) = st.jobs.get(&job_id)
            && job.dedupe
        {
            let mut remembered = result.clone();
            remembered.object = crate::results::image_path(&job_id.to_string(), &file).to_string();
            st.results
                .entry(job.record.project.clone())
                .or_default()
                .insert(dedupe_key(&hash, &class), remembered);
        }
        let released = st.release_dependents(job_id, index, &result);
        let job_finished = st.end_lease(
            task,
            Outcome::Completed,
            None,
            "",
            TaskState::Completed,
            EventKind::Completed,
            false,
        );
        let cap_freed = std::mem::take(&mut st.cap_freed);
        drop(guard);
        // Only released shots and a capped project's freed room are new
        // work; waking every waiting claim for each completion would make
        // them all run for nothing.
        if released || cap_freed {
            self.wake_workers();
        }
        self.wake_watchers();
        Ok(CompleteOutcome::Accepted { job_finished })
    }

    async fn fail(
        &self,
        worker: &WorkerId,
        owner: Option<&str>,
        task: TaskId,
        epoch: Epoch,
        fault: Fault,
        message: &str,
        max_attempts: u32,
    ) -> StoreResult<FailOutcome> {
        let mut guard = self.lock();
        let st = &mut *guard;
        st.check_owner(worker, owner)?;
        let t = st.tasks.get(&task).ok_or(StoreError::TaskNotFound(task))?;
        if !holds_lease(&t.record, worker, epoch) {
            return Ok(FailOutcome::Stale {
                reason: stale_reason(&t.record, worker, epoch),
            });
        }
        let handback = fault == Fault::Cancelled;
        // This failure counts once it is recorded: faults() + 1.
        let used = t.record.faults() + usize::from(!handback);
        let job = st
            .jobs
            .get(&t.record.job)
            .ok_or(StoreError::JobNotFound(t.record.job))?;
        let job_faults = job.faults.get(worker).copied().unwrap_or(0) + 1;
        let now = self.now();
        let after = policy::retry_after_fault(
            fault,
            used,
            max_attempts,
            policy::quarantined(job_faults),
            || st.stand_in_exists(job, t, worker, false, now),
        );
        let (outcome, to, note) = match after {
            AfterFault::HandBack => (
                Outcome::Cancelled,
                TaskState::Queued,
                format!("{message} (will retry)"),
            ),
            AfterFault::Retry => (
                Outcome::Failed,
                TaskState::Queued,
                format!("{message} (will retry)"),
            ),
            AfterFault::Exhausted => (
                Outcome::Failed,
                TaskState::Failed,
                format!("{message} (no retry: {used} of {max_attempts} attempts used)"),
            ),
            AfterFault::Stranded => (
                Outcome::Failed,
                TaskState::Failed,
                format!(
                    "{message} (no retry: {worker} is quarantined for this job and no other worker can take the task)"
                ),
            ),
        };
        let will_retry = to == TaskState::Queued;
        let job_finished = st.end_lease(
            task,
            outcome,
            Some(fault),
            &note,
            to,
            EventKind::Failed,
            false,
        );
        let cap_freed = std::mem::take(&mut st.cap_freed);
        drop(guard);
        if will_retry || cap_freed {
            self.wake_workers();
        }
        self.wake_watchers();
        Ok(FailOutcome::Recorded {
            will_retry,
            job_finished,
        })
    }

    async fn reap(&self, max_attempts: u32) -> StoreResult<Vec<Reaped>> {
        let now = self.now();
        let mut guard = self.lock();
        let st = &mut *guard;
        let expired: Vec<TaskId> = st
            .leased
            .iter()
            .copied()
            .filter(|t| {
                st.tasks
                    .get(t)
                    .and_then(|t| t.deadline)
                    .is_some_and(|d| d <= now)
            })
            .collect();
        let mut reaped = Vec::with_capacity(expired.len());
        for task in expired {
            let Some(t) = st.tasks.get(&task) else {
                continue;
            };
            let (job, epoch) = (t.record.job, t.record.epoch);
            let Some(worker) = t.record.holder().cloned() else {
                continue;
            };
            let requeued = t.record.faults() + 1 < max_attempts as usize;
            let to = if requeued {
                TaskState::Queued
            } else {
                TaskState::Failed
            };
            let job_finished = st.end_lease(
                task,
                Outcome::Expired,
                Some(Fault::WorkerLost),
                "lease expired: no heartbeat before the deadline",
                to,
                EventKind::Expired,
                true,
            );
            reaped.push(Reaped {
                task,
                job,
                worker,
                epoch,
                requeued,
                job_finished,
            });
        }
        // Waking claims below covers any room an expired lease made.
        st.cap_freed = false;
        drop(guard);
        if !reaped.is_empty() {
            self.wake_workers();
            self.wake_watchers();
        }
        Ok(reaped)
    }

    async fn events(&self, id: JobId, after: u64, limit: usize) -> StoreResult<Vec<Event>> {
        let st = self.lock();
        let job = st.jobs.get(&id).ok_or(StoreError::JobNotFound(id))?;
        let start = (after as usize).min(job.events.len());
        Ok(job.events[start..].iter().take(limit).cloned().collect())
    }

    async fn wait_events(&self, id: JobId, after: u64, timeout: Duration) -> StoreResult<()> {
        let deadline = Instant::now() + timeout;
        let mut rx = self.events.subscribe();
        loop {
            rx.borrow_and_update();
            {
                let st = self.lock();
                let job = st.jobs.get(&id).ok_or(StoreError::JobNotFound(id))?;
                if job.events.len() as u64 > after {
                    return Ok(());
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Ok(());
            }
        }
    }

    async fn farm_counts(&self) -> StoreResult<FarmCounts> {
        let now = self.now();
        let st = self.lock();
        let mut counts = FarmCounts {
            jobs: JobState::ALL.iter().map(|s| (*s, 0)).collect(),
            workers: WorkerState::ALL.iter().map(|s| (*s, 0)).collect(),
            ..FarmCounts::default()
        };
        for job in st.jobs.values() {
            *counts.jobs.entry(job.record.state).or_default() += 1;
            if job.record.state != JobState::Running {
                continue;
            }
            for id in &job.tasks {
                let Some(task) = st.tasks.get(id) else {
                    continue;
                };
                let load = counts
                    .models
                    .entry(task.record.recipe.model.clone())
                    .or_default();
                match task.record.state {
                    TaskState::Queued => load.queued += 1,
                    TaskState::Leased => load.running += 1,
                    _ => {}
                }
            }
        }
        for w in st.workers.values() {
            let state = policy::worker_state(
                now.saturating_sub(w.last_seen),
                w.record.draining,
                w.running.len(),
            );
            *counts.workers.entry(state).or_default() += 1;
            if matches!(state, WorkerState::Idle | WorkerState::Busy) {
                for m in &w.record.registration.models {
                    counts.models.entry(m.name.clone()).or_default().workers += 1;
                }
            }
        }
        Ok(counts)
    }

    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }

    async fn claim_deliveries(&self, max: usize, lease: Duration) -> StoreResult<Vec<Delivery>> {
        let now = unix_ms() as u64;
        let mut st = self.lock();
        let mut due: Vec<(u64, JobId)> = st
            .outbox
            .iter()
            .filter(|(_, o)| o.due <= now)
            .map(|(job, o)| (o.due, *job))
            .collect();
        // The longest-waiting first, as Redis orders its outbox by due time.
        due.sort();
        let mut out = Vec::new();
        for (_, job) in due.into_iter().take(max) {
            if let Some(o) = st.outbox.get_mut(&job) {
                o.attempt += 1;
                o.due = now + lease.as_millis() as u64;
                out.push(Delivery {
                    job,
                    attempt: o.attempt,
                    pending: o.pending.clone(),
                    age: Duration::from_millis(now.saturating_sub(o.ended)),
                });
            }
        }
        Ok(out)
    }

    async fn settle_delivery(
        &self,
        job: JobId,
        attempt: u32,
        done: &[String],
        retry_in: Option<Duration>,
    ) -> StoreResult<()> {
        let now = unix_ms() as u64;
        let mut st = self.lock();
        let Some(o) = st.outbox.get_mut(&job) else {
            return Ok(());
        };
        o.pending.retain(|t| !done.contains(t));
        let latest = o.attempt == attempt;
        match retry_in {
            _ if o.pending.is_empty() => {
                st.outbox.remove(&job);
            }
            _ if !latest => {}
            Some(wait) => o.due = now + wait.as_millis() as u64,
            None => {
                st.outbox.remove(&job);
            }
        }
        Ok(())
    }
}
