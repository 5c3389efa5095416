//! The lease reaper: takes back expired leases so the work runs elsewhere.
//! Every coordinator replica runs one; the store makes concurrent reaps safe.

use std::sync::Arc;

use tokio::time::MissedTickBehavior;

use crate::core::Core;
use crate::metrics;

/// Reaps expired leases every `reap_interval` until shutdown.
pub async fn run(core: Arc<Core>) {
    let mut tick = tokio::time::interval(core.config.reap_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = core.shutdown.cancelled() => return,
        }
        match core.store.reap(core.config.max_attempts).await {
            Ok(reaped) => {
                for r in reaped {
                    metrics::lease_expired();
                    tracing::warn!(job = %r.job, task = %r.task, worker = %r.worker, epoch = %r.epoch, requeued = r.requeued, "lease expired");
                    if let Some(job) = r.job_finished {
                        core.finalize(job.id).await;
                    }
                }
            }
            Err(e) => {
                metrics::store_error();
                tracing::warn!(error = %e, "reaping failed; retrying at the next tick");
            }
        }
    }
}
