//! The coordinator's Prometheus metrics: every name, help text, label and
//! bucket in one place, the recorder that `kiln-coordinator` installs, and
//! the functions the handlers call when something happens.
//!
//! Counters count what this process saw (Prometheus sums over replicas);
//! the farm gauges (`kiln_tasks`, `kiln_jobs`, `kiln_workers`) are read from
//! the store at scrape time ([`Metrics::render`]), so every coordinator of
//! one store reports the same farm. Labels are bounded: model names (bounded
//! by the farm's catalog), state, outcome and fault names, gRPC method paths
//! of kiln's services and gRPC codes; never job or task ids.
//!
//! Without an installed recorder (a library user, `kiln render`, unit tests)
//! every recording function is a no-op.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

use crate::store::{FarmCounts, Fault, Outcome, Store};

/// Tasks of running jobs by state and model (farm-wide, from the store).
pub const TASKS: &str = "kiln_tasks";
/// Jobs the store holds, by state (farm-wide).
pub const JOBS: &str = "kiln_jobs";
/// Registered workers by state (farm-wide).
pub const WORKERS: &str = "kiln_workers";
/// Tasks this coordinator saw end, by model and outcome.
pub const TASK_COMPLETIONS: &str = "kiln_task_completions_total";
/// Leases this coordinator took back.
pub const LEASE_EXPIRATIONS: &str = "kiln_lease_expirations_total";
/// Completions refused because their epoch was no longer current.
pub const STALE_COMPLETIONS: &str = "kiln_stale_completions_total";
/// Attempts that ended, by outcome and fault.
pub const TASK_ATTEMPTS: &str = "kiln_task_attempts_total";
/// Submission to first lease.
pub const QUEUE_WAIT: &str = "kiln_queue_wait_seconds";
/// Lease to accepted completion.
pub const TASK_SECONDS: &str = "kiln_task_seconds";
/// gRPC calls served, by method and code.
pub const RPC_SECONDS: &str = "kiln_rpc_seconds";
/// Store calls that failed in the store itself (not "not found").
pub const STORE_ERRORS: &str = "kiln_store_errors_total";

/// Buckets of the duration histograms, in seconds: from a fast RPC (1 ms)
/// to a long queue wait (an hour); a render of SD-XL sits in the middle.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// How long a scrape waits for the store's counts.
pub const STORE_READ_TIMEOUT: Duration = Duration::from_secs(3);

/// What a task ended with, as [`TASK_COMPLETIONS`] labels it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// A worker's image was accepted.
    Completed,
    /// Served from an earlier result of the same recipe.
    Deduped,
    /// Failed for good: out of attempts, or bad input.
    Failed,
}

impl Completion {
    fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Deduped => "deduped",
            Self::Failed => "failed",
        }
    }
}

/// The installed recorder and the scrape-time gauges.
pub struct Metrics {
    handle: PrometheusHandle,
    /// Models given a `kiln_tasks` value by an earlier scrape: those missing
    /// from a later one are set to zero rather than left at their old value.
    models: Mutex<BTreeSet<String>>,
}

impl Metrics {
    /// Installs the process-wide recorder and describes every metric.
    ///
    /// # Errors
    /// When a recorder is already installed.
    pub fn install() -> Result<Self, BuildError> {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
            .install_recorder()?;
        describe();
        // Counters without labels are shown from the start, at zero.
        for name in [LEASE_EXPIRATIONS, STALE_COMPLETIONS, STORE_ERRORS] {
            counter!(name).increment(0);
        }
        Ok(Self {
            handle,
            models: Mutex::new(BTreeSet::new()),
        })
    }

    /// Reads the farm from `store` (within [`STORE_READ_TIMEOUT`]), sets the
    /// farm gauges and returns the Prometheus text exposition. When the
    /// store does not answer, the gauges keep their last values, the failure
    /// counts in [`STORE_ERRORS`] and is logged, and the rest is served.
    pub async fn render(&self, store: &dyn Store) -> String {
        match tokio::time::timeout(STORE_READ_TIMEOUT, store.farm_counts()).await {
            Ok(Ok(counts)) => self.set_farm(&counts),
            Ok(Err(e)) => {
                store_error();
                tracing::warn!(error = %e, "metrics: cannot read the farm counts");
            }
            Err(_) => {
                store_error();
                tracing::warn!(
                    timeout_s = STORE_READ_TIMEOUT.as_secs(),
                    "metrics: the store did not answer in time"
                );
            }
        }
        self.handle.run_upkeep();
        self.handle.render()
    }

