//! The coordinator's own life-cycle enums: job and task states, fault
//! classes, event kinds and abandon reasons. Store records, the event log and
//! Redis hold these by their snake_case names (`"queued"`, `"worker_lost"`),
//! never by wire (prost) numbers; `crate::convert` is the one place that maps
//! them to and from `kiln_proto::pb`. The Lua scripts get the same names from
//! a prelude generated from [`names`](StateName::names) (see `redis/scripts.rs`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// An enum stored by name: the names are the encoding in records and in Redis.
pub trait StateName: Sized + Copy + 'static {
    /// Every value, in declaration order.
    const ALL: &'static [Self];
    /// Prefix of the Lua constant names generated for the values (`TASK_`).
    const LUA_PREFIX: &'static str;

    /// Returns the stored name.
    fn name(self) -> &'static str;

    /// Returns the Lua constant name of a value: the prefix and the upper-case name.
    fn lua_const(self) -> String {
        format!("{}{}", Self::LUA_PREFIX, self.name().to_ascii_uppercase())
    }

    /// Parses a stored name; `None` for an unknown one.
    fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|v| v.name() == s)
    }

    /// Returns (Lua constant, stored name) for every value.
    fn names() -> Vec<(String, &'static str)> {
        Self::ALL
            .iter()
            .map(|v| (v.lua_const(), v.name()))
            .collect()
    }
}

/// Defines a stored-by-name enum: the variants with their docs and names,
/// `StateName`, `Display` and serde under the same names.
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $name:ident, $prefix:literal {
            $($(#[$vmeta:meta])* $variant:ident = $text:literal,)*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant,)*
        }

        impl StateName for $name {
            const ALL: &'static [Self] = &[$($name::$variant),*];
            const LUA_PREFIX: &'static str = $prefix;

            fn name(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                }
            }
        }

        impl $name {
            /// Returns the stored name.
            pub fn name(self) -> &'static str {
                StateName::name(self)
            }

            /// Parses a stored name; `None` for an unknown one.
            pub fn parse(s: &str) -> Option<Self> {
                <Self as StateName>::parse(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

named_enum! {
    /// Life of a job.
    JobState, "JOB_" {
        /// Tasks are waiting or rendering.
        Running = "running",
        /// Every task produced an image.
        Completed = "completed",
        /// Every task ended, and at least one failed for good.
        Failed = "failed",
        /// Cancelled by a user.
        Cancelled = "cancelled",
    }
}

named_enum! {
    /// Life of a task. The names double as the job's counter fields in Redis.
    TaskState, "TASK_" {
        /// Waiting for a worker (or, for a shot, for its anchor).
        Queued = "queued",
        /// Held by a worker under an epoch.
        Leased = "leased",
        /// Finished with an accepted image.
        Completed = "completed",
        /// Failed for good.
        Failed = "failed",
        /// Cancelled with its job.
        Cancelled = "cancelled",
    }
}

named_enum! {
    /// Why an attempt did not produce an image.
    Fault, "FAULT_" {
        /// The worker died or stopped answering: its lease expired.
        WorkerLost = "worker_lost",
        /// The device ran out of memory.
        OutOfMemory = "out_of_memory",
        /// The model could not be loaded.
        ModelLoad = "model_load",
        /// The recipe cannot be rendered anywhere; not retried.
        BadInput = "bad_input",
        /// The attempt was cancelled: the job was, or the worker handed the task back.
        Cancelled = "cancelled",
        /// Anything else that went wrong on the worker.
        Internal = "internal",
    }
}

named_enum! {
    /// What an entry of a job's event log records.
    EventKind, "EV_" {
        /// A task was leased.
        Leased = "leased",
        /// A task completed.
        Completed = "completed",
        /// An attempt failed.
        Failed = "failed",
        /// A lease ran out and the task was taken back.
        Expired = "expired",
        /// A task was cancelled.
        Cancelled = "cancelled",
        /// A report under an epoch that was no longer current was refused.
        StaleRefused = "stale_refused",
        /// The job reached a final state.
        JobFinished = "job_finished",
    }
}

named_enum! {
    /// Why a worker must drop a task it reported in a heartbeat.
    AbandonReason, "ABANDON_" {
        /// The job was cancelled.
        Cancelled = "cancelled",
        /// The lease expired or moved to another epoch.
        LeaseLost = "lease_lost",
    }
}

named_enum! {
    /// How an attempt ended.
    Outcome, "OUTCOME_" {
        /// Still rendering.
        Running = "running",
        /// Produced the accepted image.
        Completed = "completed",
        /// The worker reported a fault.
        Failed = "failed",
        /// The lease ran out: the worker died or stalled.
        Expired = "expired",
        /// The job was cancelled, or the worker handed the task back.
        Cancelled = "cancelled",
    }
}

named_enum! {
    /// What a registered worker is doing, as the farm gauges and the queue API
    /// count it ([`policy::worker_state`](super::policy::worker_state) decides).
    WorkerState, "WORKER_" {
        /// Live, taking work, holding no lease.
        Idle = "idle",
        /// Live, taking work, holding at least one lease.
        Busy = "busy",
        /// Live and draining: it gets no new work.
        Draining = "draining",
        /// Silent for `policy::LIVE_MS` or longer.
        Lost = "lost",
    }
}

impl Outcome {
    /// Returns true for outcomes that count against the attempt limit (and
    /// toward quarantine).
    pub fn is_fault(self) -> bool {
        matches!(self, Outcome::Failed | Outcome::Expired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trips<T: StateName + PartialEq + fmt::Debug + Serialize>() {
        for v in T::ALL {
            assert_eq!(T::parse(v.name()), Some(*v));
            assert_eq!(
                serde_json::to_string(v).unwrap(),
                format!("\"{}\"", v.name()),
                "serde writes the stored name"
            );
        }
        assert_eq!(T::parse("no such name"), None);
    }

    #[test]
    fn names_parse_back_and_serialize_as_themselves() {
        round_trips::<JobState>();
        round_trips::<TaskState>();
        round_trips::<Fault>();
        round_trips::<EventKind>();
        round_trips::<AbandonReason>();
        round_trips::<Outcome>();
        round_trips::<WorkerState>();
    }

    #[test]
    fn lua_constants_are_prefixed_upper_case_names() {
        assert_eq!(Fault::WorkerLost.lua_const(), "FAULT_WORKER_LOST");
        assert_eq!(TaskState::Queued.lua_const(), "TASK_QUEUED");
    }
}
