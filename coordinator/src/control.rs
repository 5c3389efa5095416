//! The actions on jobs and workers that both front ends take, the gRPC
//! `Farm` service and the dashboard: each checks the caller
//! ([`Caller::require`], [`Caller::job_access`]) and then makes the one
//! store transition, so the two can never disagree on who may do what.

use kiln_proto::ids::{JobId, WorkerId};

use crate::auth::{Action, Caller};
use crate::core::Core;
use crate::error::CoordinatorResult;
use crate::store::{JobRecord, WorkerRecord};
use crate::verify::{self, Verification};

/// Returns the job when the caller may take `action` on it (role first,
/// then the job's project); a job out of reach is answered as missing.
///
/// # Errors
/// `PermissionDenied` for the role, `JobNotFound` for a missing job or one
/// of a project the caller does not reach, or a store error.
pub async fn job_for(
    core: &Core,
    caller: &Caller,
    id: JobId,
    action: Action,
) -> CoordinatorResult<JobRecord> {
    caller.require(action)?;
    let job = core.store.job(id).await?;
    caller.job_access(&job, action)?;
    Ok(job)
}

/// Cancels a job; the transition that ends it writes its manifest.
///
/// # Errors
/// As [`job_for`], or a store error.
pub async fn cancel(core: &Core, caller: &Caller, id: JobId) -> CoordinatorResult<JobRecord> {
    let before = job_for(core, caller, id, Action::Cancel).await?;
    let job = core.store.cancel_job(id).await?;
    if !before.is_finished() {
        tracing::info!(job = %id, token = %caller.name, "job cancelled");
        core.finalize(id).await;
    }
    Ok(job)
}

/// Puts a job's failed tasks back in the queue; returns the job and how
/// many went back.
///
/// # Errors
/// As [`job_for`], or a store error.
pub async fn retry(core: &Core, caller: &Caller, id: JobId) -> CoordinatorResult<(JobRecord, u32)> {
    job_for(core, caller, id, Action::Retry).await?;
    let (job, requeued) = core.store.retry_job(id).await?;
    if requeued > 0 {
        tracing::info!(job = %id, requeued, token = %caller.name, "failed tasks requeued");
    }
    Ok((job, requeued))
}

/// Starts a verification job of `sample` images of a job (0: all).
///
/// # Errors
/// As [`job_for`], or what [`verify::verify`] refuses.
pub async fn verify(
    core: &Core,
    caller: &Caller,
    id: JobId,
    sample: usize,
) -> CoordinatorResult<Verification> {
    job_for(core, caller, id, Action::Verify).await?;
    verify::verify(core, id, sample).await
}

/// Sets a worker to drain: it gets no new leases.
///
/// # Errors
/// `PermissionDenied` for a role that may not drain, or a store error.
pub async fn drain(core: &Core, caller: &Caller, id: &WorkerId) -> CoordinatorResult<WorkerRecord> {
    caller.worker_access(id, Action::Drain)?;
    let worker = core.store.drain_worker(id).await?;
    tracing::info!(worker = %id, token = %caller.name, "worker set to drain");
    Ok(worker)
}
