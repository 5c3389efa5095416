//! A differential test of the two [`Store`]s: seeded random sequences of
//! operations (register, submit, claim, heartbeat, complete, fail, expire,
//! cancel, pause/resume, priority, retry, drain, reap, fail-unheld) are
//! applied to a [`MemoryStore`] and a [`RedisStore`] side by side, and after
//! every step everything observable is compared: what the call returned, then
//! every job, task, running lease, worker, model identity, pinned-task count
//! and usage bucket, and the events the step appended. The conformance suite pins down chosen
//! scenarios; this test looks for the interleavings nobody wrote down.
//! Worker calls come with a token's name (mostly the one the worker id
//! belongs to, now and then an impostor's: refused while bound), and claims
//! with the case's `max_running_tasks` caps.
//!
//! Case `i` runs with seed `i`, so a failure names the seed that replays it.
//! `KILN_DIFF_CASES=N` runs N cases (default 200) of 50 operations each;
//! `KILN_DIFF_SEED=S` runs case S alone. A divergence panics with the seed,
//! the operation index, the operations so far and both answers.
//!
//! Ids: the test makes every job and task id itself (readable, increasing
//! with submission, so "newest first" means the same in both stores) and
//! hands the same ids to both stores, so they are compared as they are.
//!
//! Time, without wall-clock waits: leases are taken with a TTL far longer
//! than a case runs, and an "expire" step gives chosen leases a TTL of zero
//! (a heartbeat or a claim with `Duration::ZERO`) and reaps at once. Both
//! stores reap a lease whose deadline is at or before their clock (`d <= now`
//! in `MemoryStore::reap`, `ZRANGEBYSCORE -inf NOW` in `reap.lua`), so a zero
//! TTL is expired by the very next reap and nothing else ever is.
//!
//! Left out on purpose, each for its reason:
//! - waiting (`claim` with a `wait`, `wait_events`): wake-ups are timing, and
//!   the conformance suite covers them;
//! - the liveness window (a worker silent for 60 s stops counting for the
//!   policy, and its id is free for another token) and retention of
//!   finished jobs: both need wall-clock time;
//! - `blobs`: opaque bytes kept per job, with nothing to interleave;
//! - a second `create_job` with the same job id: only a retried Redis call
//!   sends one (the memory store cannot fail halfway), and ids here are unique;
//! - jobs with more queued tasks per model than the Redis claim's windows:
//!   it looks `max + CLAIM_LOOKAHEAD` tasks into a model's queue for the first
//!   claimable task and `FILL_LOOKAHEAD` further when filling slots, where the
//!   memory store looks at all; cases keep jobs to 6 tasks, inside both.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use kiln_proto::ids::{Epoch, JobId, TaskId, WorkerId};
use kiln_proto::recipe::{Recipe, Scheduler};
use uuid::Uuid;

use super::policy::QUARANTINE_AFTER;
use super::*;

/// Cases run when `KILN_DIFF_CASES` is not set.
const DEFAULT_CASES: u64 = 200;
/// Operations per case.
const OPS_PER_CASE: usize = 50;
/// TTL of every lease that is not expired on purpose: far beyond a case's
/// run time, so only the expire steps ever make a lease due.
const TTL: Duration = Duration::from_secs(3600);
/// Cases run at once.
const CONCURRENT_CASES: usize = 4;
/// Larger than any listing a case produces, and within the cap `ListJobs` applies.
const ALL: usize = 10_000;

const MODELS: [&str; 3] = ["m1", "m2", "m3"];
const WORKERS: [&str; 4] = ["w0", "w1", "w2", "w3"];
/// The worker tokens' names: each worker id belongs to one of them.
const OWNERS: [Owner; 2] = [Some("pool-a"), Some("pool-b")];

/// The name of the token a worker call comes with.
type Owner = Option<&'static str>;
/// A worker id that is never registered.
const GHOST: &str = "ghost";
const CLASSES: [&str; 2] = ["cpu/f32", "cpu/f16"];
/// LoRAs some recipes name; every worker holds both, and reports some of
/// their sets ready, so LoRA-set affinity and its batch-filling pass are
/// compared.
const LORAS: [&str; 2] = ["ink", "mira"];

/// The one LoRA of recipes that name `name`.
fn lora(name: &str) -> kiln_proto::extras::LoraRef {
    kiln_proto::extras::LoraRef {
        name: name.into(),
        hash: format!("hash-{name}"),
        unet_weight: 0.8,
        te_weight: 0.8,
    }
}
const PROJECTS: [&str; 2] = ["p0", "p1"];
/// Faults a worker may report (`WorkerLost` is the reaper's, not a worker's).
const FAULTS: [Fault; 5] = [
    Fault::OutOfMemory,
    Fault::ModelLoad,
    Fault::BadInput,
    Fault::Cancelled,
    Fault::Internal,
];

/// splitmix64: tiny, fast, and plenty to drive operation choice.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Returns a number in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    /// Returns a number in `lo..=hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    /// Returns a random element; `xs` must not be empty.
    fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())].clone()
    }

    /// Returns a non-empty subset of `xs`, in the order of `xs`.
    fn subset(&mut self, xs: &[&str]) -> Vec<String> {
        loop {
            let out: Vec<String> = xs
                .iter()
                .filter(|_| self.chance(50))
                .map(|s| s.to_string())
                .collect();
            if !out.is_empty() {
                return out;
            }
        }
    }
}

