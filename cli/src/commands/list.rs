//! `kiln jobs` and `kiln workers`: what the farm holds.

use crate::client::Farm;
use crate::format::{job_json, job_state, table, time, worker_json};

/// Prints the newest jobs.
pub async fn jobs(farm: &Farm, limit: u32, json: bool) -> anyhow::Result<()> {
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
                job_state(j.state).to_string(),
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
pub async fn workers(farm: &Farm, json: bool) -> anyhow::Result<()> {
    let workers = farm.workers().await.map_err(|s| farm.explain(s))?;
    if json {
        let v: Vec<_> = workers.iter().map(worker_json).collect();
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
                    .map(|m| m.name.as_str())
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
