//! The embedded store: the same semantics as the Redis store under one mutex,
//! nothing persisted. Used by `kiln render` and by tests.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use kiln_proto::ids::{Epoch, JobId, TaskId, WorkerId};
use tokio::sync::watch;
use tokio::time::Instant;

use super::policy::{
    LIVE_MS, MAX_DEDUPED_PER_CLAIM, QUARANTINE_AFTER, batch_key, dedupe_key, switch_justified,
};
use super::state::{AbandonReason, EventKind, Fault, JobState, Outcome, TaskState};
use super::types::*;
use super::{Store, StoreError, StoreResult};

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
}

#[derive(Default)]
struct State {
    jobs: BTreeMap<JobId, JobEntry>,
    tasks: HashMap<TaskId, TaskEntry>,
    /// Tasks in the Leased state, so the reaper scans only those.
    leased: BTreeSet<TaskId>,
    idempotency: HashMap<(String, String), JobId>,
    workers: BTreeMap<WorkerId, WorkerEntry>,
    models: BTreeMap<String, ModelInfo>,
    /// Fair-share clock: bumped every time a job is served.
    served: u64,
    /// When each project was last served.
    project_served: HashMap<String, u64>,
    /// Earlier results by project, then dedupe key (recipe hash and class).
    results: HashMap<String, HashMap<String, TaskResult>>,
}

struct JobEntry {
    record: JobRecord,
    /// Task ids in index order.
    tasks: Vec<TaskId>,
    /// Queued, claimable tasks.
    queued: Queued,
    /// Shots waiting for their anchor: anchor index -> shot indices.
    waiting: BTreeMap<u32, Vec<u32>>,
    events: Vec<Event>,
    blobs: HashMap<String, Bytes>,
    pin_class: bool,
    dedupe: bool,
    /// When this job was last served.
    served: u64,
    /// Faults per worker, for quarantine.
    faults: HashMap<WorkerId, u32>,
}

/// A job's claimable tasks by model, in item order, so a claim looks at the
/// first task of each model instead of scanning the whole queue.
#[derive(Default)]
struct Queued {
    by_model: BTreeMap<String, BTreeSet<u32>>,
}

impl Queued {
    fn insert(&mut self, model: &str, index: u32) {
        self.by_model
            .entry(model.to_string())
            .or_default()
            .insert(index);
    }

