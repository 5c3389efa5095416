//! The scheduling policy (DESIGN.md §6): its numbers and its rules, in one
//! place. The memory store applies them as written here (`memory/claim.rs`
//! walks its indexes and asks these functions); the Redis store's
//! `redis/claim.lua` and `redis/fail.lua` mirror them step by step, with the
//! numbers generated from the constants below (`redis/scripts.rs`); the
//! conformance suite checks that both stores agree.
//!
//! When a worker asks for work:
//! 1. **Eligibility.** Tasks it may not take are skipped: a job pinned to
//!    another determinism class, a model it does not hold (or a pinned hash
//!    it does not have), a LoRA, embedding or ControlNet of the recipe it
//!    does not hold under the recipe's hash ([`task_needs`], [`held_keys`],
//!    [`holds_all`]), a shot whose anchor is not done, and — while another
//!    worker can take them ([`can_stand_in`]) — tasks of a job that
//!    quarantined it ([`quarantined`]) and tasks it failed before
//!    ([`task_open_to`]), and every task of a project that has as many tasks
//!    leased as its `max_running_tasks` allows ([`under_cap`]; the caps come
//!    from the auth file in force at the claim). A capped project's tasks
//!    wait while other projects' tasks are still leased; when one of its
//!    leases ends, waiting claims are woken.
//!    A paused job gets no leases at all ([`leasable`]); it keeps its
//!    place (its fair-share clocks do not move while it waits).
//! 2. **Order** ([`job_rank`]): higher priority first (`kiln priority`
//!    changes a running job's priority in place); among equal priority
//!    the least recently served project, then the least recently served job
//!    (round-robin fair share); within a job, the item order.
//! 3. **Model affinity** ([`choose`]): tasks for models the worker has
//!    resident first; it switches model when nobody holds the other model,
//!    or when the switch balances the farm ([`switch_justified`]): the other
//!    model's holders need longer than a load to clear its backlog, and
//!    longer than the resident model's remaining holders need for theirs.
//!    A worker sent to load a model counts as that model's holder, and no
//!    longer as a holder of its old one, until it reports the model loaded
//!    ([`still_loading`], [`holds_for_affinity`]), so claims that follow
//!    within the load time do not send more workers after it.
//! 4. **LoRA-set affinity** ([`needs_merge`], [`set_ready`]): steps 2 and 3
//!    have chosen a task, and with it a job and a model; those stand. When
//!    the chosen task would make the worker merge LoRAs (its set,
//!    [`task_lora_set`], is not one the worker reported ready for the
//!    model), the worker takes instead the first task among the first
//!    [`READY_LOOKAHEAD`] queued tasks of that job and model, in item order,
//!    that it may take and whose set it holds ready (served from an earlier
//!    result on the way, as heads are). Only the item order within one job
//!    and model bends: priority, fair share between jobs and model affinity
//!    decide as before, and a task without LoRAs is never passed over.
//! 5. **Batch filling**: free slots take tasks with the first task's
//!    [`BatchKey`](kiln_proto::recipe::BatchKey) ([`task_batch_key`]), then
//!    tasks of the same model whose LoRA set the worker holds ready or the
//!    first task's set ([`set_ready`]), then other tasks of the same model,
//!    in the same order.
//!
//! When a worker reports a fault, [`retry_after_fault`] decides whether the
//! task goes back to the queue.
//!
//! A worker id is bound to the token that registered it while the worker is
//! [`alive`]: only that token may lease, heartbeat, complete or fail under it
//! ([`acts_for`]), and another token may register the id again only once the
//! worker is dead ([`may_register`]).

use std::cmp::Reverse;

use kiln_proto::ids::JobId;
use kiln_proto::recipe::Recipe;

use super::state::{Fault, JobState, TaskState, WorkerState};

/// Faults (failures or expiries) of one worker on one job after which the
/// worker gets no more of that job's tasks, while another worker can take them.
pub const QUARANTINE_AFTER: u32 = 3;

/// The cost of a model load, in renders: a worker switches to a model it
/// does not have resident only when the model's waiting tasks exceed this
/// many per worker that already has it resident (or when no live worker has
/// it resident). At 8 tasks of a few hundred milliseconds each, the holders
/// need longer than a typical model load (a few seconds) to clear the backlog
/// themselves, so the load pays for itself ([`switch_justified`]).
pub const SWITCH_BACKLOG_PER_HOLDER: usize = 8;

