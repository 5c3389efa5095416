//! The manifest line of one item: the recipe and everything needed to trust
//! and reproduce the file (seed, model hash, worker, attempts, timings, sha256).

use kiln_proto::recipe::Recipe;
use serde::Serialize;

use crate::store::{JobRecord, Outcome, TaskRecord, TaskState};

#[derive(Serialize)]
struct Line<'a> {
    index: u32,
    file: Option<&'a str>,
    status: &'static str,
    job_id: String,
    task_id: String,
    recipe: &'a Recipe,
    recipe_hash: String,
    seed: u64,
    model: &'a str,
    model_hash: &'a str,
    worker: Option<&'a str>,
    epoch: u64,
    attempts: usize,
    timings: Timings,
    sha256: Option<&'a str>,
    size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    /// Determinism class of the worker whose output was accepted.
    determinism_class: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    series: Option<&'a str>,
    /// Shot number from 1; 0 is the anchor.
    #[serde(skip_serializing_if = "Option::is_none")]
    shot: Option<u32>,
}

#[derive(Serialize)]
struct Timings {
    /// From submission to the start of the successful attempt.
    queued_ms: Option<i64>,
    render_ms: Option<u64>,
    encode_ms: Option<u64>,
    /// From submission to acceptance.
    total_ms: Option<i64>,
}

/// Returns the manifest line (JSON, no newline) of a finished task.
pub fn line(job: &JobRecord, task: &TaskRecord) -> String {
    let status = match task.state {
        TaskState::Completed => "completed",
        TaskState::Failed => "failed",
        TaskState::Cancelled => "cancelled",
        TaskState::Leased => "running",
        TaskState::Queued => "queued",
    };
    let last = task.attempts.last();
    let done = task
        .attempts
        .iter()
        .rev()
        .find(|a| a.outcome == Outcome::Completed);
    let result = task.result.as_ref();
    let line = Line {
        index: task.index,
        file: result.map(|_| task.file_name.as_str()),
        status,
        job_id: job.id.to_string(),
        task_id: task.id.to_string(),
        recipe: &task.recipe,
        recipe_hash: task.recipe.hash(),
        seed: task.recipe.seed,
        model: &task.recipe.model,
        model_hash: result
            .map(|r| r.model_hash.as_str())
            .unwrap_or(&task.recipe.model_hash),
        worker: last.map(|a| a.worker.as_str()),
        epoch: last.map(|a| a.epoch.0).unwrap_or(0),
        attempts: task.attempts.len(),
        timings: Timings {
            queued_ms: done.map(|a| a.started_at_ms - job.created_at_ms),
            render_ms: result.map(|r| r.render_ms),
            encode_ms: result.map(|r| r.encode_ms),
            total_ms: done
                .and_then(|a| a.ended_at_ms)
                .map(|t| t - job.created_at_ms),
        },
        sha256: result.map(|r| r.sha256.as_str()),
        size: result.map(|r| r.size),
        error: last
            .filter(|a| task.state == TaskState::Failed && !a.message.is_empty())
            .map(|a| a.message.as_str()),
        determinism_class: result.map(|r| r.class.as_str()),
        series: task.series.as_ref().map(|s| s.name.as_str()),
        shot: task.series.as_ref().map(|s| s.shot),
    };
    serde_json::to_string(&line).unwrap_or_default()
}