/// One step of a case, with every argument spelled out so the sequence in a
/// failure report can be read (and replayed by hand).
#[derive(Clone, Debug)]
enum Op {
    /// A registration by the token named second (`None`: no `--auth`).
    Register(WorkerRegistration, Owner),
    Submit(NewJob),
    Claim {
        worker: WorkerId,
        owner: Owner,
        max: usize,
        resident: Vec<String>,
        ready: Vec<kiln_proto::lora_set::ReadyLoraSet>,
        caps: RunningCaps,
    },
    Heartbeat {
        worker: WorkerId,
        owner: Owner,
        reports: Vec<ProgressReport>,
    },
    Complete {
        worker: WorkerId,
        owner: Owner,
        task: TaskId,
        epoch: Epoch,
    },
    Fail {
        worker: WorkerId,
        owner: Owner,
        task: TaskId,
        epoch: Epoch,
        fault: Fault,
        max_attempts: u32,
    },
    /// A heartbeat with a zero TTL, then a reap: the reported leases expire.
    ExpireByHeartbeat {
        worker: WorkerId,
        owner: Owner,
        reports: Vec<ProgressReport>,
        max_attempts: u32,
    },
    /// A claim with a zero TTL, then a reap: the new leases expire at once.
    ExpireByClaim {
        worker: WorkerId,
        owner: Owner,
        max: usize,
        max_attempts: u32,
        caps: RunningCaps,
    },
    Cancel(JobId),
    /// Pause (true) or resume (false).
    Pause(JobId, bool),
    Priority(JobId, i32),
    Retry(JobId),
    Drain(WorkerId),
    Reap {
        max_attempts: u32,
    },
    /// Fails the queued tasks pinned to (model, hash) unless a live worker holds it.
    FailUnheld {
        model: String,
        hash: String,
    },
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::Register(..) => "register",
            Op::Submit(_) => "submit",
            Op::Claim { .. } => "claim",
            Op::Heartbeat { .. } => "heartbeat",
            Op::Complete { .. } => "complete",
            Op::Fail { .. } => "fail",
            Op::ExpireByHeartbeat { .. } => "expire-by-heartbeat",
            Op::ExpireByClaim { .. } => "expire-by-claim",
            Op::Cancel(_) => "cancel",
            Op::Pause(_, true) => "pause",
            Op::Pause(_, false) => "resume",
            Op::Priority(..) => "priority",
            Op::Retry(_) => "retry",
            Op::Drain(_) => "drain",
            Op::Reap { .. } => "reap",
            Op::FailUnheld { .. } => "fail-unheld",
        }
    }

    /// True when the step ends several leases in an order neither store
    /// promises: a re-registration walks the worker's lease *set* and a
    /// cancel the job's leased *set* (Redis `SMEMBERS`, unordered; the memory
    /// store walks them in id order). Their events are compared as a multiset.
    /// (A reap ends leases by deadline, then id, in Redis and by id in the
    /// memory store; every lease a reap here finds due got its zero TTL in
    /// one call, so one deadline, and its events are compared in order.)
    fn ends_leases_unordered(&self) -> bool {
        matches!(self, Op::Register(..) | Op::Cancel(_))
    }
}

/// What a step returned, normalised (see [`Answer::normalised`]).
#[derive(Debug, PartialEq)]
enum Answer {
    Registered(Vec<Reaped>),
    Created(JobRecord, bool),
    Claimed(Claim),
    Beat(HeartbeatOutcome),
    Completed(CompleteOutcome),
    Failed(FailOutcome),
    ExpiredByHeartbeat(HeartbeatOutcome, Vec<Reaped>),
    ExpiredByClaim(Claim, Vec<Reaped>),
    Cancelled(JobRecord),
    /// A pause, resume or priority change.
    Steered(JobRecord),
    Retried(JobRecord, u32),
    Drained(WorkerRecord),
    Reaped(Vec<Reaped>),
    Unheld(Unheld),
    /// Errors are compared by their text, which names the kind and the id.
    Error(String),
}

/// Clears what legitimately differs between the stores in a job record:
/// creation and finish times are each store's clock reading at the moment of
/// the call (only whether the job has finished is compared).
fn norm_job(mut j: JobRecord) -> JobRecord {
    j.created_at_ms = 0;
    j.finished_at_ms = j.finished_at_ms.map(|_| 0);
    j
}

/// Attempt start and end times are clock readings: only whether an attempt
/// has ended is compared.
fn norm_task(mut t: TaskRecord) -> TaskRecord {
    for a in &mut t.attempts {
        a.started_at_ms = 0;
        a.ended_at_ms = a.ended_at_ms.map(|_| 0);
    }
    t
}

/// `last_seen_ms` is a clock reading; `running` is a set (Redis `SMEMBERS`
/// answers in no particular order), so it is sorted.
fn norm_worker(mut w: WorkerRecord) -> WorkerRecord {
    w.last_seen_ms = 0;
    w.running.sort();
    w
}

/// An event's time is a clock reading.
fn norm_event(mut e: Event) -> Event {
    e.at_ms = 0;
    e
}

fn norm_claim(mut c: Claim) -> Claim {
    c.finished = c.finished.into_iter().map(norm_job).collect();
    c
}

fn norm_reaped(reaped: Vec<Reaped>) -> Vec<Reaped> {
    reaped
        .into_iter()
        .map(|mut r| {
            r.job_finished = r.job_finished.map(norm_job);
            r
        })
        .collect()
}

impl Answer {
    /// Clears clock readings (see the `norm_*` functions) and sorts what a
    /// store returns as a set.
    fn normalised(self) -> Self {
        match self {
            Answer::Registered(mut r) => {
                // The leases of the old session come from a set: see `Op::ends_leases_unordered`.
                r.sort_by_key(|r| r.task);
                Answer::Registered(norm_reaped(r))
            }
            Answer::Created(j, created) => Answer::Created(norm_job(j), created),
            Answer::Claimed(c) => Answer::Claimed(norm_claim(c)),
            Answer::Completed(CompleteOutcome::Accepted { job_finished }) => {
                Answer::Completed(CompleteOutcome::Accepted {
                    job_finished: job_finished.map(norm_job),
                })
            }
            Answer::Failed(FailOutcome::Recorded {
                will_retry,
                job_finished,
            }) => Answer::Failed(FailOutcome::Recorded {
                will_retry,
                job_finished: job_finished.map(norm_job),
            }),
            Answer::ExpiredByHeartbeat(hb, r) => Answer::ExpiredByHeartbeat(hb, norm_reaped(r)),
            Answer::ExpiredByClaim(c, r) => Answer::ExpiredByClaim(norm_claim(c), norm_reaped(r)),
            Answer::Cancelled(j) => Answer::Cancelled(norm_job(j)),
            Answer::Steered(j) => Answer::Steered(norm_job(j)),
            Answer::Retried(j, n) => Answer::Retried(norm_job(j), n),
            Answer::Drained(w) => Answer::Drained(norm_worker(w)),
            Answer::Reaped(r) => Answer::Reaped(norm_reaped(r)),
            Answer::Unheld(mut u) => {
                // Each store walks its running jobs in its own order.
                u.finished.sort_by_key(|j| j.id);
                u.finished = u.finished.into_iter().map(norm_job).collect();
                Answer::Unheld(u)
            }
            other => other,
        }
    }
}

