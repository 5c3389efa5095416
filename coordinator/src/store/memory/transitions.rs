//! The memory store's state transitions on [`State`]: leasing, serving a
//! task from an earlier result, ending a lease (complete, fail, expire,
//! cancel, with the usage counters it adds to), releasing or ending a
//! series' shots, and finishing a job. Each
//! runs under the store's mutex, which makes it atomic.

use std::time::Duration;

use kiln_proto::ids::{Epoch, JobId, TaskId, WorkerId};

use super::data::{JobEntry, Outbox, State};
use crate::clock::unix_ms;
use crate::store::policy::dedupe_key;
use crate::store::{
    Attempt, Claim, Deduped, Event, EventKind, Fault, JobRecord, JobState, Lease, Outcome,
    TaskResult, TaskState, usage_day,
};

impl State {
    /// Completes a dedupable task from an earlier result of the same recipe
    /// and class in the project; returns false when there is none.
    pub(super) fn try_dedupe(&mut self, task_id: TaskId, class: &str, claim: &mut Claim) -> bool {
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
            .and_then(|r| r.get(&dedupe_key(&task.hash, class)))
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
            model,
        });
        if let Some(done) = self.finish_job_if_done(job_id) {
            claim.finished.push(done);
        }
        true
    }

    /// Leases one task to `worker` under a new epoch.
    pub(super) fn lease(
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
        let file_name = t.record.file_name.clone();
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
            file_name,
            ttl,
            anchor,
        })
    }

    /// Queues the shots waiting for `anchor` with its image as their init
    /// image; returns true if there were any.
    pub(super) fn release_dependents(
        &mut self,
        job_id: JobId,
        anchor: u32,
        result: &TaskResult,
    ) -> bool {
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
    pub(super) fn end_dependents(&mut self, job_id: JobId, anchor: u32, to: TaskState, why: &str) {
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
                // A shot of a failed anchor cannot be rendered anywhere (bad
                // input); one of a cancelled job was cancelled.
                Some(if to == TaskState::Cancelled {
                    Fault::Cancelled
                } else {
                    Fault::BadInput
                }),
                why.to_string(),
            );
        }
    }
}

impl State {
    /// Fails the queued tasks of a running job for `model` pinned to `hash`
    /// (see [`Store::fail_unheld`](crate::store::Store::fail_unheld)),
    /// counting them in `failed`; returns the job if this ended it.
    pub(super) fn fail_queued_of(
        &mut self,
        job_id: JobId,
        model: &str,
        hash: &str,
        message: &str,
        failed: &mut u32,
    ) -> Option<JobRecord> {
        let job = self.jobs.get(&job_id)?;
        if job.record.state != JobState::Running {
            return None;
        }
        let indices: Vec<u32> = job
            .queued
            .by_model
            .get(model)
            .map(|set| set.iter().copied().collect())
            .unwrap_or_default();
        let mut any = false;
        for index in indices {
            let Some(task_id) = self.jobs.get(&job_id)?.tasks.get(index as usize).copied() else {
                continue;
            };
            let Some(t) = self.tasks.get_mut(&task_id) else {
                continue;
            };
            if t.record.recipe.model_hash != hash {
                continue;
            }
            t.record.state = TaskState::Failed;
            let job = self.jobs.get_mut(&job_id)?;
            job.queued.remove(model, index);
            job.record
                .counts
                .shift(TaskState::Queued, TaskState::Failed);
            push_event(
                job,
                EventKind::Failed,
                Some(task_id),
                index,
                None,
                Epoch(0),
                Some(Fault::ModelUnavailable),
                message.to_string(),
            );
            self.end_dependents(job_id, index, TaskState::Failed, "its anchor failed");
            *failed += 1;
            any = true;
        }
        if !any {
            return None;
        }
        self.finish_job_if_done(job_id)
    }
}

/// Appends an event to the job's log.
#[allow(clippy::too_many_arguments)]
pub(super) fn push_event(
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
pub(super) fn finish_if_done(job: &mut JobEntry) -> Option<JobRecord> {
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

impl State {
    /// Ends the running attempt of a leased task and moves it to `to`.
    /// Returns the job record if the job ended with it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn end_lease(
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
        t.preview = None;
        if outcome.is_fault()
            && let Some(w) = &worker
        {
            t.avoid.insert(w.clone());
        }
        let index = t.record.index;
        let job_id = t.record.job;
        let model = t.record.recipe.model.clone();
        let render_ms = t.record.result.as_ref().map_or(0, |r| r.render_ms);
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
        if outcome == Outcome::Completed || outcome.is_fault() {
            let usage = self
                .usage
                .entry((
                    usage_day(unix_ms()),
                    job.record.project.clone(),
                    model.clone(),
                ))
                .or_default();
            if outcome == Outcome::Completed {
                usage.images += 1;
                usage.render_ms += render_ms;
            } else {
                usage.failed_attempts += 1;
            }
        }
        if self.capped.remove(&job.record.project) {
            self.cap_freed = true;
        }
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
        self.finish_job_if_done(job_id)
    }

    /// Ends the job if no task is queued or leased ([`finish_if_done`]) and
    /// opens its webhook delivery in the same step; returns it when it ended now.
    pub(super) fn finish_job_if_done(&mut self, job_id: JobId) -> Option<JobRecord> {
        let done = finish_if_done(self.jobs.get_mut(&job_id)?)?;
        self.open_delivery(job_id);
        Some(done)
    }

    /// Opens the webhook delivery of a job that just ended, if it has targets.
    pub(super) fn open_delivery(&mut self, job_id: JobId) {
        let Some(job) = self.jobs.get(&job_id) else {
            return;
        };
        if job.notify.is_empty() || self.outbox.contains_key(&job_id) {
            return;
        }
        let now = unix_ms() as u64;
        self.outbox.insert(
            job_id,
            Outbox {
                pending: job.notify.clone(),
                attempt: 0,
                due: now,
                ended: now,
            },
        );
    }
}
