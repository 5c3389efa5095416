//! How the memory store applies the scheduling policy of [`policy`]: which
//! tasks a worker may take, in what order, and how free slots are filled.
//! The rules and numbers live in `policy`; this module only walks the
//! memory store's indexes to feed them (as `redis/claim.lua` walks Redis).

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use kiln_proto::ids::{JobId, TaskId, WorkerId};
use kiln_proto::lora_set::ReadyLoraSet;

use super::data::{JobEntry, State, TaskEntry};
use crate::store::policy::{self, Candidate, Holders, MAX_DEDUPED_PER_CLAIM, Pick};
use crate::store::{Claim, RunningCaps, TaskState};

/// What a stand-in must match: job, model, pinned hash and needed assets.
pub(super) type StandInKey = (JobId, String, String, Vec<String>);

/// A worker's view for the policy.
pub(super) struct Asker<'a> {
    pub(super) id: &'a WorkerId,
    pub(super) class: String,
    /// Catalog: model name -> hash.
    pub(super) models: HashMap<String, String>,
    /// Resident models; the whole catalog when the worker reports none.
    pub(super) resident: BTreeSet<String>,
    /// Its LoRAs, embeddings and ControlNets ([`policy::held_keys`]).
    pub(super) assets: BTreeSet<String>,
    /// The LoRA sets it reported ready, by model (policy step 4).
    pub(super) ready: HashMap<String, BTreeSet<String>>,
    /// Whether a stand-in exists for a quarantined asker, by (job, model,
    /// pinned hash, needed assets): asked once per claim, not once per queued
    /// task, since nothing it depends on changes while the claim holds the lock.
    pub(super) stand_ins: RefCell<HashMap<StandInKey, bool>>,
    /// Each capped project's `max_running_tasks`.
    pub(super) caps: &'a RunningCaps,
    /// Leased tasks of each capped project, counting those this claim leases.
    pub(super) running: RefCell<HashMap<String, u64>>,
}

impl Asker<'_> {
    /// Returns true when the worker reported LoRA set `set` ready for `model`.
    fn holds_ready(&self, model: &str, set: &str) -> bool {
        self.ready.get(model).is_some_and(|sets| sets.contains(set))
    }

    /// Returns true while `project` may get one more lease ([`policy::under_cap`]).
    fn has_room(&self, project: &str) -> bool {
        let running = self.running.borrow().get(project).copied().unwrap_or(0);
        policy::under_cap(running, self.caps.get(project).copied())
    }

    /// Counts one more lease of `project` in this claim.
    fn take_room(&self, project: &str) {
        if self.caps.contains_key(project) {
            *self
                .running
                .borrow_mut()
                .entry(project.to_string())
                .or_default() += 1;
        }
    }

    /// Returns the cached answer for (job, model, hash, needs), asking `scan` once.
    fn stand_in_for(
        &self,
        job: JobId,
        model: &str,
        hash: &str,
        needs: &[String],
        scan: impl FnOnce() -> bool,
    ) -> bool {
        let key = (job, model.to_string(), hash.to_string(), needs.to_vec());
        if let Some(known) = self.stand_ins.borrow().get(&key) {
            return *known;
        }
        let found = scan();
        self.stand_ins.borrow_mut().insert(key, found);
        found
    }
}

/// The passes of batch filling (policy step 5), in order.
#[derive(Clone, Copy)]
enum Fill {
    /// Tasks with the first task's batch key.
    SameBatch,
    /// Tasks whose LoRA set is ready on the worker or the first task's.
    ReadySet,
    /// Any task of the first task's model.
    SameModel,
}

/// What filling the free slots of a claim works with.
struct Slots<'a> {
    /// Leases the claim may hold in all.
    max: usize,
    /// The store clock.
    now: u64,
    /// The leases' TTL.
    ttl: Duration,
    /// Jobs in policy order, as the claim began.
    order: &'a [JobId],
}

impl State {
    /// Returns true if `asker` may take tasks of `job` at all: the job runs,
    /// is not paused and is not pinned to another determinism class. Quarantine is decided
    /// per task ([`State::task_allows`]), since a stand-in must hold the
    /// task's model.
    pub(super) fn job_allows(&self, job: &JobEntry, asker: &Asker<'_>) -> bool {
        if !policy::leasable(job.record.state, job.record.paused) {
            return false;
        }
        !job.record.class.as_ref().is_some_and(|class| {
            (job.pin_class || job.record.verify_of.is_some()) && *class != asker.class
        })
    }