/// A result every worker reports the same way; the sha256 differs per task
/// and epoch, so a shot's init image tells which anchor render it got.
fn result_for(task: TaskId, epoch: Epoch) -> TaskResult {
    TaskResult {
        object: format!("staging/{task}-{epoch}.png"),
        sha256: format!("{:032x}{:032x}", task.0.as_u128(), epoch.0),
        size: 10,
        model_hash: "h".into(),
        render_ms: 5,
        encode_ms: 1,
        class: String::new(),
    }
}

/// Applies one step to a store.
async fn apply(store: &dyn Store, op: &Op) -> Answer {
    let answer: StoreResult<Answer> = async {
        Ok(match op {
            Op::Register(reg, owner) => {
                Answer::Registered(store.register_worker(reg.clone(), *owner).await?)
            }
            Op::Submit(job) => {
                let (record, created) = store.create_job(job.clone()).await?;
                Answer::Created(record, created)
            }
            Op::Claim {
                worker,
                owner,
                max,
                resident,
                ready,
                caps,
            } => Answer::Claimed(
                store
                    .claim(
                        worker,
                        *owner,
                        *max,
                        TTL,
                        Duration::ZERO,
                        resident,
                        ready,
                        caps,
                    )
                    .await?,
            ),
            Op::Heartbeat {
                worker,
                owner,
                reports,
            } => Answer::Beat(store.heartbeat(worker, *owner, reports, TTL).await?),
            Op::Complete {
                worker,
                owner,
                task,
                epoch,
            } => Answer::Completed(
                store
                    .complete(worker, *owner, *task, *epoch, result_for(*task, *epoch))
                    .await?,
            ),
            Op::Fail {
                worker,
                owner,
                task,
                epoch,
                fault,
                max_attempts,
            } => Answer::Failed(
                store
                    .fail(
                        worker,
                        *owner,
                        *task,
                        *epoch,
                        *fault,
                        "it broke",
                        *max_attempts,
                    )
                    .await?,
            ),
            Op::ExpireByHeartbeat {
                worker,
                owner,
                reports,
                max_attempts,
            } => {
                let hb = store
                    .heartbeat(worker, *owner, reports, Duration::ZERO)
                    .await?;
                Answer::ExpiredByHeartbeat(hb, store.reap(*max_attempts).await?)
            }
            Op::ExpireByClaim {
                worker,
                owner,
                max,
                max_attempts,
                caps,
            } => {
                let claim = store
                    .claim(
                        worker,
                        *owner,
                        *max,
                        Duration::ZERO,
                        Duration::ZERO,
                        &[],
                        &[],
                        caps,
                    )
                    .await?;
                Answer::ExpiredByClaim(claim, store.reap(*max_attempts).await?)
            }
            Op::Cancel(job) => Answer::Cancelled(store.cancel_job(*job).await?),
            Op::Pause(job, paused) => Answer::Steered(store.pause_job(*job, *paused).await?),
            Op::Priority(job, p) => Answer::Steered(store.set_priority(*job, *p).await?),
            Op::Retry(job) => {
                let (record, n) = store.retry_job(*job).await?;
                Answer::Retried(record, n)
            }
            Op::Drain(worker) => Answer::Drained(store.drain_worker(worker).await?),
            Op::Reap { max_attempts } => Answer::Reaped(store.reap(*max_attempts).await?),
            Op::FailUnheld { model, hash } => Answer::Unheld(
                store
                    .fail_unheld(model, hash, "nobody live holds it")
                    .await?,
            ),
        })
    }
    .await;
    answer
        .unwrap_or_else(|e| Answer::Error(e.to_string()))
        .normalised()
}

/// One job as a store shows it.
#[derive(Debug, PartialEq)]
struct JobView {
    record: JobRecord,
    tasks: Vec<TaskRecord>,
    running: Vec<RunningTask>,
}

/// Everything a store shows after a step, normalised (events apart: see [`new_events`]).
#[derive(Debug, PartialEq)]
struct Snapshot {
    /// `jobs(ALL)`: every job, newest first.
    listed: Vec<JobRecord>,
    /// `jobs(3)`: the limit and the order.
    newest: Vec<JobId>,
    /// `job`, `tasks` and `running` of every job the case submitted, in submission order.
    jobs: Vec<JobView>,
    workers: Vec<WorkerRecord>,
    models: Vec<ModelIdentity>,
    pinned: Vec<PinnedTasks>,
    /// `usage(0)`: every bucket.
    usage: Vec<UsageRow>,
}

impl Snapshot {
    fn empty() -> Self {
        Self {
            listed: Vec::new(),
            newest: Vec::new(),
            jobs: Vec::new(),
            workers: Vec::new(),
            models: Vec::new(),
            pinned: Vec::new(),
            usage: Vec::new(),
        }
    }

    fn tasks(&self) -> impl Iterator<Item = &TaskRecord> {
        self.jobs.iter().flat_map(|j| j.tasks.iter())
    }

    /// Leases held now: (holder, task, epoch).
    fn leases(&self) -> Vec<(WorkerId, TaskId, Epoch)> {
        self.tasks()
            .filter(|t| t.state == TaskState::Leased)
            .filter_map(|t| Some((t.holder()?.clone(), t.id, t.epoch)))
            .collect()
    }