/// How much longer, in hundredths of a render per holder, the other model's
/// backlog must take to clear than the resident model's for a worker to
/// leave a resident model that still has work ([`switch_justified`]): half a
/// render. Without it, two models at balance trade workers back and forth on
/// the jitter of who finished when (each trade a load); with more, the farm
/// stays that much out of balance and the makespan that much longer.
pub const SWITCH_MARGIN_PERCENT: usize = 50;

/// Queued tasks of the chosen job and model, from the front of its queue,
/// among which LoRA-set affinity looks for one whose set the worker holds
/// ready (step 4): both stores read this same window, so they agree, and a
/// claim reads a bounded number of tasks however long the queue.
pub const READY_LOOKAHEAD: usize = 16;

/// A worker that called within this long counts as live: only live workers
/// count as stand-ins for a task or as holders of a model, and only they
/// decide what a model name means ([`kiln_proto::model`]).
pub const LIVE_MS: u64 = 60_000;

/// Returns true while a worker silent for `silent_ms` counts as alive: it
/// called within [`LIVE_MS`]. The one liveness rule: stand-ins, model holders
/// and worker binding all ask it (a draining worker is alive, but takes no
/// new work).
pub fn alive(silent_ms: u64) -> bool {
    silent_ms < LIVE_MS
}

/// Returns true when a waiting claim, woken by work, may still lease to its
/// worker: the worker was heard from (a heartbeat or a call of its own;
/// a waiting claim's retries do not count) within the lease TTL (`ttl_ms`).
/// A worker silent that long has had its own leases expire; a long poll it
/// left open while stopped must not lease them back to it.
pub fn waiting_claim_may_lease(silent_ms: u64, ttl_ms: u64) -> bool {
    silent_ms < ttl_ms
}

/// Returns true when `caller` (the name of the calling token; `None` without
/// `--auth`) may act under a worker id whose session `owner` opened: only
/// the same token may.
pub fn acts_for(owner: Option<&str>, caller: Option<&str>) -> bool {
    owner == caller
}

/// Returns true when `caller` may register a worker id whose last session
/// `owner` opened and which has been silent for `silent_ms`: the same token
/// may at any time (a restarted worker), another one only once that worker
/// is dead.
pub fn may_register(owner: Option<&str>, silent_ms: u64, caller: Option<&str>) -> bool {
    acts_for(owner, caller) || !alive(silent_ms)
}

/// Returns true when tasks of a job in `state` may be leased: it runs and
/// is not paused (`kiln pause`).
pub fn leasable(state: JobState, paused: bool) -> bool {
    state == JobState::Running && !paused
}

/// Returns true when `kiln retry` puts a task in `state` back in the queue
/// with fresh attempts: it failed for good. A retried job's tasks count their
/// attempts from the retry on ([`TaskRecord::counted_from`](super::TaskRecord::counted_from));
/// the job's per-worker fault counts (quarantine) start again from zero.
pub fn retryable(state: TaskState) -> bool {
    state == TaskState::Failed
}

/// Returns true when `kiln retry` may touch a job in `state`: any but a
/// cancelled one (a cancel is final).
pub fn job_retryable(state: JobState) -> bool {
    state != JobState::Cancelled
}

/// Returns true when a project with `running` leased tasks may get one more
/// under its `max_running_tasks` (`None`: no cap).
pub fn under_cap(running: u64, cap: Option<u64>) -> bool {
    cap.is_none_or(|cap| running < cap)
}

/// Returns what a worker counts as in the farm's counts: lost once not
/// [`alive`] (draining or not), else draining, else busy while it holds
/// a lease, else idle. `stats.lua` mirrors it on Redis.
pub fn worker_state(silent_ms: u64, draining: bool, leases: usize) -> WorkerState {
    if !alive(silent_ms) {
        WorkerState::Lost
    } else if draining {
        WorkerState::Draining
    } else if leases > 0 {
        WorkerState::Busy
    } else {
        WorkerState::Idle
    }
}

/// Returns true when a registered worker is live for the farm: alive
/// ([`alive`]) and not draining. Only live workers decide what a model name
/// means and count as holders of a pinned hash (`live` in
/// `redis/prelude.lua` in Lua).
pub fn is_live(draining: bool, silent_ms: u64) -> bool {
    !draining && alive(silent_ms)
}