    fn remove(&mut self, model: &str, index: u32) {
        if let Some(set) = self.by_model.get_mut(model) {
            set.remove(&index);
            if set.is_empty() {
                self.by_model.remove(model);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.by_model.is_empty()
    }

    fn len_of(&self, model: &str) -> usize {
        self.by_model.get(model).map_or(0, BTreeSet::len)
    }

    /// Removes and returns every queued index.
    fn drain(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.by_model)
            .into_values()
            .flatten()
            .collect()
    }
}

struct TaskEntry {
    record: TaskRecord,
    /// The recipe's hash, cached: dedupe looks it up on every claim.
    hash: String,
    /// Lease deadline on the store clock, in ms since `origin`.
    deadline: Option<u64>,
    /// Workers that failed this task: it is retried elsewhere when possible.
    avoid: BTreeSet<WorkerId>,
}

struct WorkerEntry {
    record: WorkerRecord,
    running: BTreeSet<TaskId>,
    /// Last call on the store clock.
    last_seen: u64,
    /// Models loaded at the last claim.
    resident: Vec<String>,
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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
        }
    }

    fn now(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
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

    fn try_claim(
        &self,
        worker: &WorkerId,
        max: usize,
        ttl: Duration,
        resident: &[String],
    ) -> StoreResult<Claim> {
        let now = self.now();
        let mut guard = self.lock();
        let st = &mut *guard;
        let w = st
            .workers
            .get_mut(worker)
            .ok_or_else(|| StoreError::UnknownWorker(worker.clone()))?;
        w.last_seen = now;
        w.record.last_seen_ms = unix_ms();
        w.resident = resident.to_vec();
        if w.record.draining {
            return Ok(Claim {
                drain: true,
                ..Default::default()
            });
        }
        let mut claim = Claim::default();
        let picked = st.pick(worker, max, now, &mut claim);
        for task_id in picked {
            claim.leases.extend(st.lease(task_id, worker, now, ttl));
        }
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

/// A worker's view for the policy.
struct Asker<'a> {
    id: &'a WorkerId,
    class: String,
    /// Catalog: model name -> hash.
    models: HashMap<String, String>,
    /// Resident models; the whole catalog when the worker reports none.
    resident: BTreeSet<String>,
}

impl State {
    /// Returns true if `asker` may take tasks of `job` at all.
    fn job_allows(&self, job: &JobEntry, asker: &Asker<'_>, now: u64) -> bool {
        if job.record.state != JobState::Running {
            return false;
        }
        if let Some(class) = &job.record.class
            && (job.pin_class || job.record.verify_of.is_some())
            && *class != asker.class
        {
            return false;
        }
        let quarantined = job
            .faults
            .get(asker.id)
            .is_some_and(|n| *n >= QUARANTINE_AFTER);
        !(quarantined && self.other_worker_for_job(job, asker.id, now))
    }

    /// Returns true when a live worker other than `not` may take the job's tasks.
    fn other_worker_for_job(&self, job: &JobEntry, not: &WorkerId, now: u64) -> bool {
        self.workers.values().any(|w| {
            let id = &w.record.registration.id;
            id != not
                && !w.record.draining
                && now.saturating_sub(w.last_seen) < LIVE_MS
                && job.faults.get(id).is_none_or(|n| *n < QUARANTINE_AFTER)
                && job
                    .record
                    .class
                    .as_ref()
                    .is_none_or(|c| !job.pin_class || *c == w.record.registration.determinism_class)
        })
    }

    /// Returns true if `asker` may take this task (model, hash, avoid list).
    fn task_allows(&self, task: &TaskEntry, asker: &Asker<'_>, now: u64) -> bool {
        let job_class = self
            .jobs
            .get(&task.record.job)
            .and_then(|j| j.record.class.clone().filter(|_| j.pin_class));
        let r = &task.record.recipe;
        let Some(hash) = asker.models.get(&r.model) else {
            return false;
        };
        if !r.model_hash.is_empty() && *hash != r.model_hash {
            return false;
        }
        !(task.avoid.contains(asker.id)
            && self.someone_else_can(task, asker.id, job_class.as_deref(), now))
    }

    /// Returns true when a live, non-draining worker other than `worker`,
    /// not in the task's avoid list and of the job's pinned class if any,
    /// holds the task's model.
    fn someone_else_can(
        &self,
        task: &TaskEntry,
        worker: &WorkerId,
        class: Option<&str>,
        now: u64,
    ) -> bool {
        self.workers.values().any(|w| {
            let id = &w.record.registration.id;
            id != worker
                && !w.record.draining
                && class.is_none_or(|c| c == w.record.registration.determinism_class)
                && now.saturating_sub(w.last_seen) < LIVE_MS
                && !task.avoid.contains(id)
                && w.record
                    .registration
                    .models
                    .iter()
                    .any(|m| m.name == task.record.recipe.model)
        })
    }

    /// Jobs in policy order: priority, then least recently served project,
    /// then least recently served job, then age.
    fn job_order(&self) -> Vec<JobId> {
        let mut jobs: Vec<&JobEntry> = self
            .jobs
            .values()
            .filter(|j| j.record.state == JobState::Running && !j.queued.is_empty())
            .collect();
        jobs.sort_by_key(|j| {
            (
                std::cmp::Reverse(j.record.priority),
                self.project_served
                    .get(&j.record.project)
                    .copied()
                    .unwrap_or(0),
                j.served,
                j.record.id,
            )
        });
        jobs.into_iter().map(|j| j.record.id).collect()
    }

    /// Chooses up to `max` tasks for `worker` (see [`super::policy`]);
    /// completes deduplicated tasks into `claim` on the way.
    fn pick(&mut self, worker: &WorkerId, max: usize, now: u64, claim: &mut Claim) -> Vec<TaskId> {
        let Some(w) = self.workers.get(worker) else {
            return Vec::new();
        };
        let reg = &w.record.registration;
        let models: HashMap<String, String> = reg
            .models
            .iter()
            .map(|m| (m.name.clone(), m.hash.clone()))
            .collect();
        let resident: BTreeSet<String> = if w.resident.is_empty() {
            models.keys().cloned().collect()
        } else {
            w.resident.iter().cloned().collect()
        };
        let asker = Asker {
            id: worker,
            class: reg.determinism_class.clone(),
            models,
            resident,
        };
        let mut deduped = 0;
        // (priority, task, model) of the first claimable task overall, and of
        // the first one for a resident model, in policy order.
        let mut first_choice: Option<(i32, TaskId, String)> = None;
        let mut first_resident: Option<(i32, TaskId, String)> = None;
        'jobs: for job_id in self.job_order() {
            let Some(job) = self.jobs.get(&job_id) else {
                continue;
            };
            if !self.job_allows(job, &asker, now) {
                continue;
            }
            let priority = job.record.priority;
            let held: Vec<String> = job
                .queued
                .by_model
                .keys()
                .filter(|m| asker.models.contains_key(*m))
                .cloned()
                .collect();
            // The first claimable task of each model the worker holds, in item order.
            let mut heads: Vec<(u32, TaskId, String)> = Vec::new();
            for model in held {
                loop {
                    let next = self.jobs.get(&job_id).and_then(|j| {
                        let set = j.queued.by_model.get(&model)?;
                        set.iter()
                            .filter_map(|i| Some((*i, *j.tasks.get(*i as usize)?)))
                            .find(|(_, id)| {
                                self.tasks
                                    .get(id)
                                    .is_some_and(|t| self.task_allows(t, &asker, now))
                            })
                    });
                    let Some((index, id)) = next else { break };
                    if deduped < MAX_DEDUPED_PER_CLAIM && self.try_dedupe(id, &asker.class, claim) {
                        deduped += 1;
                        continue;
                    }
                    heads.push((index, id, model.clone()));
                    break;
                }
            }
            heads.sort();
            for (_, id, model) in heads {
                let resident = asker.resident.contains(&model);
                if first_choice.is_none() {
                    first_choice = Some((priority, id, model.clone()));
                }
                if resident {
                    first_resident = Some((priority, id, model));
                    break 'jobs;
                }
            }
        }
        // Model affinity: keep to resident models unless the best work is
        // for another model at a higher priority and a switch is justified.
        let chosen = match (first_resident, first_choice) {
            // Equal or better resident work: keep to it, unless the first
            // choice's model has waiting work and no live worker holds it
            // (it would starve behind the resident models).
            (Some(r), Some(c)) if r.0 >= c.0 => {
                if c.1 != r.1 && self.resident_holders(&c.2, worker, now) == 0 {
                    Some(c.1)
                } else {
                    Some(r.1)
                }
            }
            (resident_choice, Some(c)) => {
                let backlog = self.backlog(&c.2);
                let holders = self.resident_holders(&c.2, worker, now);
                if switch_justified(backlog, holders) {
                    Some(c.1)
                } else {
                    resident_choice.map(|r| r.1)
                }
            }
            (_, None) => None,
        };
        let Some(first) = chosen else {
            return Vec::new();
        };
        let mut out = vec![first];
        if max > 1 {
            self.fill(first, max, &asker, now, &mut out);
        }
        out
    }

    /// Fills free slots after `first`: tasks that share its UNet batch, then
    /// other tasks for the same model, in policy order.
    fn fill(&self, first: TaskId, max: usize, asker: &Asker<'_>, now: u64, out: &mut Vec<TaskId>) {
        let Some(first_task) = self.tasks.get(&first) else {
            return;
        };
        let key = batch_key(&first_task.record.recipe);
        let model = first_task.record.recipe.model.clone();
        let order = self.job_order();
        for same_batch in [true, false] {
            for job_id in &order {
                let Some(job) = self.jobs.get(job_id) else {
                    continue;
                };
                if !self.job_allows(job, asker, now) {
                    continue;
                }
                let Some(set) = job.queued.by_model.get(&model) else {
                    continue;
                };
                for index in set {
                    if out.len() >= max {
                        return;
                    }
                    let Some(task) = job
                        .tasks
                        .get(*index as usize)
                        .and_then(|t| self.tasks.get(t))
                    else {
                        continue;
                    };
                    let id = task.record.id;
                    let fits = !same_batch || batch_key(&task.record.recipe) == key;
                    if fits && !out.contains(&id) && self.task_allows(task, asker, now) {
                        out.push(id);
                    }
                }
            }
        }
    }

    /// Returns the number of claimable tasks for `model` across running jobs.
    fn backlog(&self, model: &str) -> usize {
        self.jobs
            .values()
            .filter(|j| j.record.state == JobState::Running)
            .map(|j| j.queued.len_of(model))
            .sum()
    }

    /// Returns how many live workers other than `not` have `model` resident.
    fn resident_holders(&self, model: &str, not: &WorkerId, now: u64) -> usize {
        self.workers
            .values()
            .filter(|w| {
                &w.record.registration.id != not
                    && !w.record.draining
                    && now.saturating_sub(w.last_seen) < LIVE_MS
                    && if w.resident.is_empty() {
                        w.record.registration.models.iter().any(|m| m.name == model)
                    } else {
                        w.resident.iter().any(|m| m == model)
                    }
            })
            .count()
    }

    /// Completes a dedupable task from an earlier result of the same recipe
    /// and class in the project; returns false when there is none.
    fn try_dedupe(&mut self, task_id: TaskId, class: &str, claim: &mut Claim) -> bool {
        let Some(task) = self.tasks.get(&task_id) else {
            return false;
        };
        let job_id = task.record.job;
        let Some(job) = self.jobs.get(&job_id) else {
            return false;
        };
        if !job.dedupe {
            return false;
        }
        let Some(earlier) = self
            .results
            .get(&job.record.project)
            .and_then(|r| r.get(&format!("{}|{class}", task.hash)))
            .cloned()
        else {
            return false;
        };
        let (index, file_name) = (task.record.index, task.record.file_name.clone());
        let model = task.record.recipe.model.clone();
        let source = earlier.object.clone();
        if let Some(t) = self.tasks.get_mut(&task_id) {
            t.record.state = TaskState::Completed;
            t.record.step = t.record.recipe.steps;
            t.record.result = Some(earlier.clone());
        }
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return false;
        };
        job.queued.remove(&model, index);
        job.record
            .counts
            .shift(TaskState::Queued, TaskState::Completed);
        if job.record.class.is_none() && job.pin_class {
            job.record.class = Some(class.to_string());
        }
        push_event(
            job,
            EventKind::Completed,
            Some(task_id),
            index,
            None,
            Epoch(0),
            None,
            format!("served from an earlier render of the same recipe ({source})"),
        );
        self.release_dependents(job_id, index, &earlier);
        claim.deduped.push(Deduped {
            task: task_id,
            job: job_id,
            file_name,
            source,
        });
        if let Some(job) = self.jobs.get_mut(&job_id)
            && let Some(done) = finish_if_done(job)
        {
            claim.finished.push(done);
        }
        true
    }

    /// Leases one task to `worker` under a new epoch.
    fn lease(
        &mut self,
        task_id: TaskId,
        worker: &WorkerId,
        now: u64,
        ttl: Duration,
    ) -> Option<Lease> {
        let class = self
            .workers
            .get(worker)
            .map(|w| w.record.registration.determinism_class.clone())
            .unwrap_or_default();
        let t = self.tasks.get_mut(&task_id)?;
        let epoch = t.record.epoch.next();
        t.record.epoch = epoch;
        t.record.state = TaskState::Leased;
        t.record.step = 0;
        t.record.attempts.push(Attempt {
            worker: worker.clone(),
            epoch,
            started_at_ms: unix_ms(),
            ended_at_ms: None,
            outcome: Outcome::Running,
            fault: None,
            message: String::new(),
        });
        t.deadline = Some(now + ttl.as_millis() as u64);
        let (job_id, index, recipe) = (t.record.job, t.record.index, t.record.recipe.clone());
        let anchor = t.record.series.as_ref().and_then(|s| s.depends_on);
        self.leased.insert(task_id);
        if let Some(w) = self.workers.get_mut(worker) {
            w.running.insert(task_id);
        }
        self.served += 1;
        let served = self.served;
        let job = self.jobs.get_mut(&job_id)?;
        job.queued.remove(&recipe.model, index);
        job.record
            .counts
            .shift(TaskState::Queued, TaskState::Leased);
        job.served = served;
        if job.record.class.is_none() && job.pin_class {
            job.record.class = Some(class);
        }
        let project = job.record.project.clone();
        push_event(
            job,
            EventKind::Leased,
            Some(task_id),
            index,
            Some(worker),
            epoch,
            None,
            String::new(),
        );
        self.project_served.insert(project, served);
        Some(Lease {
            task: task_id,
            job: job_id,
            index,
            epoch,
            recipe,
            ttl,
            anchor,
        })
    }

    /// Queues the shots waiting for `anchor` with its image as their init
    /// image; returns true if there were any.
    fn release_dependents(&mut self, job_id: JobId, anchor: u32, result: &TaskResult) -> bool {
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return false;
        };
        let shots = job.waiting.remove(&anchor).unwrap_or_default();
        let ids: Vec<(u32, TaskId)> = shots
            .iter()
            .filter_map(|i| Some((*i, *job.tasks.get(*i as usize)?)))
            .collect();
        let mut released = false;
        for (index, id) in ids {
            let Some(t) = self.tasks.get_mut(&id) else {
                continue;
            };
            t.record.recipe.init_image = Some(result.sha256.clone());
            t.hash = t.record.recipe.hash();
            let model = t.record.recipe.model.clone();
            if let Some(job) = self.jobs.get_mut(&job_id) {
                job.queued.insert(&model, index);
            }
            released = true;
        }
        released
    }

    /// Ends the shots waiting for `anchor`, which failed for good or was cancelled.
    fn end_dependents(&mut self, job_id: JobId, anchor: u32, to: TaskState, why: &str) {
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        let shots = job.waiting.remove(&anchor).unwrap_or_default();
        for index in shots {
            let Some(id) = job.tasks.get(index as usize).copied() else {
                continue;
            };
            job.record.counts.shift(TaskState::Queued, to);
            if let Some(t) = self.tasks.get_mut(&id) {
                t.record.state = to;
            }
            push_event(
                job,
                if to == TaskState::Cancelled {
                    EventKind::Cancelled
                } else {
                    EventKind::Failed
                },
                Some(id),
                index,
                None,
                Epoch(0),
                Some(Fault::BadInput),
                why.to_string(),
            );
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn push_event(
    job: &mut JobEntry,
    kind: EventKind,
    task: Option<TaskId>,
    index: u32,
    worker: Option<&WorkerId>,
    epoch: Epoch,
    fault: Option<Fault>,
    message: String,
) {
    let seq = job.events.len() as u64 + 1;
    job.events.push(Event {
        seq,
        at_ms: unix_ms(),
        kind,
        task,
        index,
        worker: worker.cloned(),
        epoch,
        fault,
        message,
    });
}

/// Ends the job if no task is queued or leased; returns it when it ended now.
fn finish_if_done(job: &mut JobEntry) -> Option<JobRecord> {
    if job.record.state != JobState::Running || !job.record.counts.all_ended() {
        return None;
    }
    let c = job.record.counts;
    job.record.state = if c.failed == 0 && c.cancelled == 0 {
        JobState::Completed
    } else {
        JobState::Failed
    };
    job.record.finished_at_ms = Some(unix_ms());
    let message = job.record.state.name().to_string();
    push_event(
        job,
        EventKind::JobFinished,
        None,
        0,
        None,
        Epoch(0),
        None,
        message,
    );
    Some(job.record.clone())
}

/// Describes why (worker, epoch) no longer holds the task.
fn stale_reason(task: &TaskRecord, worker: &WorkerId, epoch: Epoch) -> String {
    match task.state {
        TaskState::Cancelled => "the job was cancelled".to_string(),
        TaskState::Completed => format!(
            "task already completed under epoch {} (this report: epoch {epoch})",
            task.epoch
        ),
        TaskState::Failed => "the task already failed for good".to_string(),
        TaskState::Leased if task.epoch != epoch => format!(
            "lease lost: epoch {epoch} < {} (the lease expired and the task went to {})",
            task.epoch,
            task.holder()
                .map(|w| w.as_str())
                .unwrap_or("another worker")
        ),
        TaskState::Leased => format!(
            "lease held by {}, not {worker}",
            task.holder().map(|w| w.as_str()).unwrap_or("nobody")
        ),
        TaskState::Queued => format!(
            "lease lost: epoch {epoch} expired and the task is queued again (epoch {})",
            task.epoch
        ),
    }
}

/// Returns true if `worker` holds `task` under `epoch`.
fn holds_lease(task: &TaskRecord, worker: &WorkerId, epoch: Epoch) -> bool {
    task.state == TaskState::Leased && task.epoch == epoch && task.holder() == Some(worker)
}

impl State {
    /// Ends the running attempt of a leased task and moves it to `to`.
    /// Returns the job record if the job ended with it.
    #[allow(clippy::too_many_arguments)]
    fn end_lease(
        &mut self,
        task_id: TaskId,
        outcome: Outcome,
        fault: Option<Fault>,
        message: &str,
        to: TaskState,
        event: EventKind,
        bump_epoch: bool,
    ) -> Option<JobRecord> {
        let t = self.tasks.get_mut(&task_id)?;
        let worker = t.record.holder().cloned();
        if let Some(a) = t.record.attempts.last_mut() {
            a.outcome = outcome;
            a.fault = fault;
            a.message = message.to_string();
            a.ended_at_ms = Some(unix_ms());
        }
        let old_epoch = t.record.epoch;
        if bump_epoch {
            t.record.epoch = t.record.epoch.next();
        }
        t.record.state = to;
        t.deadline = None;
        if outcome.is_fault()
            && let Some(w) = &worker
        {
            t.avoid.insert(w.clone());
        }
        let index = t.record.index;
        let job_id = t.record.job;
        let model = t.record.recipe.model.clone();
        self.leased.remove(&task_id);
        if let Some(w) = worker.as_ref().and_then(|w| self.workers.get_mut(w)) {
            w.running.remove(&task_id);
            if outcome.is_fault() {
                w.record.failed += 1;
            }
            if outcome == Outcome::Completed {
                w.record.completed += 1;
            }
        }
        let job = self.jobs.get_mut(&job_id)?;
        job.record.counts.shift(TaskState::Leased, to);
        if to == TaskState::Queued {
            job.queued.insert(&model, index);
        }
        if outcome.is_fault()
            && let Some(w) = &worker
        {
            *job.faults.entry(w.clone()).or_default() += 1;
        }
        push_event(
            job,
            event,
            Some(task_id),
            index,
            worker.as_ref(),
            old_epoch,
            fault,
            message.to_string(),
        );
        match to {
            TaskState::Failed => {
                self.end_dependents(job_id, index, TaskState::Failed, "its anchor failed")
            }
            TaskState::Cancelled => {
                self.end_dependents(job_id, index, TaskState::Cancelled, "job cancelled")
            }
            _ => {}
        }
        finish_if_done(self.jobs.get_mut(&job_id)?)
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
        };
        for t in new.tasks {
            entry.tasks.push(t.id);
            match t.series.as_ref().and_then(|s| s.depends_on) {
                Some(anchor) => entry.waiting.entry(anchor).or_default().push(t.index),
                None => entry.queued.insert(&t.recipe.model, t.index),
            }
            st.tasks.insert(
                t.id,
                TaskEntry {
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
                        step: 0,
                        result: None,
                        series: t.series,
                    },
                    deadline: None,
                    avoid: t.avoid.into_iter().collect(),
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
        drop(guard);
        self.wake_watchers();
        Ok(record)
    }

    async fn register_worker(&self, reg: WorkerRegistration) -> StoreResult<Vec<Reaped>> {
        let now = self.now();
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut released = Vec::new();
        if let Some(old) = st.workers.get(&reg.id) {
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
        for m in &reg.models {
            st.models.insert(m.name.clone(), m.clone());
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
                running: BTreeSet::new(),
                last_seen: now,
                resident: Vec::new(),
            },
        );
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

    async fn models(&self) -> StoreResult<Vec<ModelInfo>> {
        Ok(self.lock().models.values().cloned().collect())
    }

    async fn claim(
        &self,
        worker: &WorkerId,
        max: usize,
        ttl: Duration,
        wait: Duration,
        resident: &[String],
    ) -> StoreResult<Claim> {
        let deadline = Instant::now() + wait;
        let mut rx = self.work.subscribe();
        loop {
            rx.borrow_and_update();
            let claim = self.try_claim(worker, max, ttl, resident)?;
            if !claim.leases.is_empty() || !claim.deduped.is_empty() || claim.drain || max == 0 {
                return Ok(claim);
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Ok(claim);
            }
        }
    }

    async fn heartbeat(
        &self,
        worker: &WorkerId,
        progress: &[ProgressReport],
        ttl: Duration,
    ) -> StoreResult<HeartbeatOutcome> {
        let now = self.now();
        let mut guard = self.lock();
        let st = &mut *guard;
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

    async fn complete(
        &self,
        worker: &WorkerId,
        task: TaskId,
        epoch: Epoch,
        mut result: TaskResult,
    ) -> StoreResult<CompleteOutcome> {
        let mut guard = self.lock();
        let st = &mut *guard;
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
        let (job_id, index, recipe, file) = (
            t.record.job,
            t.record.index,
            t.record.recipe.clone(),
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
                .insert(dedupe_key(&recipe, &class), remembered);
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
        drop(guard);
        // Only released shots are new work; waking every waiting claim for
        // each completion would make them all run for nothing.
        if released {
            self.wake_workers();
        }
        self.wake_watchers();
        Ok(CompleteOutcome::Accepted { job_finished })
    }

    async fn fail(
        &self,
        worker: &WorkerId,
        task: TaskId,
        epoch: Epoch,
        fault: Fault,
        message: &str,
        max_attempts: u32,
    ) -> StoreResult<FailOutcome> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let t = st.tasks.get(&task).ok_or(StoreError::TaskNotFound(task))?;
        if !holds_lease(&t.record, worker, epoch) {
            return Ok(FailOutcome::Stale {
                reason: stale_reason(&t.record, worker, epoch),
            });
        }
        let handback = fault == Fault::Cancelled;
        // This failure counts once it is recorded: faults() + 1.
        let used = t.record.faults() + usize::from(!handback);
        let will_retry = handback || (fault != Fault::BadInput && used < max_attempts as usize);
        let (outcome, to) = match (handback, will_retry) {
            (true, _) => (Outcome::Cancelled, TaskState::Queued),
            (false, true) => (Outcome::Failed, TaskState::Queued),
            (false, false) => (Outcome::Failed, TaskState::Failed),
        };
        let note = if will_retry {
            format!("{message} (will retry)")
        } else {
            format!("{message} (no retry: {used} of {max_attempts} attempts used)")
        };
        let job_finished = st.end_lease(
            task,
            outcome,
            Some(fault),
            &note,
            to,
            EventKind::Failed,
            false,
        );
        drop(guard);
        if will_retry {
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
}