    /// Every lease ever handed out: (worker, task, epoch).
    fn history(&self) -> Vec<(WorkerId, TaskId, Epoch)> {
        self.tasks()
            .flat_map(|t| t.attempts.iter().map(|a| (a.worker.clone(), t.id, a.epoch)))
            .collect()
    }
}

async fn snapshot(store: &dyn Store, jobs: &[JobId]) -> StoreResult<Snapshot> {
    let listed: Vec<JobRecord> = store.jobs(ALL).await?.into_iter().map(norm_job).collect();
    let newest = store.jobs(3).await?.into_iter().map(|j| j.id).collect();
    let mut views = Vec::with_capacity(jobs.len());
    for id in jobs {
        views.push(JobView {
            record: norm_job(store.job(*id).await?),
            tasks: store.tasks(*id).await?.into_iter().map(norm_task).collect(),
            running: store.running(*id).await?,
        });
    }
    Ok(Snapshot {
        listed,
        newest,
        jobs: views,
        workers: store
            .workers()
            .await?
            .into_iter()
            .map(norm_worker)
            .collect(),
        models: store.models().await?,
        pinned: store.pinned_tasks().await?,
        usage: store.usage(0).await?,
    })
}

/// Returns the events of `job` after `after`, normalised; sorted when the step
/// ended leases in an unspecified order (see [`Op::ends_leases_unordered`]),
/// with sequence numbers cleared, as those follow the order.
async fn new_events(
    store: &dyn Store,
    job: JobId,
    after: u64,
    unordered: bool,
) -> StoreResult<Vec<Event>> {
    let mut events: Vec<Event> = store
        .events(job, after, ALL)
        .await?
        .into_iter()
        .map(norm_event)
        .collect();
    if unordered {
        for e in &mut events {
            e.seq = 0;
        }
        events.sort_by_key(|e| (e.task, e.kind as i32, e.epoch));
    }
    Ok(events)
}

/// Describes the first difference of two lists, or None if they are equal.
fn list_difference<T: Debug + PartialEq>(what: &str, a: &[T], b: &[T]) -> Option<String> {
    if let Some(i) = (0..a.len().min(b.len())).find(|i| a[*i] != b[*i]) {
        return Some(format!(
            "{what}[{i}] differs\nmemory: {:#?}\nredis: {:#?}",
            a[i], b[i]
        ));
    }
    (a.len() != b.len()).then(|| {
        format!(
            "{what}: memory has {} entries, redis {}\nmemory: {a:#?}\nredis: {b:#?}",
            a.len(),
            b.len()
        )
    })
}

/// Describes the first difference of two snapshots, or None if they are equal.
fn snapshot_difference(a: &Snapshot, b: &Snapshot) -> Option<String> {
    list_difference("jobs(ALL)", &a.listed, &b.listed)
        .or_else(|| list_difference("jobs(3)", &a.newest, &b.newest))
        .or_else(|| {
            a.jobs.iter().zip(&b.jobs).find_map(|(x, y)| {
                let id = x.record.id;
                (x.record != y.record)
                    .then(|| format!("job {id}\nmemory: {:#?}\nredis: {:#?}", x.record, y.record))
                    .or_else(|| list_difference(&format!("tasks({id})"), &x.tasks, &y.tasks))
                    .or_else(|| list_difference(&format!("running({id})"), &x.running, &y.running))
            })
        })
        .or_else(|| list_difference("workers()", &a.workers, &b.workers))
        .or_else(|| list_difference("models()", &a.models, &b.models))
        .or_else(|| list_difference("pinned_tasks()", &a.pinned, &b.pinned))
        .or_else(|| list_difference("usage(0)", &a.usage, &b.usage))
}

/// Chooses the steps of one case. It decides from the memory store's
/// snapshot after the previous step, which equals the Redis store's (or the
/// case has already failed), so a seed always gives the same sequence.
struct Generator {
    rng: Rng,
    seed: u64,
    /// Jobs submitted so far (including idempotent resubmissions' answers), in order.
    jobs: Vec<JobId>,
    /// Numbers the ids of the next job.
    submitted: u64,
    /// Every job submitted, as submitted, for resubmissions.
    sent: Vec<NewJob>,
    /// Workers that registered at least once.
    registered: Vec<WorkerId>,
    /// A worker whose leases fail more often, so quarantine (three faults of
    /// one worker on one job) comes up in a 50-step case.
    flaky: WorkerId,
    /// The case's `max_running_tasks`: one project capped at 1 or 2 in half
    /// the cases.
    caps: RunningCaps,
}

impl Generator {
    fn new(seed: u64) -> Self {
        let mut rng = Rng(seed);
        let flaky = WorkerId(rng.pick(&WORKERS).to_string());
        let caps = if rng.chance(50) {
            RunningCaps::from([(PROJECTS[0].to_string(), rng.between(1, 2))])
        } else {
            RunningCaps::new()
        };
        Self {
            rng,
            seed,
            jobs: Vec::new(),
            submitted: 0,
            sent: Vec::new(),
            registered: Vec::new(),
            flaky,
            caps,
        }
    }

    fn next_op(&mut self, snap: &Snapshot) -> Op {
        let leases = snap.leases();
        let history = snap.history();
        let roll = if self.registered.is_empty() {
            0
        } else {
            self.rng.below(100)
        };
        // Claims make up the rest (22..44, and any step that needs a lease
        // when none is held), so work flows: most leases end in a report.
        match roll {
            0..8 => self.register(),
            8..20 => self.submit(snap),
            20..22 => self.fail_unheld(),
            44..51 if !leases.is_empty() => self.heartbeat(&leases, &history),
            51..74 if !leases.is_empty() => self.complete(&leases, &history),
            74..86 if !leases.is_empty() => self.fail(&leases, &history),
            86..92 => self.expire(&leases),
            40..42 => self.steer(),
            42..44 => Op::Retry(self.job()),
            92..95 => self.cancel(),
            95..97 => Op::Drain(self.worker()),
            97..100 => Op::Reap {
                max_attempts: self.max_attempts(),
            },
            _ => self.claim(),
        }
    }