    /// Returns true if `asker` may take this task: it holds the model (and
    /// the pinned hash), and neither quarantine nor the task's avoid list
    /// keeps it away ([`policy::task_open_to`]).
    pub(super) fn task_allows(&self, task: &TaskEntry, asker: &Asker<'_>, now: u64) -> bool {
        let Some(job) = self.jobs.get(&task.record.job) else {
            return false;
        };
        let r = &task.record.recipe;
        let Some(hash) = asker.models.get(&r.model) else {
            return false;
        };
        if !r.model_hash.is_empty() && *hash != r.model_hash {
            return false;
        }
        let needs = policy::task_needs(r);
        if !policy::holds_all(&needs, |k| asker.assets.contains(k)) {
            return false;
        }
        let faults = job.faults.get(asker.id).copied().unwrap_or(0);
        policy::task_open_to(
            policy::quarantined(faults),
            task.avoid.contains(asker.id),
            || {
                asker.stand_in_for(job.record.id, &r.model, &r.model_hash, &needs, || {
                    self.stand_in_exists(job, task, asker.id, false, now)
                })
            },
            || self.stand_in_exists(job, task, asker.id, true, now),
        )
    }

    /// Returns true when a worker other than `not` could take `task`
    /// ([`policy::can_stand_in`]); with `outside_avoid`, only workers not
    /// on the task's avoid list count.
    pub(super) fn stand_in_exists(
        &self,
        job: &JobEntry,
        task: &TaskEntry,
        not: &WorkerId,
        outside_avoid: bool,
        now: u64,
    ) -> bool {
        let recipe = &task.record.recipe;
        let needs = policy::task_needs(recipe);
        let pinned = job.record.class.as_deref().filter(|_| job.pin_class);
        self.workers.values().any(|w| {
            let reg = &w.record.registration;
            let held = policy::held_keys(&reg.assets);
            let candidate = Candidate {
                draining: w.record.draining,
                silent_ms: now.saturating_sub(w.last_seen),
                class: &reg.determinism_class,
                model_hash: reg
                    .models
                    .iter()
                    .find(|m| m.name == recipe.model)
                    .map(|m| m.hash.as_str()),
                job_faults: job.faults.get(&reg.id).copied().unwrap_or(0),
                holds_assets: policy::holds_all(&needs, |k| held.contains(k)),
            };
            reg.id != *not
                && !(outside_avoid && task.avoid.contains(&reg.id))
                && policy::can_stand_in(&candidate, &recipe.model_hash, pinned)
        })
    }