    fn set_farm(&self, counts: &FarmCounts) {
        let mut seen = self.models.lock().unwrap_or_else(|p| p.into_inner());
        for gone in seen.iter().filter(|m| !counts.models.contains_key(*m)) {
            for state in ["queued", "running"] {
                gauge!(TASKS, "state" => state, "model" => gone.clone()).set(0.0);
            }
        }
        seen.clear();
        for (model, load) in &counts.models {
            gauge!(TASKS, "state" => "queued", "model" => model.clone()).set(load.queued as f64);
            gauge!(TASKS, "state" => "running", "model" => model.clone()).set(load.running as f64);
            seen.insert(model.clone());
        }
        for (state, n) in &counts.jobs {
            gauge!(JOBS, "state" => state.name()).set(*n as f64);
        }
        for (state, n) in &counts.workers {
            gauge!(WORKERS, "state" => state.name()).set(*n as f64);
        }
    }
}

fn describe() {
    describe_gauge!(
        TASKS,
        "Tasks of running jobs by state (queued, running) and model, farm-wide from the store."
    );
    describe_gauge!(
        JOBS,
        "Jobs the store holds by state, farm-wide (finished ones until their retention ends)."
    );
    describe_gauge!(
        WORKERS,
        "Registered workers by state (idle, busy, draining, lost), farm-wide."
    );
    describe_counter!(
        TASK_COMPLETIONS,
        "Tasks this coordinator saw end, by model and outcome (completed, deduped, failed)."
    );
    describe_counter!(
        LEASE_EXPIRATIONS,
        "Leases this coordinator took back from silent or re-registered workers."
    );
    describe_counter!(
        STALE_COMPLETIONS,
        "Completions refused because their lease epoch was no longer current."
    );
    describe_counter!(
        TASK_ATTEMPTS,
        "Attempts that ended, by outcome and fault class."
    );
    describe_histogram!(
        QUEUE_WAIT,
        "Seconds from a job's submission to the first lease of each of its tasks."
    );
    describe_histogram!(
        TASK_SECONDS,
        "Seconds from a task's lease to its accepted completion, by model."
    );
    describe_histogram!(
        RPC_SECONDS,
        "Seconds to serve a gRPC call (a stream: until its end), by method and gRPC code."
    );
    describe_counter!(
        STORE_ERRORS,
        "Store calls that failed in the store (unreachable, refused, corrupt data)."
    );
}

/// Counts a task that ended with `how`.
pub fn task_completed(model: &str, how: Completion) {
    counter!(TASK_COMPLETIONS, "model" => model.to_string(), "outcome" => how.as_str())
        .increment(1);
}

/// Counts an attempt that ended with `outcome` (and `fault`, when it failed).
pub fn attempt_ended(outcome: Outcome, fault: Option<Fault>) {
    let fault = fault.map_or("none", Fault::name);
    counter!(TASK_ATTEMPTS, "outcome" => outcome.name(), "fault" => fault).increment(1);
}

/// Counts a lease taken back (its attempt ended `expired`, worker lost).
pub fn lease_expired() {
    counter!(LEASE_EXPIRATIONS).increment(1);
    attempt_ended(Outcome::Expired, Some(Fault::WorkerLost));
}

/// Counts a completion refused as stale.
pub fn stale_completion() {
    counter!(STALE_COMPLETIONS).increment(1);
}

/// Records how long a task waited from submission to its first lease.
pub fn queue_wait(wait: Duration) {
    histogram!(QUEUE_WAIT).record(wait.as_secs_f64());
}

/// Records how long a task took from its lease to its accepted completion.
pub fn task_time(model: &str, took: Duration) {
    histogram!(TASK_SECONDS, "model" => model.to_string()).record(took.as_secs_f64());
}

/// Records one served gRPC call.
pub fn rpc(method: &str, code: &'static str, took: Duration) {
    histogram!(RPC_SECONDS, "method" => method.to_string(), "code" => code)
        .record(took.as_secs_f64());
}

/// Counts a store call that failed in the store.
pub fn store_error() {
    counter!(STORE_ERRORS).increment(1);
}