    /// Records what a step created, for the steps after it.
    fn learn(&mut self, op: &Op, answer: &Answer) {
        match (op, answer) {
            (Op::Register(reg, _), Answer::Registered(_)) if !self.registered.contains(&reg.id) => {
                self.registered.push(reg.id.clone());
            }
            (Op::Submit(_), Answer::Created(record, _)) if !self.jobs.contains(&record.id) => {
                self.jobs.push(record.id);
            }
            _ => {}
        }
    }

    /// A model, under one of the hashes recipes pin (or none).
    fn fail_unheld(&mut self) -> Op {
        let model = self.rng.pick(&MODELS).to_string();
        let hashes = [
            String::new(),
            format!("hash-{model}"),
            format!("hash-{model}-alt"),
        ];
        Op::FailUnheld {
            hash: self.rng.pick(&hashes),
            model,
        }
    }

    fn max_attempts(&mut self) -> u32 {
        self.rng.between(2, 4) as u32
    }

    /// A registered worker mostly; now and then any id, or one never registered.
    fn worker(&mut self) -> WorkerId {
        if self.registered.is_empty() || self.rng.chance(5) {
            let mut ids = WORKERS.to_vec();
            ids.push(GHOST);
            WorkerId(self.rng.pick(&ids).to_string())
        } else {
            self.rng.pick(&self.registered)
        }
    }

    fn register(&mut self) -> Op {
        let id = WorkerId(self.rng.pick(&WORKERS).to_string());
        let models = self
            .rng
            .subset(&MODELS)
            .into_iter()
            .map(|name| ModelInfo {
                // Now and then another build of the model: tasks pinned to a hash tell them apart.
                hash: if self.rng.chance(10) {
                    format!("hash-{name}-alt")
                } else {
                    format!("hash-{name}")
                },
                name,
            })
            .collect();
        let class = if self.rng.chance(70) {
            CLASSES[0]
        } else {
            CLASSES[1]
        };
        let owner = self.owner(&id);
        Op::Register(
            WorkerRegistration {
                id,
                labels: BTreeMap::from([("zone".to_string(), format!("z{}", self.rng.below(2)))]),
                gpu_memory_bytes: self.rng.between(1, 80) << 30,
                slots: self.rng.between(1, 4) as u32,
                models,
                determinism_class: class.to_string(),
                version: "diff".into(),
                assets: HeldAssets {
                    loras: LORAS
                        .iter()
                        .map(|name| ModelInfo {
                            name: name.to_string(),
                            hash: format!("hash-{name}"),
                        })
                        .collect(),
                    ..Default::default()
                },
            },
            owner,
        )
    }

    /// Returns the token a call under `worker` comes with: mostly the one
    /// that worker id belongs to, now and then another token or none (an
    /// impostor, refused while the worker is registered by its own).
    fn owner(&mut self, worker: &WorkerId) -> Owner {
        let home = WORKERS
            .iter()
            .position(|w| *w == worker.as_str())
            .unwrap_or(0)
            % OWNERS.len();
        match self.rng.below(100) {
            0..6 => OWNERS[(home + 1) % OWNERS.len()],
            6..8 => None,
            _ => OWNERS[home],
        }
    }

    /// Returns the caps of a claim: the case's, or none now and then (as
    /// after a reload of an auth file without them).
    fn caps(&mut self) -> RunningCaps {
        if self.rng.chance(15) {
            RunningCaps::new()
        } else {
            self.caps.clone()
        }
    }

    fn recipe(&mut self, model: &str) -> Recipe {
        // Few distinct recipes, so equal ones meet across jobs and are deduplicated.
        let seed = self.rng.below(3) as u64;
        let loras = match self.rng.below(4) {
            0 => vec![lora(LORAS[0])],
            1 => vec![lora(LORAS[1])],
            _ => Vec::new(),
        };
        Recipe {
            model: model.to_string(),
            model_hash: match self.rng.below(20) {
                0 | 1 => format!("hash-{model}"),
                2 => format!("hash-{model}-alt"),
                _ => String::new(),
            },
            prompt: format!("prompt {seed}"),
            negative_prompt: String::new(),
            seed,
            steps: 4,
            guidance: 5.0,
            // Two UNet batches per model, for the slot filling.
            width: if self.rng.chance(25) { 128 } else { 64 },
            height: 64,
            scheduler: Scheduler::Ddim,
            karras: false,
            eta: 0.0,
            strength: 1.0,
            init_image: None,
            mask: None,
            noise_seed: None,
            extras: kiln_proto::extras::Extras {
                loras,
                ..Default::default()
            },
        }
    }

