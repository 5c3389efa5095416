//! `kiln retry`, `kiln pause`, `kiln resume` and `kiln priority`: steering a
//! job in the queue.

use serde_json::json;

use crate::client::Farm;
use crate::format::{job_json, shown_state};

/// Put the failed tasks of a job back in the queue with fresh attempts; a
/// finished job runs again and its manifest is completed when they finish.
#[derive(clap::Args, Debug)]
pub struct Retry {
    /// The job id.
    job: String,
    /// Retry the failed tasks (the tasks a retry takes; the flag spells it out).
    #[arg(long)]
    failed: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl Retry {
    /// Runs `kiln retry`.
    pub async fn run(self, farm: &Farm) -> anyhow::Result<bool> {
        let (job, requeued) = farm.retry(&self.job).await.map_err(|s| farm.explain(s))?;
        if self.json {
            println!("{}", json!({"requeued": requeued, "job": job_json(&job)}));
        } else {
            println!(
                "job {}: {requeued} failed task{} back in the queue; the job is {}",
                job.job_id,
                if requeued == 1 { "" } else { "s" },
                shown_state(&job)
            );
        }
        Ok(true)
    }
}

/// Pause a job: it keeps its place in the queue, nothing new of it is
/// leased, and its running tasks finish.
#[derive(clap::Args, Debug)]
pub struct Pause {
    /// The job id.
    job: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl Pause {
    /// Runs `kiln pause`.
    pub async fn run(self, farm: &Farm) -> anyhow::Result<bool> {
        set_paused(farm, &self.job, true, self.json).await
    }
}

/// Resume a paused job where it stood in the queue.
#[derive(clap::Args, Debug)]
pub struct Resume {
    /// The job id.
    job: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl Resume {
    /// Runs `kiln resume`.
    pub async fn run(self, farm: &Farm) -> anyhow::Result<bool> {
        set_paused(farm, &self.job, false, self.json).await
    }
}

async fn set_paused(farm: &Farm, job_id: &str, paused: bool, json: bool) -> anyhow::Result<bool> {
    let job = farm
        .pause(job_id, paused)
        .await
        .map_err(|s| farm.explain(s))?;
    if json {
        println!("{}", job_json(&job));
    } else {
        println!("job {} {}", job.job_id, shown_state(&job));
    }
    Ok(true)
}

/// Set a job's priority: higher runs first.
#[derive(clap::Args, Debug)]
pub struct Priority {
    /// The job id.
    job: String,
    /// The new priority (may be negative).
    #[arg(allow_negative_numbers = true)]
    priority: i32,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl Priority {
    /// Runs `kiln priority`.
    pub async fn run(self, farm: &Farm) -> anyhow::Result<bool> {
        let job = farm
            .set_priority(&self.job, self.priority)
            .await
            .map_err(|s| farm.explain(s))?;
        if self.json {
            println!("{}", job_json(&job));
        } else if job.priority == self.priority {
            println!("job {} priority {}", job.job_id, job.priority);
        } else {
            anyhow::bail!(
                "job {} is {}: its priority stays {}",
                job.job_id,
                shown_state(&job),
                job.priority
            );
        }
        Ok(true)
    }
}