/// Most tasks one claim completes from earlier results.
pub const MAX_DEDUPED_PER_CLAIM: usize = 1000;

/// Returns the batch key text a task is stored with: the key of the recipe
/// as it will be leased. A shot (`waits_for_anchor`) is leased with its
/// anchor's image as its init image, so its key is the img2img one even
/// before the anchor is done. Stored once per task, so no store recomputes it.
pub fn task_batch_key(recipe: &Recipe, waits_for_anchor: bool) -> String {
    if waits_for_anchor && recipe.init_image.is_none() {
        // Only the presence of an init image enters the key, not its hash.
        let mut leased = recipe.clone();
        leased.init_image = Some(String::new());
        return leased.batch_key().to_string();
    }
    recipe.batch_key().to_string()
}

/// Returns the key of one asset (`lora`, `embedding` or `controlnet`) a task
/// needs or a worker holds: `KIND:NAME:HASH`. Names follow the catalog name
/// rule, so they hold no `:`.
pub fn asset_key(kind: &str, name: &str, hash: &str) -> String {
    format!("{kind}:{name}:{hash}")
}

/// Returns the assets a task needs, as [`asset_key`]s: every LoRA, embedding
/// and ControlNet its recipe names, with the hash admission resolved (an
/// empty hash: any). Stored once per task, as the batch key is.
pub fn task_needs(recipe: &Recipe) -> Vec<String> {
    let e = &recipe.extras;
    let mut out: Vec<String> = e
        .loras
        .iter()
        .map(|l| asset_key("lora", &l.name, &l.hash))
        .chain(
            e.embeddings
                .iter()
                .map(|x| asset_key("embedding", &x.name, &x.hash)),
        )
        .chain(
            e.controlnets
                .iter()
                .map(|c| asset_key("controlnet", &c.model, &c.hash)),
        )
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Returns the keys a worker's assets answer to: `KIND:NAME:HASH` for each,
/// and `KIND:NAME:` so that a need without a hash matches any.
pub fn held_keys(assets: &super::HeldAssets) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for (kind, list) in [
        ("lora", &assets.loras),
        ("embedding", &assets.embeddings),
        ("controlnet", &assets.controlnets),
    ] {
        for m in list {
            out.insert(asset_key(kind, &m.name, &m.hash));
            out.insert(asset_key(kind, &m.name, ""));
        }
    }
    out
}

/// Returns true when a worker holding `held` keys has every asset a task
/// `needs`: the rule `claim.lua` mirrors with `holds_needs`.
pub fn holds_all(needs: &[String], held: impl Fn(&str) -> bool) -> bool {
    needs.iter().all(|n| held(n))
}

/// Returns the LoRA set key a task is stored with
/// ([`LoraSet::key`](kiln_proto::lora_set::LoraSet::key) of its recipe's
/// LoRAs, with the hashes admission pinned): the key a worker reports for the
/// set once it holds it merged. Empty without LoRAs. Stored once per task, as
/// the batch key is (`lset` on Redis).
pub fn task_lora_set(recipe: &Recipe) -> String {
    kiln_proto::lora_set::LoraSet::of(&recipe.extras.loras).key()
}

/// Returns true when a task with LoRA set `set` renders without a merge on a
/// worker for which `ready(set)` holds: the set is not empty and ready. A task
/// without LoRAs is never ready in this sense, so it is no reason to look
/// past another task.
pub fn set_ready(set: &str, ready: impl Fn(&str) -> bool) -> bool {
    !set.is_empty() && ready(set)
}

/// Returns true when the chosen task would make the worker merge: its set is
/// not empty and not ready (`ready`). Only then does a claim look for a task
/// whose set is [`set_ready`] (policy step 4).
pub fn needs_merge(set: &str, ready: impl Fn(&str) -> bool) -> bool {
    !set.is_empty() && !ready(set)
}

/// Returns the dedupe key of a recipe rendered on a determinism class: the
/// recipe hash (which covers the model hash and input images) and the class.
pub fn dedupe_key(recipe_hash: &str, class: &str) -> String {
    format!("{recipe_hash}|{class}")
}