    fn submit(&mut self, snap: &Snapshot) -> Op {
        self.submitted += 1;
        // Readable ids that grow with submission: case seed, job number, task index.
        let base = (u128::from(self.seed) << 64) | (u128::from(self.submitted) << 16);
        if !self.sent.is_empty() && self.rng.chance(20) {
            // The same spec submitted again (new ids, no key): equal recipes
            // and equal series meet, rendered at once or served from each other.
            let mut again = self.rng.pick(&self.sent);
            again.id = JobId(Uuid::from_u128(base));
            again.name = format!("job {}", self.submitted);
            again.idempotency_key = None;
            for t in &mut again.tasks {
                t.id = TaskId(Uuid::from_u128(base | u128::from(t.index + 1)));
            }
            self.sent.push(again.clone());
            return Op::Submit(again);
        }
        let n = self.rng.between(1, 6) as u32;
        let job_models = [self.rng.pick(&MODELS), self.rng.pick(&MODELS)];
        // A series from position `a` on: an anchor there and its shots after
        // it, plain tasks before it; or, now and then, shots only, from a
        // reference image, here one a task of the case rendered, so a shot
        // of a reference series can equal another series' released shot.
        let start = (n >= 2 && self.rng.chance(30)).then(|| self.rng.below(n as usize - 1) as u32);
        let images: Vec<String> = snap
            .tasks()
            .filter_map(|t| Some(t.result.as_ref()?.sha256.clone()))
            .collect();
        let reference = (start.is_some() && !images.is_empty() && self.rng.chance(30))
            .then(|| self.rng.pick(&images));
        let anchor = start.filter(|_| reference.is_none());
        let mut tasks = Vec::with_capacity(n as usize);
        for index in 0..n {
            let model = self.rng.pick(&job_models);
            let mut recipe = self.recipe(model);
            let series = match (start, &reference) {
                (Some(a), None) if index == a => Some(SeriesPlace {
                    name: "mira".into(),
                    shot: 0,
                    depends_on: None,
                }),
                (Some(a), _) if index > a || (index == a && reference.is_some()) => {
                    // As the spec expansion makes shots: they start from the
                    // anchor's image, or the reference image.
                    recipe.strength = 0.5;
                    recipe.noise_seed = Some(recipe.seed);
                    recipe.init_image = reference.clone();
                    Some(SeriesPlace {
                        name: "mira".into(),
                        shot: index - a + u32::from(reference.is_some()),
                        depends_on: anchor,
                    })
                }
                _ => None,
            };
            tasks.push(NewTask {
                id: TaskId(Uuid::from_u128(base | u128::from(index + 1))),
                index,
                recipe,
                file_name: format!("{index:05}-prompt.png"),
                series,
                avoid: Vec::new(),
            });
        }
        // Now and then a verification job: fixed class, avoid list, no dedupe.
        let verification = start.is_none() && self.rng.chance(6);
        if verification {
            let avoid = WorkerId(self.rng.pick(&WORKERS).to_string());
            for t in &mut tasks {
                t.avoid = vec![avoid.clone()];
            }
        }
        let verify_of = if verification && !self.jobs.is_empty() {
            Some(self.rng.pick(&self.jobs))
        } else {
            None
        };
        let job = NewJob {
            id: JobId(Uuid::from_u128(base)),
            name: format!("job {}", self.submitted),
            project: self.rng.pick(&PROJECTS).to_string(),
            priority: self.rng.pick(&[-1, 0, 0, 0, 1, 2]),
            idempotency_key: self
                .rng
                .chance(15)
                .then(|| format!("key-{}", self.rng.below(3))),
            tasks,
            blobs: Vec::new(),
            pin_class: start.is_some() || verification || self.rng.chance(10),
            class: verification.then(|| self.rng.pick(&CLASSES).to_string()),
            dedupe: !verification && self.rng.chance(85),
            verify_of,
            // Every other job carries a trace context, which both stores must keep.
            traceparent: self
                .submitted
                .is_multiple_of(2)
                .then(|| format!("00-{base:032x}-{:016x}-01", self.submitted + 1)),
            notify: Vec::new(),
            // Every third job names its submitter, which both stores must keep.
            submitted_by: self
                .submitted
                .is_multiple_of(3)
                .then(|| format!("token-{}", self.submitted % 7)),
        };
        self.sent.push(job.clone());
        Op::Submit(job)
    }

    fn claim(&mut self) -> Op {
        let worker = self.worker();
        let resident = if self.rng.chance(60) {
            Vec::new()
        } else {
            self.rng.subset(&MODELS)
        };
        let ready = MODELS
            .iter()
            .flat_map(|model| LORAS.iter().map(move |name| (model, name)))
            .filter(|_| self.rng.chance(30))
            .map(|(model, name)| kiln_proto::lora_set::ReadyLoraSet {
                model: model.to_string(),
                set: kiln_proto::lora_set::LoraSet::of(&[lora(name)]).key(),
            })
            .collect();
        Op::Claim {
            owner: self.owner(&worker),
            worker,
            max: self.rng.between(1, 4) as usize,
            resident,
            ready,
            caps: self.caps(),
        }
    }

    fn heartbeat(
        &mut self,
        leases: &[(WorkerId, TaskId, Epoch)],
        history: &[(WorkerId, TaskId, Epoch)],
    ) -> Op {
        let worker = if self.rng.chance(80) {
            self.rng.pick(leases).0
        } else {
            self.worker()
        };
        let mut reports: Vec<ProgressReport> = leases
            .iter()
            .filter(|(w, _, _)| *w == worker)
            .filter(|_| self.rng.chance(70))
            .map(|(_, task, epoch)| ProgressReport {
                task: *task,
                epoch: *epoch,
                step: 0,
            })
            .collect();
        if self.rng.chance(30) {
            // A lease the worker held once: lost, cancelled, or still its own.
            let (_, task, epoch) = self.rng.pick(history);
            reports.push(ProgressReport {
                task,
                epoch,
                step: 0,
            });
        }
        for r in &mut reports {
            // Past the recipe's 4 steps now and then: the stores clamp it.
            r.step = self.rng.between(0, 6) as u32;
        }
        Op::Heartbeat {
            owner: self.owner(&worker),
            worker,
            reports,
        }
    }

    fn complete(
        &mut self,
        leases: &[(WorkerId, TaskId, Epoch)],
        history: &[(WorkerId, TaskId, Epoch)],
    ) -> Op {
        let (worker, task, epoch) = match self.rng.below(100) {
            // A lease held now, by its holder: accepted.
            0..80 => self.rng.pick(leases),
            // An earlier lease: stale, or a replay of an accepted completion.
            80..90 => self.rng.pick(history),
            // Someone else's lease: stale.
            90..96 => {
                let (_, task, epoch) = self.rng.pick(leases);
                (self.worker(), task, epoch)
            }
            // A task that does not exist.
            _ => (
                self.worker(),
                TaskId(Uuid::from_u128(u128::from(self.rng.next()))),
                Epoch(1),
            ),
        };
        Op::Complete {
            owner: self.owner(&worker),
            worker,
            task,
            epoch,
        }
    }

