//! Tunables of a coordinator, with the reasons for their defaults.

use std::time::Duration;

/// How a coordinator runs its leases and long polls.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// How long a lease lasts without a heartbeat. 15 s: five missed
    /// heartbeats at the default interval before a worker counts as lost,
    /// so a stalled GC or a slow network is not mistaken for a death, while
    /// a dead worker's task runs elsewhere within about 16 s.
    pub lease_ttl: Duration,
    /// How often workers are told to heartbeat.
    pub heartbeat_interval: Duration,
    /// Attempts that may fail or expire before a task fails for good.
    pub max_attempts: u32,
    /// How often the reaper looks for expired leases.
    pub reap_interval: Duration,
    /// Longest a Lease long poll is held open.
    pub max_lease_wait: Duration,
    /// For this long after start-up, a submission naming a model no worker
    /// has announced yet waits for one to register instead of being refused:
    /// a farm that just started has workers still loading their models. And
    /// queued tasks whose pinned model hash no live worker holds fail once
    /// that has lasted this long (`model_grace`), instead of waiting forever.
    pub model_grace: Duration,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(15),
            heartbeat_interval: Duration::from_secs(3),
            max_attempts: 5,
            reap_interval: Duration::from_secs(1),
            max_lease_wait: Duration::from_secs(20),
            model_grace: Duration::from_secs(15),
        }
    }
}