/// Returns the sort key of a job with work: higher priority, then the least
/// recently served project, then the least recently served job, then the
/// oldest (job ids grow with time).
pub fn job_rank(
    priority: i32,
    project_served: u64,
    job_served: u64,
    id: JobId,
) -> (Reverse<i32>, u64, u64, JobId) {
    (Reverse(priority), project_served, job_served, id)
}

/// Returns true once a worker's faults on a job quarantine it for the job.
pub fn quarantined(faults: u32) -> bool {
    faults >= QUARANTINE_AFTER
}

/// What the policy knows of a worker that might take a task instead of
/// the one asking.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    /// The worker takes no new work.
    pub draining: bool,
    /// Milliseconds since its last call.
    pub silent_ms: u64,
    /// Its determinism class.
    pub class: &'a str,
    /// The hash of the task's model, when the worker holds that model.
    pub model_hash: Option<&'a str>,
    /// Its faults on the task's job.
    pub job_faults: u32,
    /// It holds every LoRA, embedding and ControlNet the task needs ([`holds_all`]).
    pub holds_assets: bool,
}

/// Returns true when `c` could take a task whose model is pinned to
/// `model_hash` (empty: any hash) of a job pinned to `pinned_class`: it is
/// live, not draining, not quarantined for the job, holds the model and is of
/// the class. Only such a worker justifies keeping a task from the asker; a
/// live worker without the model is no alternative (a job would wait for it
/// forever).
pub fn can_stand_in(c: &Candidate<'_>, model_hash: &str, pinned_class: Option<&str>) -> bool {
    is_live(c.draining, c.silent_ms)
        && !quarantined(c.job_faults)
        && c.holds_assets
        && c.model_hash
            .is_some_and(|h| model_hash.is_empty() || h == model_hash)
        && pinned_class.is_none_or(|p| p == c.class)
}

/// Returns true when the asker may take a task it is otherwise eligible for:
/// not when it is quarantined for the job and another worker can stand in
/// (`stand_in_for_job`), nor when it failed this task before and a worker
/// that did not can stand in (`stand_in_outside_avoid`). Both are asked
/// lazily: they scan the workers.
pub fn task_open_to(
    quarantined: bool,
    avoided: bool,
    stand_in_for_job: impl FnOnce() -> bool,
    stand_in_outside_avoid: impl FnOnce() -> bool,
) -> bool {
    let kept_by_quarantine = quarantined && stand_in_for_job();
    let kept_by_avoid = avoided && stand_in_outside_avoid();
    !(kept_by_quarantine || kept_by_avoid)
}

/// The first claimable task found for a worker, with what affinity needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Pick<T> {
    /// Its job's priority.
    pub priority: i32,
    /// The task.
    pub task: T,
    /// Its model.
    pub model: String,
}

/// Applies model affinity to the first claimable task overall
/// (`first_choice`) and the first one for a resident model
/// (`first_resident`), both in policy order. `holders(model)` counts the live
/// workers other than the asker that hold the model for affinity
/// ([`holds_for_affinity`]), and those that may (they have reported nothing
/// yet); `backlog(model)` counts the model's queued tasks
/// in every running job (claimable by the asker or not: the load is judged
/// by the work waiting, not by who may take it).
pub fn choose<T>(
    first_resident: Option<Pick<T>>,
    first_choice: Option<Pick<T>>,
    holders: impl Fn(&str) -> Holders,
    backlog: impl Fn(&str) -> usize,
) -> Option<T>
where
    T: PartialEq,
{
    let load = |model: &str| {
        let h = holders(model);
        ModelLoad {
            backlog: backlog(model),
            holders: h.reported,
            unreported: h.unreported,
        }
    };
    match (first_resident, first_choice) {
        // Equal or better resident work: keep to it, unless the first
        // choice's model has waiting work and no live worker holds it (it
        // would starve behind the resident models), or unless leaving the
        // resident model for it balances the farm.
        (Some(r), Some(c)) if r.priority >= c.priority => {
            let starving = c.task != r.task && holders(&c.model).all() == 0;
            let balances =
                c.model != r.model && switch_justified(load(&c.model), Some(load(&r.model)));
            if starving || balances {
                Some(c.task)
            } else {
                Some(r.task)
            }
        }
        (resident, Some(c)) => {
            if switch_justified(load(&c.model), None) {
                Some(c.task)
            } else {
                resident.map(|r| r.task)
            }
        }
        (_, None) => None,
    }
}