    fn fail(
        &mut self,
        leases: &[(WorkerId, TaskId, Epoch)],
        history: &[(WorkerId, TaskId, Epoch)],
    ) -> Op {
        let flaky: Vec<_> = leases
            .iter()
            .filter(|(w, _, _)| *w == self.flaky)
            .cloned()
            .collect();
        let (worker, task, epoch) = if !flaky.is_empty() && self.rng.chance(50) {
            self.rng.pick(&flaky)
        } else if self.rng.chance(90) {
            self.rng.pick(leases)
        } else {
            self.rng.pick(history)
        };
        Op::Fail {
            owner: self.owner(&worker),
            worker,
            task,
            epoch,
            fault: self.rng.pick(&FAULTS),
            max_attempts: self.max_attempts(),
        }
    }

    fn expire(&mut self, leases: &[(WorkerId, TaskId, Epoch)]) -> Op {
        let max_attempts = self.max_attempts();
        if leases.is_empty() || self.rng.chance(40) {
            let worker = self.worker();
            return Op::ExpireByClaim {
                owner: self.owner(&worker),
                worker,
                max: self.rng.between(1, 3) as usize,
                max_attempts,
                caps: self.caps(),
            };
        }
        let worker = self.rng.pick(leases).0;
        let mine: Vec<_> = leases.iter().filter(|(w, _, _)| *w == worker).collect();
        let take = self.rng.between(1, 2) as usize;
        let reports = mine
            .iter()
            .skip(self.rng.below(mine.len()))
            .take(take)
            .map(|(_, task, epoch)| ProgressReport {
                task: *task,
                epoch: *epoch,
                step: 1,
            })
            .collect();
        Op::ExpireByHeartbeat {
            owner: self.owner(&worker),
            worker,
            reports,
            max_attempts,
        }
    }

    /// A job of the case mostly; now and then one that does not exist.
    fn job(&mut self) -> JobId {
        if self.jobs.is_empty() || self.rng.chance(10) {
            JobId(Uuid::from_u128(u128::from(self.rng.next())))
        } else {
            self.rng.pick(&self.jobs)
        }
    }

    /// A pause, a resume or a priority change.
    fn steer(&mut self) -> Op {
        let job = self.job();
        match self.rng.below(3) {
            0 => Op::Pause(job, true),
            1 => Op::Pause(job, false),
            _ => Op::Priority(job, self.rng.between(0, 4) as i32 - 2),
        }
    }

    fn cancel(&mut self) -> Op {
        if self.jobs.is_empty() || self.rng.chance(10) {
            Op::Cancel(JobId(Uuid::from_u128(u128::from(self.rng.next()))))
        } else {
            Op::Cancel(self.rng.pick(&self.jobs))
        }
    }
}

/// How often the interesting paths were taken, so a generator that stops
/// reaching one of them fails the test instead of silently testing less.
#[derive(Debug, Default)]
struct Coverage {
    ops: BTreeMap<&'static str, u64>,
    leases: u64,
    deduped: u64,
    accepted: u64,
    stale: u64,
    not_retried: u64,
    reaped: u64,
    released_on_register: u64,
    abandoned: u64,
    errors: u64,
    /// (job, worker) pairs that reached the quarantine threshold.
    quarantines: u64,
    /// Shots that got leased or served after their anchor.
    shots_run: u64,
    /// Failed tasks a retry put back in the queue.
    retried: u64,
    /// Jobs by final state, at the end of each case.
    finished: BTreeMap<String, u64>,
}

impl Coverage {
    fn absorb(&mut self, other: Coverage) {
        for (name, n) in other.ops {
            *self.ops.entry(name).or_default() += n;
        }
        for (state, n) in other.finished {
            *self.finished.entry(state).or_default() += n;
        }
        self.leases += other.leases;
        self.deduped += other.deduped;
        self.accepted += other.accepted;
        self.stale += other.stale;
        self.not_retried += other.not_retried;
        self.reaped += other.reaped;
        self.released_on_register += other.released_on_register;
        self.abandoned += other.abandoned;
        self.errors += other.errors;
        self.quarantines += other.quarantines;
        self.shots_run += other.shots_run;
        self.retried += other.retried;
    }

    fn step(&mut self, op: &Op, answer: &Answer) {
        *self.ops.entry(op.name()).or_default() += 1;
        match answer {
            Answer::Registered(r) => self.released_on_register += r.len() as u64,
            Answer::Claimed(c) | Answer::ExpiredByClaim(c, _) => {
                self.leases += c.leases.len() as u64;
                self.deduped += c.deduped.len() as u64;
            }
            Answer::Beat(hb) => self.abandoned += hb.abandon.len() as u64,
            Answer::Completed(CompleteOutcome::Accepted { .. }) => self.accepted += 1,
            Answer::Completed(CompleteOutcome::Stale { .. })
            | Answer::Failed(FailOutcome::Stale { .. }) => self.stale += 1,
            Answer::Failed(FailOutcome::Recorded {
                will_retry: false, ..
            }) => self.not_retried += 1,
            Answer::Error(_) => self.errors += 1,
            Answer::Retried(_, n) => self.retried += u64::from(*n),
            _ => {}
        }
        if let Answer::ExpiredByHeartbeat(_, r) | Answer::ExpiredByClaim(_, r) | Answer::Reaped(r) =
            answer
        {
            self.reaped += r.len() as u64;
        }
    }

    fn end_of_case(&mut self, snap: &Snapshot) {
        for job in &snap.jobs {
            *self
                .finished
                .entry(job.record.state.name().to_string())
                .or_default() += 1;
            let mut faults: BTreeMap<&WorkerId, u32> = BTreeMap::new();
            for t in &job.tasks {
                for a in t.attempts.iter().filter(|a| a.outcome.is_fault()) {
                    *faults.entry(&a.worker).or_default() += 1;
                }
                let is_shot = t.series.as_ref().is_some_and(|s| s.depends_on.is_some());
                if is_shot && (!t.attempts.is_empty() || t.state == TaskState::Completed) {
                    self.shots_run += 1;
                }
            }
            self.quarantines += faults.values().filter(|n| **n >= QUARANTINE_AFTER).count() as u64;
        }
    }

