//! The memory store's queue-control transitions on [`State`]: pausing and
//! resuming a job, changing its priority, and putting its failed tasks back
//! in the queue (`kiln pause`, `resume`, `priority`, `retry`). Each runs
//! under the store's mutex, which makes it atomic; `redis/pause.lua`,
//! `priority.lua` and `retry.lua` do the same on Redis.

use std::collections::HashSet;

use kiln_proto::ids::{Epoch, JobId, TaskId};

use super::data::State;
use super::transitions::push_event;
use crate::store::policy;
use crate::store::state::messages;
use crate::store::{EventKind, JobRecord, JobState, StoreError, StoreResult, TaskState};

impl State {
    /// Pauses (`paused`) or resumes a running job; returns its record and
    /// whether anything changed. A finished job, or one already in that
    /// state, is left as it is.
    pub(super) fn set_paused(&mut self, id: JobId, paused: bool) -> StoreResult<(JobRecord, bool)> {
        let job = self.jobs.get_mut(&id).ok_or(StoreError::JobNotFound(id))?;
        if job.record.state != JobState::Running || job.record.paused == paused {
            return Ok((job.record.clone(), false));
        }
        job.record.paused = paused;
        let (kind, message) = if paused {
            (EventKind::Paused, messages::PAUSED)
        } else {
            (EventKind::Resumed, messages::RESUMED)
        };
        push_event(job, kind, None, 0, None, Epoch(0), None, message.into());
        Ok((job.record.clone(), true))
    }

    /// Sets a running job's priority; returns its record and whether it
    /// changed. A finished job is left as it is.
    pub(super) fn set_priority(
        &mut self,
        id: JobId,
        priority: i32,
    ) -> StoreResult<(JobRecord, bool)> {
        let job = self.jobs.get_mut(&id).ok_or(StoreError::JobNotFound(id))?;
        if job.record.state != JobState::Running {
            return Ok((job.record.clone(), false));
        }
        job.record.priority = priority;
        push_event(
            job,
            EventKind::Reprioritized,
            None,
            0,
            None,
            Epoch(0),
            None,
            format!("{}{priority}", messages::PRIORITY),
        );
        Ok((job.record.clone(), true))
    }

    /// Puts the failed tasks of a job back in the queue with fresh attempts
    /// ([`policy::retryable`]): their earlier attempts stay for the record,
    /// the job's per-worker fault counts start again, and a finished job
    /// runs again. A shot whose anchor is not completed waits for it again.
    /// Returns the record and how many tasks went back.
    pub(super) fn retry_failed(&mut self, id: JobId) -> StoreResult<(JobRecord, u32)> {
        let job = self.jobs.get(&id).ok_or(StoreError::JobNotFound(id))?;
        if !policy::job_retryable(job.record.state) {
            return Ok((job.record.clone(), 0));
        }
        let mut failed: Vec<TaskId> = Vec::new();
        let mut completed: HashSet<u32> = HashSet::new();
        for t in job.tasks.iter().filter_map(|t| self.tasks.get(t)) {
            if policy::retryable(t.record.state) {
                failed.push(t.record.id);
            } else if t.record.state == TaskState::Completed {
                completed.insert(t.record.index);
            }
        }
        if failed.is_empty() {
            return Ok((job.record.clone(), 0));
        }
        let job = self.jobs.get_mut(&id).ok_or(StoreError::JobNotFound(id))?;
        job.record.state = JobState::Running;
        job.record.finished_at_ms = None;
        job.faults.clear();
        for tid in &failed {
            let Some(t) = self.tasks.get_mut(tid) else {
                continue;
            };
            t.record.state = TaskState::Queued;
            t.record.step = 0;
            t.record.counted_from = t.record.attempts.len() as u32;
            let (index, epoch, model) = (
                t.record.index,
                t.record.epoch,
                t.record.recipe.model.clone(),
            );
            match t.record.series.as_ref().and_then(|s| s.depends_on) {
                Some(anchor) if !completed.contains(&anchor) => {
                    job.waiting.entry(anchor).or_default().push(index)
                }
                _ => job.queued.insert(&model, index),
            }
            job.record
                .counts
                .shift(TaskState::Failed, TaskState::Queued);
            push_event(
                job,
                EventKind::Retried,
                Some(*tid),
                index,
                None,
                epoch,
                None,
                messages::RETRIED.into(),
            );
        }
        Ok((job.record.clone(), failed.len() as u32))
    }
}