/// The live workers other than the asker that count for a model
/// ([`holds_for_affinity`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Holders {
    /// Those that hold it ([`Holding::Resident`]).
    pub reported: usize,
    /// Those that have reported nothing and have it in their catalog
    /// ([`Holding::Unreported`]).
    pub unreported: usize,
}

impl Holders {
    /// Counts one more worker as `holding` says.
    pub fn add(&mut self, holding: Holding) {
        match holding {
            Holding::Resident => self.reported += 1,
            Holding::Unreported => self.unreported += 1,
            Holding::No => {}
        }
    }

    /// Returns every worker that holds the model or may.
    pub fn all(&self) -> usize {
        self.reported + self.unreported
    }
}

/// The work waiting for a model and who serves it, as [`switch_justified`]
/// weighs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelLoad {
    /// Queued tasks of the model in running jobs.
    pub backlog: usize,
    /// Live workers other than the asker that hold it ([`Holding::Resident`]).
    pub holders: usize,
    /// Live workers other than the asker that may hold it: they have
    /// reported nothing yet ([`Holding::Unreported`]).
    pub unreported: usize,
}

/// Returns true when a worker should load model `to` rather than keep to
/// its resident model `from` (`None`: it has no resident work of the same
/// priority, or none at all). In tasks per holder, the drain time:
/// - nobody holds `to`, nor may (`unreported`): always (its work would
///   wait forever);
/// - the load must pay for itself: `to`'s holders (and those that may hold
///   it) need longer than a load
///   ([`SWITCH_BACKLOG_PER_HOLDER`] renders) to clear its backlog, which is
///   exactly when `to` with this worker (after its load) finishes sooner
///   than without it. An idle worker follows this rule alone, so workers do
///   not pile onto a model at the end of its backlog to load it for one task;
/// - and `from`, left to its other holders, must still finish before `to`
///   does now, by [`SWITCH_MARGIN_PERCENT`] of a render per holder
///   (`from.backlog / from.holders + margin < to.backlog / to.holders`), so
///   the switch shortens the longer of the two, and a worker that just
///   switched does not justify a switch back: the same comparison, seen from
///   the other side, fails by this worker's own share plus the margin,
///   which covers the jitter of a real farm. A worker that is the last
///   holder of `from` stays. This comparison waits while a live worker
///   that may hold either model has reported nothing yet (it registered
///   and has not claimed): workers that arrive together (a farm scaled up
///   under a queue) would otherwise trade loads over the accidents of who
///   claimed first, which the arrivals still to come undo.
///
/// This balances the farm as soon as the work arrives instead of switching
/// workers at the end of the resident backlogs, when the loads only add time.
pub fn switch_justified(to: ModelLoad, from: Option<ModelLoad>) -> bool {
    let to_all = to.holders + to.unreported;
    if to_all == 0 {
        return true;
    }
    if to.backlog <= SWITCH_BACKLOG_PER_HOLDER * to_all {
        return false;
    }
    match from {
        None => true,
        Some(from) if from.backlog == 0 => true,
        // from.backlog / from.holders + margin / 100 < to.backlog / to.holders,
        // in integers.
        Some(from) => {
            from.unreported == 0
                && to.unreported == 0
                && from.holders > 0
                && to.holders > 0
                && 100 * from.backlog * to.holders
                    + SWITCH_MARGIN_PERCENT * from.holders * to.holders
                    < 100 * to.backlog * from.holders
        }
    }
}

/// Returns true while a worker counts as loading `loading`, the model its
/// last switch sent it to: it has not reported that model resident yet
/// (`reported`, at this claim) and still holds leases (`leases`; a worker
/// without leases reports what it really has, a failed load included).
pub fn still_loading(loading: &str, reported: &[String], leases: usize) -> bool {
    leases > 0 && !reported.iter().any(|m| m == loading)
}

/// How a worker counts for a model in model affinity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holding {
    /// It has the model resident, or is loading it.
    Resident,
    /// It has reported nothing resident (it has not claimed since it
    /// registered) and the model is in its catalog.
    Unreported,
    /// Neither.
    No,
}

