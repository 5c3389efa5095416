//! `kiln jobs`, `kiln workers` and `kiln models`: what the farm holds.

use crate::client::Farm;
use kiln_proto::pb::{self, TaskState};
use serde_json::json;

use crate::format::{
    farm_hashes, job_json, model_json, shown_state, table, time, worker_json, worker_model,
};
use kiln_proto::model::short_hash;

/// List jobs, newest first.
#[derive(clap::Args, Debug)]
pub struct Jobs {
    /// How many.
    #[arg(long, default_value_t = 50)]
    limit: u32,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl Jobs {
    /// Runs `kiln jobs`.
    pub async fn run(self, farm: &Farm) -> anyhow::Result<bool> {
        jobs(farm, self.limit, self.json).await.map(|()| true)
    }
}

/// List a job's tasks with their attempt history (worker, epoch, outcome).
#[derive(clap::Args, Debug)]
pub struct Tasks {
    /// The job id.
    job: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl Tasks {
    /// Runs `kiln tasks`.
    pub async fn run(self, farm: &Farm) -> anyhow::Result<bool> {
        tasks(farm, &self.job, self.json).await.map(|()| true)
    }
}

/// List workers.
#[derive(clap::Args, Debug)]
pub struct Workers {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl Workers {
    /// Runs `kiln workers`.
    pub async fn run(self, farm: &Farm) -> anyhow::Result<bool> {
        workers(farm, self.json).await.map(|()| true)
    }
}

/// List each model name: its hashes (the one the farm means marked), the
/// live workers holding each, who has it loaded, queued and running tasks.
#[derive(clap::Args, Debug)]
pub struct Models {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl Models {
    /// Runs `kiln models`.
    pub async fn run(self, farm: &Farm) -> anyhow::Result<bool> {
        models(farm, self.json).await.map(|()| true)
    }
}

/// Prints the farm's models, one row per (name, hash); `*` marks the hash
/// the name means.
async fn models(farm: &Farm, json: bool) -> anyhow::Result<()> {
    let models = farm.models().await.map_err(|s| farm.explain(s))?;
    if json {
        let v: Vec<_> = models.iter().map(model_json).collect();
        println!("{}", serde_json::Value::from(v));
        return Ok(());
    }
    let mut rows: Vec<Vec<String>> = Vec::new();
    for m in &models {
        let tasks = [
            m.resident_worker_ids.len().to_string(),
            m.queued.to_string(),
            m.running.to_string(),
        ];
        if m.hashes.is_empty() {
            let mut row = vec![m.name.clone(), "-".into(), "no live worker".into()];
            row.extend(tasks.clone());
            rows.push(row);
        }
        for (i, h) in m.hashes.iter().enumerate() {
            let mark = if h.chosen { "*" } else { " " };
            let mut row = vec![
                if i == 0 {
                    m.name.clone()
                } else {
                    String::new()
                },
                format!("{}{mark}", short_hash(&h.hash)),
                h.worker_ids.join(","),
            ];
            if i == 0 {
                row.extend(tasks.clone());
            }
            rows.push(row);
        }
    }
    println!(
        "{}",
        table(
            &["MODEL", "HASH", "WORKERS", "RESIDENT", "QUEUED", "RUNNING"],
            &rows
        )
    );
    println!("* the hash the name means: held by the most live workers (ties: the first in order)");
    Ok(())
}

/// Prints the newest jobs.
async fn jobs(farm: &Farm, limit: u32, json: bool) -> anyhow::Result<()> {
    let jobs = farm.jobs(limit).await.map_err(|s| farm.explain(s))?;
    if json {
        let v: Vec<_> = jobs.iter().map(job_json).collect();
        println!("{}", serde_json::Value::from(v));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            let c = j.counts.unwrap_or_default();
            vec![
                j.job_id.clone(),
                shown_state(j).to_string(),
                format!("{}/{}", c.completed, c.total),
                c.leased.to_string(),
                c.failed.to_string(),
                j.priority.to_string(),
                time(j.created_at_ms),
                j.name.clone(),
            ]
        })
        .collect();
    println!(
        "{}",
        table(
            &[
                "JOB", "STATE", "DONE", "RUNNING", "FAILED", "PRIORITY", "CREATED", "NAME"
            ],
            &rows
        )
    );
    Ok(())
}

/// Prints every worker the farm knows.
async fn workers(farm: &Farm, json: bool) -> anyhow::Result<()> {
    let workers = farm.workers().await.map_err(|s| farm.explain(s))?;
    // What each name means, to mark the workers that hold another hash.
    let farm_hashes = farm_hashes(&farm.models().await.map_err(|s| farm.explain(s))?);
    if json {
        let v: Vec<_> = workers
            .iter()
            .map(|w| worker_json(w, Some(&farm_hashes)))
            .collect();
        println!("{}", serde_json::Value::from(v));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            vec![
                w.worker_id.clone(),
                w.state.clone(),
                format!("{}/{}", w.running_task_ids.len(), w.slots),
                w.completed.to_string(),
                w.failed.to_string(),
                w.models
                    .iter()
                    .map(|m| worker_model(m, &farm_hashes))
                    .collect::<Vec<_>>()
                    .join(","),
                time(w.last_seen_ms),
                w.determinism_class.clone(),
            ]
        })
        .collect();
    println!(
        "{}",
        table(
            &[
                "WORKER",
                "STATE",
                "BUSY",
                "DONE",
                "FAILED",
                "MODELS",
                "LAST SEEN",
                "CLASS"
            ],
            &rows
        )
    );
    Ok(())
}

/// Returns the short name of a task state.
fn task_state(state: i32) -> &'static str {
    match TaskState::try_from(state).unwrap_or(TaskState::Unspecified) {
        TaskState::Queued => "queued",
        TaskState::Leased => "running",
        TaskState::Completed => "completed",
        TaskState::Failed => "failed",
        TaskState::Cancelled => "cancelled",
        TaskState::Unspecified => "unknown",
    }
}

fn attempt_json(a: &pb::Attempt) -> serde_json::Value {
    json!({
        "worker": a.worker_id,
        "epoch": a.epoch,
        "outcome": a.outcome,
        "fault": pb::FaultClass::try_from(a.fault).map(|f| f.as_str_name()).unwrap_or("FAULT_CLASS_UNSPECIFIED"),
        "message": a.message,
        "started_at_ms": a.started_at_ms,
        "ended_at_ms": if a.ended_at_ms > 0 { json!(a.ended_at_ms) } else { serde_json::Value::Null },
    })
}

/// Prints a job's tasks with their attempt history.
async fn tasks(farm: &Farm, job_id: &str, json_out: bool) -> anyhow::Result<()> {
    let job = farm.job(job_id, true).await.map_err(|s| farm.explain(s))?;
    if json_out {
        let v: Vec<_> = job
            .tasks
            .iter()
            .map(|t| {
                json!({
                    "index": t.index,
                    "task_id": t.task_id,
                    "state": task_state(t.state),
                    "step": t.step,
                    "steps": t.recipe.as_ref().map_or(0, |r| r.steps),
                    "file": t.file_name,
                    "sha256": t.sha256,
                    "recipe_hash": t.recipe_hash,
                    "attempts": t.attempts.iter().map(attempt_json).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::Value::from(v));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = job
        .tasks
        .iter()
        .map(|t| {
            let history: Vec<String> = t
                .attempts
                .iter()
                .map(|a| format!("{}@{}:{}", a.worker_id, a.epoch, a.outcome))
                .collect();
            vec![
                t.index.to_string(),
                task_state(t.state).to_string(),
                format!("{}/{}", t.step, t.recipe.as_ref().map_or(0, |r| r.steps)),
                history.join(" "),
                t.file_name.clone(),
            ]
        })
        .collect();
    println!(
        "{}",
        table(&["INDEX", "STATE", "STEP", "ATTEMPTS", "FILE"], &rows)
    );
    Ok(())
}
