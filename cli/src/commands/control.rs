//! `kiln cancel JOB` and `kiln drain WORKER`.

use crate::client::Farm;
use crate::format::{job_json, job_state, worker_json};

/// Cancels a job: no more tasks go out, running ones are abandoned.
pub async fn cancel(farm: &Farm, job_id: &str, json: bool) -> anyhow::Result<()> {
    let job = farm.cancel(job_id).await.map_err(|s| farm.explain(s))?;
    if json {
        println!("{}", job_json(&job));
    } else {
        let c = job.counts.unwrap_or_default();
        println!(
            "job {} {}: {}/{} images completed, {} cancelled",
            job.job_id,
            job_state(job.state),
            c.completed,
            c.total,
            c.cancelled
        );
    }
    Ok(())
}

/// Drains a worker: it finishes what it holds and exits.
pub async fn drain(farm: &Farm, worker_id: &str, json: bool) -> anyhow::Result<()> {
    let w = farm.drain(worker_id).await.map_err(|s| farm.explain(s))?;
    if json {
        println!("{}", worker_json(&w));
    } else {
        println!(
            "worker {} draining: {} tasks in hand",
            w.worker_id,
            w.running_task_ids.len()
        );
    }
    Ok(())
}