/// Returns how a worker counts for `model` in model affinity: while it is
/// loading a model ([`still_loading`]) it holds only that one; else the
/// models it reported resident; when it reports none, it may hold every
/// model of its catalog (`in_catalog`).
pub fn holds_for_affinity(
    model: &str,
    loading: Option<&str>,
    resident: &[String],
    in_catalog: impl FnOnce() -> bool,
) -> Holding {
    let holds = match loading {
        Some(l) => l == model,
        None if resident.is_empty() => {
            return if in_catalog() {
                Holding::Unreported
            } else {
                Holding::No
            };
        }
        None => resident.iter().any(|m| m == model),
    };
    if holds {
        Holding::Resident
    } else {
        Holding::No
    }
}

/// What happens to a task after its holder reported `fault`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterFault {
    /// The worker handed the task back: queued again, no attempt used.
    HandBack,
    /// Queued again, to be retried (elsewhere when possible).
    Retry,
    /// Failed for good: the recipe is bad, or the attempts are used up.
    Exhausted,
    /// Failed for good: the worker is now quarantined for the job and no
    /// other worker can take the task, which would otherwise wait forever.
    Stranded,
}

/// Decides a task's fate after a fault: `used` counts its faults including
/// this one; `quarantined_now` tells whether the worker is quarantined for
/// the job with this fault counted, and `stand_in` whether another worker
/// can take the task (asked only then).
pub fn retry_after_fault(
    fault: Fault,
    used: usize,
    max_attempts: u32,
    quarantined_now: bool,
    stand_in: impl FnOnce() -> bool,
) -> AfterFault {
    if fault == Fault::Cancelled {
        AfterFault::HandBack
    } else if fault == Fault::BadInput || used >= max_attempts as usize {
        AfterFault::Exhausted
    } else if quarantined_now && !stand_in() {
        AfterFault::Stranded
    } else {
        AfterFault::Retry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(backlog: usize, holders: usize) -> ModelLoad {
        ModelLoad {
            backlog,
            holders,
            unreported: 0,
        }
    }

    #[test]
    fn switching_needs_a_reason() {
        assert!(switch_justified(load(1, 0), None), "nobody holds the model");
        assert!(
            switch_justified(load(1, 0), Some(load(500, 0))),
            "nobody holds the model, even when the asker is the last holder of its own"
        );
        assert!(
            !switch_justified(load(8, 1), None),
            "one holder clears 8 tasks soon enough"
        );
        assert!(switch_justified(load(9, 1), None));
        assert!(!switch_justified(load(40, 5), None));
    }

    #[test]
    fn a_switch_balances_the_drain_time_per_holder() {
        // The bench's start: 8000 tasks on 67 holders, 6000 on 66 others.
        assert!(switch_justified(load(8000, 67), Some(load(6000, 66))));
        // Balanced (100 tasks per holder either way): nobody moves.
        assert!(!switch_justified(load(8000, 80), Some(load(6000, 60))));
        // Within one worker's share of balance: the resident model left to
        // 59 holders would finish after the other one.
        assert!(!switch_justified(load(8000, 80), Some(load(6000, 59))));
        assert!(!switch_justified(load(8000, 79), Some(load(6000, 59))));
        assert!(switch_justified(load(8000, 78), Some(load(6000, 59))));
        // Half a render per holder of margin: 100.0 + 0.5 is not below 100.4.
        assert!(!switch_justified(load(10040, 100), Some(load(10000, 100))));
        assert!(switch_justified(load(10051, 100), Some(load(10000, 100))));
        // The last holder of a model with work stays with it.
        assert!(!switch_justified(load(8000, 10), Some(load(5, 0))));
        // A resident model with nothing queued leaves like an idle worker.
        assert!(switch_justified(load(90, 10), Some(load(0, 3))));
        // The load must pay for itself even when the other model is behind.
        assert!(!switch_justified(load(80, 10), Some(load(1, 5))));
        // Workers that have reported nothing count against a load, but not
        // in the balance: they may hold any model of their catalog.
        let unreported = |backlog, holders, unreported| ModelLoad {
            backlog,
            holders,
            unreported,
        };
        assert!(!switch_justified(unreported(50, 0, 10), None));
        assert!(switch_justified(unreported(50, 1, 4), None));
        assert!(
            !switch_justified(unreported(8000, 67, 1), Some(unreported(6000, 66, 0))),
            "the balance waits for every worker's first report"
        );
        assert!(!switch_justified(
            unreported(8000, 67, 0),
            Some(unreported(6000, 66, 1))
        ));
        assert!(switch_justified(
            unreported(8000, 67, 0),
            Some(unreported(6000, 66, 0))
        ));
    }

    #[test]
    fn a_switch_never_justifies_the_switch_back() {
        // Every state where a worker of `a` moves to `b`: from the state after
        // the move, no worker of `b` moves back to `a`, even after `b` drains
        // a few tasks more than `a` (the jitter the margin covers).
        for a_backlog in (0..400).step_by(7) {
            for b_backlog in (0..400).step_by(11) {
                for a_holders in 1..12 {
                    for b_holders in 1..12 {
                        let (a, b) = (load(a_backlog, a_holders), load(b_backlog, b_holders));
                        if switch_justified(b, Some(a)) {
                            // After the move, a worker of `b` sees `a` with
                            // its other holders (as before) and `b` with the
                            // mover in its own place.
                            let a_after = load(a_backlog, a_holders);
                            let b_after = load(b_backlog.saturating_sub(b_holders / 2), b_holders);
                            assert!(
                                !switch_justified(a_after, Some(b_after)),
                                "ping-pong from a={a:?} b={b:?}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_loading_worker_holds_only_the_model_it_loads() {
        let resident = vec!["m1".to_string()];
        let holds = |model, loading, resident: &[String], in_catalog: bool| {
            holds_for_affinity(model, loading, resident, || in_catalog)
        };
        assert_eq!(holds("m1", None, &resident, false), Holding::Resident);
        assert_eq!(holds("m1", Some("m2"), &resident, true), Holding::No);
        assert_eq!(holds("m2", Some("m2"), &resident, false), Holding::Resident);
        assert_eq!(
            holds("m3", None, &[], true),
            Holding::Unreported,
            "no report: its catalog"
        );
        assert_eq!(holds("m3", None, &[], false), Holding::No);
        assert!(still_loading("m2", &resident, 1));
        assert!(
            !still_loading("m2", &["m2".to_string()], 1),
            "reported loaded"
        );
        assert!(
            !still_loading("m2", &resident, 0),
            "no lease: its report is the truth"
        );
    }

    #[test]
    fn only_a_capable_worker_stands_in() {
        let capable = Candidate {
            draining: false,
            silent_ms: 10,
            class: "cpu/f32",
            model_hash: Some("h"),
            job_faults: 0,
            holds_assets: true,
        };
        assert!(can_stand_in(&capable, "", None));
        assert!(can_stand_in(&capable, "h", Some("cpu/f32")));
        let without_model = Candidate {
            model_hash: None,
            ..capable
        };
        assert!(!can_stand_in(&without_model, "", None));
        assert!(!can_stand_in(&capable, "other-hash", None));
        assert!(!can_stand_in(&capable, "", Some("cuda/f16")));
        let quarantined = Candidate {
            job_faults: QUARANTINE_AFTER,
            ..capable
        };
        assert!(!can_stand_in(&quarantined, "", None));
        let silent = Candidate {
            silent_ms: LIVE_MS,
            ..capable
        };
        assert!(!can_stand_in(&silent, "", None));
        let without_lora = Candidate {
            holds_assets: false,
            ..capable
        };
        assert!(!can_stand_in(&without_lora, "", None));
    }

    #[test]
    fn a_worker_id_is_bound_to_its_token_while_alive() {
        assert!(acts_for(Some("pool-a"), Some("pool-a")));
        assert!(!acts_for(Some("pool-a"), Some("pool-b")));
        assert!(!acts_for(Some("pool-a"), None));
        assert!(acts_for(None, None), "binding is off without --auth");
        assert!(may_register(Some("pool-a"), 0, Some("pool-a")));
        assert!(!may_register(Some("pool-a"), LIVE_MS - 1, Some("pool-b")));
        assert!(may_register(Some("pool-a"), LIVE_MS, Some("pool-b")));
    }

    #[test]
    fn a_capped_project_gets_no_lease_at_its_cap() {
        assert!(under_cap(100, None));
        assert!(under_cap(1, Some(2)));
        assert!(!under_cap(2, Some(2)));
        assert!(!under_cap(0, Some(0)));
    }

    #[test]
    fn a_quarantined_worker_with_no_stand_in_fails_the_task() {
        let retry = |q, s| retry_after_fault(Fault::Internal, 3, 5, q, || s);
        assert_eq!(retry(true, false), AfterFault::Stranded);
        assert_eq!(retry(true, true), AfterFault::Retry);
        assert_eq!(retry(false, false), AfterFault::Retry);
        assert_eq!(
            retry_after_fault(Fault::Internal, 5, 5, false, || true),
            AfterFault::Exhausted
        );
        assert_eq!(
            retry_after_fault(Fault::Cancelled, 9, 5, true, || false),
            AfterFault::HandBack
        );
    }

    #[test]
    fn a_task_needs_every_asset_with_its_hash() {
        let mut r: Recipe = serde_json::from_str(
            r#"{"model":"tiny","model_hash":"","prompt":"p","negative_prompt":"","seed":1,
            "steps":4,"guidance":5.0,"width":64,"height":64,"scheduler":"ddim","karras":false,
            "eta":0.0,"strength":1.0,"init_image":null,"mask":null,
            "loras":[{"name":"ink","hash":"aa","unet_weight":1.0,"te_weight":1.0}],
            "controlnets":[{"model":"pose","image":"x","scale":1.0,"start":0.0,"end":1.0,"resize":"crop"}]}"#,
        )
        .unwrap();
        let needs = task_needs(&r);
        assert_eq!(needs, ["controlnet:pose:", "lora:ink:aa"]);
        let mut held = super::super::HeldAssets::default();
        let info = |name: &str, hash: &str| super::super::ModelInfo {
            name: name.into(),
            hash: hash.into(),
        };
        held.loras.push(info("ink", "bb"));
        held.controlnets.push(info("pose", "cc"));
        let keys = held_keys(&held);
        assert!(
            !holds_all(&needs, |k| keys.contains(k)),
            "another hash of ink"
        );
        held.loras.push(info("ink2", "aa"));
        held.loras[0].hash = "aa".into();
        let keys = held_keys(&held);
        assert!(holds_all(&needs, |k| keys.contains(k)));
        r.extras = Default::default();
        assert!(
            holds_all(&task_needs(&r), |_| false),
            "no extras: any worker"
        );
    }

    #[test]
    fn only_a_merge_is_a_reason_to_look_past_a_task() {
        let ready = |s: &str| s == "a";
        assert!(needs_merge("b", ready));
        assert!(!needs_merge("a", ready), "its set is ready");
        assert!(!needs_merge("", ready), "no LoRAs: nothing to merge");
        assert!(set_ready("a", ready));
        assert!(!set_ready("b", ready));
        assert!(!set_ready("", |_| true), "no LoRAs is no set");
        let mut r: Recipe = serde_json::from_str(
            r#"{"model":"tiny","model_hash":"","prompt":"p","negative_prompt":"","seed":1,
            "steps":4,"guidance":5.0,"width":64,"height":64,"scheduler":"ddim","karras":false,
            "eta":0.0,"strength":1.0,"init_image":null,"mask":null,
            "loras":[{"name":"ink","hash":"aa","unet_weight":1.0,"te_weight":0.5}]}"#,
        )
        .unwrap();
        assert_eq!(
            task_lora_set(&r),
            kiln_proto::lora_set::LoraSet::of(&r.extras.loras).key()
        );
        assert!(task_lora_set(&r).starts_with("aa@"));
        r.extras.loras[0].unet_weight = 0.0;
        r.extras.loras[0].te_weight = 0.0;
        assert_eq!(task_lora_set(&r), "", "weight 0 everywhere merges nothing");
    }

    #[test]
    fn a_shot_is_keyed_as_the_img2img_task_it_becomes() {
        let mut r: Recipe = serde_json::from_str(
            r#"{"model":"tiny","model_hash":"","prompt":"p","negative_prompt":"","seed":1,
            "steps":4,"guidance":5.0,"width":64,"height":64,"scheduler":"ddim","karras":false,
            "eta":0.0,"strength":0.6,"init_image":null,"mask":null}"#,
        )
        .unwrap();
        let shot = task_batch_key(&r, true);
        assert_ne!(shot, task_batch_key(&r, false));
        r.init_image = Some("a".repeat(64));
        assert_eq!(shot, task_batch_key(&r, false));
    }
}