    /// Jobs with claimable work in policy order ([`policy::job_rank`]).
    pub(super) fn job_order(&self) -> Vec<JobId> {
        let mut jobs: Vec<&JobEntry> = self
            .jobs
            .values()
            .filter(|j| policy::leasable(j.record.state, j.record.paused) && !j.queued.is_empty())
            .collect();
        jobs.sort_by_key(|j| {
            policy::job_rank(
                j.record.priority,
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

    /// Returns the leased tasks of each project in `caps`.
    fn running_of(&self, caps: &RunningCaps) -> HashMap<String, u64> {
        let mut running = HashMap::new();
        if caps.is_empty() {
            return running;
        }
        for task in &self.leased {
            if let Some(job) = self
                .tasks
                .get(task)
                .and_then(|t| self.jobs.get(&t.record.job))
                .filter(|j| caps.contains_key(&j.record.project))
            {
                *running.entry(job.record.project.clone()).or_default() += 1;
            }
        }
        running
    }

    /// Leases up to `max` tasks to `worker` for `ttl` (see
    /// [`super::policy`]), no project past its cap in `caps`, into `claim`;
    /// completes deduplicated tasks into `claim` on the way. Events follow
    /// `claim.lua`'s order: the first task is leased before the free slots
    /// are filled.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn pick(
        &mut self,
        worker: &WorkerId,
        max: usize,
        now: u64,
        ttl: Duration,
        caps: &RunningCaps,
        ready: &[ReadyLoraSet],
        claim: &mut Claim,
    ) {
        let running = self.running_of(caps);
        let Some(w) = self.workers.get(worker) else {
            return;
        };
        let reg = &w.record.registration;
        let models: HashMap<String, String> = reg
            .models
            .iter()
            .map(|m| (m.name.clone(), m.hash.clone()))
            .collect();
        // While loading a model it was switched to, the worker keeps to that
        // one (policy::holds_for_affinity).
        let resident: BTreeSet<String> = if let Some(loading) = &w.loading {
            BTreeSet::from([loading.clone()])
        } else if w.resident.is_empty() {
            models.keys().cloned().collect()
        } else {
            w.resident.iter().cloned().collect()
        };
        let asker = Asker {
            id: worker,
            class: reg.determinism_class.clone(),
            models,
            resident,
            assets: policy::held_keys(&reg.assets),
            ready: ready.iter().fold(HashMap::new(), |mut by_model, r| {
                by_model
                    .entry(r.model.clone())
                    .or_insert_with(BTreeSet::new)
                    .insert(r.set.clone());
                by_model
            }),
            stand_ins: RefCell::default(),
            caps,
            running: RefCell::new(running),
        };
        let mut deduped = 0;
        // The first claimable task overall, and the first one for a resident
        // model, in policy order.
        let mut first_choice: Option<Pick<TaskId>> = None;
        let mut first_resident: Option<Pick<TaskId>> = None;
        // Read once, as claim.lua reads its jobs: the leases below move the
        // fairness counters, and the fill keeps this order.
        let order = self.job_order();
        'jobs: for &job_id in &order {
            let Some(job) = self.jobs.get(&job_id) else {
                continue;
            };
            if !self.job_allows(job, &asker) {
                continue;
            }
            if !asker.has_room(&job.record.project) {
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
            for (_, task, model) in heads {
                let resident = asker.resident.contains(&model);
                let pick = Pick {
                    priority,
                    task,
                    model,
                };
                if first_choice.is_none() {
                    first_choice = Some(pick.clone());
                }
                if resident {
                    first_resident = Some(pick);
                    break 'jobs;
                }
            }
        }
        let chosen = policy::choose(
            first_resident,
            first_choice,
            |model| self.resident_holders(model, worker, now),
            |model| self.backlog(model),
        );
        // LoRA-set affinity (policy step 4): the chosen task's job and model
        // stand; a task of theirs whose LoRA set is ready here may go first.
        let chosen = chosen.map(|first| self.prefer_ready(first, &asker, now, &mut deduped, claim));
        if let Some(first) = chosen {
            // A switch: the worker counts as loading the model until it
            // reports it (policy::still_loading).
            let model = self
                .tasks
                .get(&first)
                .map(|t| t.record.recipe.model.clone());
            if let Some(model) = model.filter(|m| !asker.resident.contains(m)) {
                tracing::debug!(
                    worker = %worker,
                    from = ?asker.resident,
                    to = %model,
                    backlog = self.backlog(&model),
                    holders = ?self.resident_holders(&model, worker, now),
                    "a worker switches model"
                );
                if let Some(w) = self.workers.get_mut(worker) {
                    w.loading = Some(model);
                }
            }
            if let Some(project) = self.project_of(first) {
                asker.take_room(&project);
            }
            claim.leases.extend(self.lease(first, worker, now, ttl));
            if max > 1 {
                let slots = Slots {
                    max,
                    now,
                    ttl,
                    order: &order,
                };
                self.fill(first, &slots, &asker, &mut deduped, claim);
            }
        }
        // A project at its cap wakes waiting claims when one of its leases ends.
        self.capped
            .extend(caps.keys().filter(|p| !asker.has_room(p)).cloned());
    }

    /// Returns the task to lease instead of `first` (policy step 4): when
    /// `first` would make the asker merge LoRAs, the first task among the
    /// first [`policy::READY_LOOKAHEAD`] queued tasks of its job and model
    /// that the asker may take and holds the set of ready, completing any
    /// such task with an earlier result on the way (as `claim.lua` does);
    /// else `first`.
    fn prefer_ready(
        &mut self,
        first: TaskId,
        asker: &Asker<'_>,
        now: u64,
        deduped: &mut usize,
        claim: &mut Claim,
    ) -> TaskId {
        let Some(task) = self.tasks.get(&first) else {
            return first;
        };
        let (job, model) = (task.record.job, task.record.recipe.model.clone());
        let ready = |set: &str| asker.holds_ready(&model, set);
        if !policy::needs_merge(&task.lora_set, ready) {
            return first;
        }
        let window: Vec<TaskId> = self
            .jobs
            .get(&job)
            .and_then(|j| {
                let set = j.queued.by_model.get(&model)?;
                Some(
                    set.iter()
                        .take(policy::READY_LOOKAHEAD)
                        .filter_map(|i| j.tasks.get(*i as usize).copied())
                        .collect(),
                )
            })
            .unwrap_or_default();
        for id in window {
            let Some(task) = self.tasks.get(&id) else {
                continue;
            };
            if !policy::set_ready(&task.lora_set, ready) || !self.task_allows(task, asker, now) {
                continue;
            }
            if *deduped < MAX_DEDUPED_PER_CLAIM && self.try_dedupe(id, &asker.class, claim) {
                *deduped += 1;
                continue;
            }
            return id;
        }
        first
    }

    /// Returns the project of a task's job.
    fn project_of(&self, task: TaskId) -> Option<String> {
        let job = self.tasks.get(&task)?.record.job;
        Some(self.jobs.get(&job)?.record.project.clone())
    }

    /// Fills the free slots of `claim` after `first` (already leased):
    /// tasks that share its UNet batch, then tasks for the same model whose
    /// LoRA set is ready here or `first`'s ([`policy::set_ready`]), then
    /// other tasks for the same model, in `slots.order`. A task with an
    /// earlier result of its recipe is completed from it into `claim` and
    /// takes no slot, as `claim.lua` fills. Each pass walks a job's queue as
    /// it stood when the pass reached the job, as `claim.lua` reads it once
    /// per pass: shots a served anchor releases are seen by the next pass.
    fn fill(
        &mut self,
        first: TaskId,
        slots: &Slots<'_>,
        asker: &Asker<'_>,
        deduped: &mut usize,
        claim: &mut Claim,
    ) {
        let Some(first_task) = self.tasks.get(&first) else {
            return;
        };
        let key = first_task.batch_key.clone();
        let model = first_task.record.recipe.model.clone();
        let first_set = first_task.lora_set.clone();
        let ready = |set: &str| set == first_set || asker.holds_ready(&model, set);
        for pass in [Fill::SameBatch, Fill::ReadySet, Fill::SameModel] {
            for job_id in slots.order {
                let Some(job) = self.jobs.get(job_id) else {
                    continue;
                };
                if !self.job_allows(job, asker) {
                    continue;
                }
                let Some(set) = job.queued.by_model.get(&model) else {
                    continue;
                };
                let project = job.record.project.clone();
                let queued: Vec<TaskId> = set
                    .iter()
                    .filter_map(|index| job.tasks.get(*index as usize).copied())
                    .collect();
                for id in queued {
                    if claim.leases.len() >= slots.max {
                        return;
                    }
                    if !asker.has_room(&project) {
                        break;
                    }
                    let Some(task) = self.tasks.get(&id) else {
                        continue;
                    };
                    let fits = match pass {
                        Fill::SameBatch => task.batch_key == key,
                        Fill::ReadySet => policy::set_ready(&task.lora_set, ready),
                        Fill::SameModel => true,
                    };
                    if !fits
                        || task.record.state != TaskState::Queued
                        || !self.task_allows(task, asker, slots.now)
                    {
                        continue;
                    }
                    if *deduped < MAX_DEDUPED_PER_CLAIM && self.try_dedupe(id, &asker.class, claim)
                    {
                        *deduped += 1;
                        continue;
                    }
                    asker.take_room(&project);
                    claim
                        .leases
                        .extend(self.lease(id, asker.id, slots.now, slots.ttl));
                }
            }
        }
    }

    /// Returns the number of claimable tasks for `model` across running,
    /// unpaused jobs.
    pub(super) fn backlog(&self, model: &str) -> usize {
        self.jobs
            .values()
            .filter(|j| policy::leasable(j.record.state, j.record.paused))
            .map(|j| j.queued.len_of(model))
            .sum()
    }

    /// Returns how live workers other than `not` count for `model` in model
    /// affinity ([`policy::holds_for_affinity`]).
    pub(super) fn resident_holders(&self, model: &str, not: &WorkerId, now: u64) -> Holders {
        let mut holders = Holders::default();
        for w in self.workers.values().filter(|w| {
            &w.record.registration.id != not
                && !w.record.draining
                && policy::alive(now.saturating_sub(w.last_seen))
        }) {
            holders.add(policy::holds_for_affinity(
                model,
                w.loading.as_deref(),
                &w.resident,
                || w.record.registration.models.iter().any(|m| m.name == model),
            ));
        }
        holders
    }
}
