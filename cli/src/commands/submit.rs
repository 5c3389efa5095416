//! `kiln submit FILE`: validate a batch file locally, submit it, optionally wait.

use std::path::{Path, PathBuf};

use anyhow::Context;
use kiln_proto::pb;
use serde_json::json;

use crate::batch::Batch;
use crate::client::{Farm, read_text};
use crate::commands::{fetch, watch};
use crate::format::job_json;

/// What `submit` was asked.
pub struct SubmitOptions<'a> {
    /// The batch file.
    pub file: &'a Path,
    /// Follow the job until it ends.
    pub wait: bool,
    /// With `wait`, fetch the results here afterwards.
    pub out: Option<PathBuf>,
    /// Resubmitting with this key returns the same job.
    pub idempotency_key: Option<String>,
    /// Print JSON instead of text.
    pub json: bool,
    /// Only show what would be submitted.
    pub dry_run: bool,
}

/// Reads and validates a batch file; errors carry the file, line and field.
pub fn load(file: &Path) -> anyhow::Result<Batch> {
    let text = read_text(file)?;
    let batch = Batch::parse(&file.display().to_string(), &text)?;
    batch.validate()?;
    Ok(batch)
}

/// Submits a validated batch; a refusal naming a field is located in the file.
pub async fn send(
    farm: &Farm,
    batch: &Batch,
    idempotency_key: Option<String>,
) -> anyhow::Result<pb::SubmitJobResponse> {
    let req = pb::SubmitJobRequest {
        spec: Some(batch.spec.clone()),
        idempotency_key: idempotency_key.unwrap_or_default(),
    };
    farm.submit(req).await.map_err(|status| {
        if let Some(field) = Farm::rejected_field(&status) {
            return anyhow::Error::new(batch.locate(&field));
        }
        farm.explain(status)
    })
}

/// Runs `kiln submit`; returns true when every item succeeded (or not waiting).
pub async fn run(farm: &Farm, opts: SubmitOptions<'_>) -> anyhow::Result<bool> {
    let batch = load(opts.file)?;
    if opts.dry_run {
        let items = batch.validate()?;
        if opts.json {
            let first: Vec<_> = items.iter().take(5).map(|i| &i.recipe).collect();
            println!(
                "{}",
                json!({"tasks": items.len(), "first": first, "name": batch.spec.name})
            );
        } else {
            println!(
                "{}: {} tasks; the first ones:",
                opts.file.display(),
                items.len()
            );
            for i in items.iter().take(5) {
                let r = &i.recipe;
                println!(
                    "  {:>5}  seed {:<20} {}x{} {} steps {} \"{}\"",
                    i.index, r.seed, r.width, r.height, r.steps, r.scheduler, r.prompt
                );
            }
        }
        return Ok(true);
    }
    let resp = send(farm, &batch, opts.idempotency_key).await?;
    let job = resp.job.context("the coordinator returned no job")?;
    if !opts.wait {
        if opts.json {
            let mut v = job_json(&job);
            v["created"] = resp.created.into();
            println!("{v}");
        } else {
            let total = job.counts.unwrap_or_default().total;
            let how = if resp.created {
                "submitted"
            } else {
                "already submitted with this idempotency key"
            };
            println!("{}", job.job_id);
            eprintln!("job {} {how}: {total} tasks", job.job_id);
        }
        return Ok(true);
    }
    if !opts.json {
        eprintln!("job {} submitted", job.job_id);
    }
    let done = watch::follow(farm, &job.job_id, opts.json).await?;
    let report = match &opts.out {
        Some(out) => Some(fetch::fetch(farm, &job.job_id, out).await?),
        None => None,
    };
    if opts.json {
        let mut v = job_json(&done);
        v["created"] = resp.created.into();
        if let Some(r) = &report {
            v["fetch"] = serde_json::to_value(r)?;
        }
        println!("{v}");
    } else {
        println!("{}", watch::summary_line(&done));
        if let Some(r) = &report {
            println!("{}", fetch::summary_line(r));
        }
    }
    Ok(done.state == pb::JobState::Completed as i32)
}
