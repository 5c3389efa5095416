//! `kiln cancel JOB` and `kiln drain WORKER`.

use crate::client::Farm;
use crate::format::{job_json, job_state, worker_json};

/// Cancel a job: no more tasks go out, running ones are abandoned.
#[derive(clap::Args, Debug)]
pub struct Cancel {
    /// The job id.
    job: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl Cancel {
    /// Runs `kiln cancel`.
    pub async fn run(self, farm: &Farm) -> anyhow::Result<bool> {
        cancel(farm, &self.job, self.json).await.map(|()| true)
    }
}

/// Drain a worker: it finishes what it holds and exits.
#[derive(clap::Args, Debug)]
pub struct Drain {
    /// The worker id.
    worker: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl Drain {
    /// Runs `kiln drain`.
    pub async fn run(self, farm: &Farm) -> anyhow::Result<bool> {
        drain(farm, &self.worker, self.json).await.map(|()| true)
    }
}

/// Cancels a job: no more tasks go out, running ones are abandoned.
async fn cancel(farm: &Farm, job_id: &str, json: bool) -> anyhow::Result<()> {
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
async fn drain(farm: &Farm, worker_id: &str, json: bool) -> anyhow::Result<()> {
    let w = farm.drain(worker_id).await.map_err(|s| farm.explain(s))?;
    if json {
        println!("{}", worker_json(&w, None));
    } else {
        println!(
            "worker {} draining: {} tasks in hand",
            w.worker_id,
            w.running_task_ids.len()
        );
    }
    Ok(())
}
