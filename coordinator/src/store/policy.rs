//! The scheduling policy's rules (DESIGN.md §6), shared by every store: the
//! memory store applies them in Rust, the Redis store in `redis/claim.lua`,
//! and the conformance suite checks that both agree.
//!
//! When a worker asks for work: tasks it may not take are skipped (another
//! determinism class for a job already pinned to one, a job that quarantined
//! it, a model it does not hold, a shot whose anchor is not done); then higher
//! priority first; among equal priority the least recently served project,
//! then the least recently served job (round-robin fair share); model
//! affinity (tasks for models the worker has resident first; it switches
//! model only when the other model's backlog justifies a load); within a job
//! the item order; free slots are filled with tasks that share one UNet batch.

use kiln_proto::recipe::Recipe;

/// Faults (failures or expiries) of one worker on one job after which the
/// worker gets no more of that job's tasks, while another worker can take them.
pub const QUARANTINE_AFTER: u32 = 3;

/// A worker that called within this long counts as live: only live workers
/// count as stand-ins for a task or as holders of a model.
pub const LIVE_MS: u64 = 60_000;

/// Most tasks one claim completes from earlier results.
pub const MAX_DEDUPED_PER_CLAIM: usize = 1000;

/// A worker switches to a model it does not have resident when the model's
/// waiting tasks exceed this many per worker that already has it resident, or
/// when no live worker has it resident. At 8 tasks of a few hundred
/// milliseconds each, the holders need longer than a typical model load (a
/// few seconds) to clear the backlog themselves, so the load pays for itself.
pub const SWITCH_BACKLOG_PER_HOLDER: usize = 8;

/// Returns the key of the UNet batch a task can share: tasks with equal keys
/// run as one batch on a worker.
pub fn batch_key(r: &Recipe) -> String {
    format!(
        "{}|{}|{}x{}|{}|{}|{}|{}|{}|{}|{}",
        r.model,
        r.model_hash,
        r.width,
        r.height,
        r.steps,
        r.scheduler,
        r.karras,
        r.eta,
        r.guidance > 1.0,
        r.init_image.is_some(),
        r.mask.is_some()
    )
}

/// Returns the dedupe key of a recipe rendered on a determinism class: the
/// recipe hash (which covers the model hash and input images) and the class.
pub fn dedupe_key(recipe: &Recipe, class: &str) -> String {
    format!("{}|{class}", recipe.hash())
}

/// Returns true when a worker should load `model` rather than keep to its
/// resident models (or stay idle): nobody has the model resident, or its
/// backlog is more than the holders clear within a load time. An idle worker
/// follows the same rule, so workers do not pile onto a model at the end of
/// its backlog only to load it for one task.
pub fn switch_justified(backlog: usize, resident_holders: usize) -> bool {
    resident_holders == 0 || backlog > SWITCH_BACKLOG_PER_HOLDER * resident_holders
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switching_needs_a_reason() {
        assert!(switch_justified(1, 0), "nobody holds the model");
        assert!(
            !switch_justified(8, 1),
            "one holder clears 8 tasks soon enough"
        );
        assert!(switch_justified(9, 1));
        assert!(!switch_justified(40, 5));
    }
}