    /// Panics when a path every full run reaches was never taken.
    fn assert_broad(&self) {
        let counters = [
            ("leases", self.leases),
            ("deduped", self.deduped),
            ("accepted completions", self.accepted),
            ("stale reports", self.stale),
            ("failures not retried", self.not_retried),
            ("reaped leases", self.reaped),
            (
                "leases released by a re-registration",
                self.released_on_register,
            ),
            ("abandoned heartbeat entries", self.abandoned),
            ("errors", self.errors),
            ("quarantines", self.quarantines),
            ("shots run", self.shots_run),
            ("retried tasks", self.retried),
        ];
        for (what, n) in counters {
            assert!(n > 0, "no {what} in the whole run: {self:#?}");
        }
        for state in [JobState::Completed, JobState::Failed, JobState::Cancelled] {
            assert!(
                self.finished.contains_key(state.name()),
                "no job ended {state:?}: {self:#?}"
            );
        }
    }
}

/// Panics with everything needed to replay and understand a divergence.
fn diverged(seed: u64, index: usize, ops: &[Op], what: &str) -> ! {
    let steps: String = ops
        .iter()
        .enumerate()
        .map(|(i, op)| format!("  #{i}: {op:?}\n"))
        .collect();
    panic!(
        "the memory and Redis stores diverge: case seed {seed} (rerun with \
         KILN_DIFF_SEED={seed}), operation #{index} ({})\noperations so far:\n{steps}{what}",
        ops.last().map_or("", Op::name)
    );
}

fn both<T: Debug>(memory: &T, redis: &T) -> String {
    format!("memory: {memory:#?}\nredis: {redis:#?}")
}

/// Runs one case: a fresh memory store and a fresh farm on the shared Redis.
async fn run_case(url: &str, seed: u64) -> Coverage {
    let mut coverage = Coverage::default();
    let memory = MemoryStore::new();
    let redis = RedisStore::connect(&RedisConfig {
        url: url.to_string(),
        name: format!("diff-{seed}-{}", Uuid::new_v4().simple()),
        retention: Duration::from_secs(3600),
    })
    .await
    .expect("connect to the test redis");
    let mut generator = Generator::new(seed);
    let mut ops: Vec<Op> = Vec::with_capacity(OPS_PER_CASE);
    // Events of each job seen so far (equal in both stores, or the case failed).
    let mut seen: BTreeMap<JobId, u64> = BTreeMap::new();
    let mut snap = Snapshot::empty();
    for index in 0..OPS_PER_CASE {
        let op = generator.next_op(&snap);
        ops.push(op.clone());
        let a = apply(&memory, &op).await;
        let b = apply(&redis, &op).await;
        if a != b {
            diverged(
                seed,
                index,
                &ops,
                &format!("answers differ\n{}", both(&a, &b)),
            );
        }
        generator.learn(&op, &a);
        coverage.step(&op, &a);
        let sa = snapshot(&memory, &generator.jobs).await;
        let sb = snapshot(&redis, &generator.jobs).await;
        let (sa, sb) = match (sa, sb) {
            (Ok(sa), Ok(sb)) => (sa, sb),
            (sa, sb) => diverged(
                seed,
                index,
                &ops,
                &format!("a read failed\n{}", both(&sa.err(), &sb.err())),
            ),
        };
        if let Some(d) = snapshot_difference(&sa, &sb) {
            diverged(seed, index, &ops, &d);
        }
        for job in &generator.jobs {
            let after = seen.get(job).copied().unwrap_or(0);
            let unordered = op.ends_leases_unordered();
            let ea = new_events(&memory, *job, after, unordered).await;
            let eb = new_events(&redis, *job, after, unordered).await;
            match (ea, eb) {
                (Ok(ea), Ok(eb)) => {
                    if let Some(d) = list_difference(&format!("new events of {job}"), &ea, &eb) {
                        diverged(seed, index, &ops, &d);
                    }
                    seen.insert(*job, after + ea.len() as u64);
                }
                (ea, eb) => diverged(
                    seed,
                    index,
                    &ops,
                    &format!("events({job}) failed\n{}", both(&ea.err(), &eb.err())),
                ),
            }
        }
        snap = sa;
    }
    coverage.end_of_case(&snap);
    coverage
}

fn env_number(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, got {v:?}")),
    )
}

#[tokio::test]
async fn memory_and_redis_stores_agree() {
    let seeds: Vec<u64> = match env_number("KILN_DIFF_SEED") {
        Some(seed) => vec![seed],
        None => (0..env_number("KILN_DIFF_CASES").unwrap_or(DEFAULT_CASES)).collect(),
    };
    let server = kiln_tests::redis::RedisServer::start().expect("redis-server");
    // The fixture fsyncs every write (AOF, appendfsync always) for the
    // crash tests; durability is no part of this test, and an fsync per
    // script would make it I/O-bound.
    let client = ::redis::Client::open(server.url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the test redis");
    let () = ::redis::cmd("CONFIG")
        .arg("SET")
        .arg("appendonly")
        .arg("no")
        .query_async(&mut conn)
        .await
        .expect("turn the AOF off");
    let started = Instant::now();
    let url = server.url();
    // A few cases at once: each waits on Redis round trips most of the
    // time. Cases share nothing (each has its own farm on the server), and
    // a case's steps stay in order, so results do not depend on the interleaving.
    let coverage = futures::stream::iter(seeds.iter().map(|seed| run_case(&url, *seed)))
        .buffer_unordered(CONCURRENT_CASES)
        .fold(Coverage::default(), |mut all, one| async move {
            all.absorb(one);
            all
        })
        .await;
    eprintln!(
        "differential: {} cases of {OPS_PER_CASE} operations agree in {:.1?}\n{coverage:#?}",
        seeds.len(),
        started.elapsed()
    );
    // One case may miss a path; a full run must not.
    if seeds.len() >= 100 {
        coverage.assert_broad();
    }
}
