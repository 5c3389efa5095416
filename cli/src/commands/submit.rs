//! `kiln submit FILE`: validate a batch file locally, submit it, optionally wait.

use std::path::{Path, PathBuf};

use anyhow::Context;
use kiln_domain::batch::Batch;
use kiln_proto::convert::job_spec_to_pb;
use kiln_proto::pb;
use kiln_proto::spec::{ExpandedItem, check_label};
use serde_json::json;
use tracing::Instrument;

use crate::client::Farm;
use crate::commands::{fetch, watch};
use crate::format::job_json;

/// Submit a batch file to the coordinator and print the job id.
#[derive(clap::Args, Debug)]
pub struct Submit {
    /// The batch file (TOML).
    file: PathBuf,
    /// Follow the job until it ends (exit code 3 if any item failed).
    #[arg(long)]
    wait: bool,
    /// With --wait, fetch the results into this folder afterwards.
    #[arg(long, requires = "wait")]
    out: Option<PathBuf>,
    /// Submitting again with the same key returns the same job.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Only validate and show how many tasks it expands to.
    #[arg(long)]
    dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Reads and validates a batch file, returning it with the tasks it expands
/// to (expanded once: a job may hold 100,000); errors carry the file, line and
/// field.
pub fn load(file: &Path) -> anyhow::Result<(Batch, Vec<ExpandedItem>)> {
    let batch = Batch::read(file)?;
    let items = batch.validate()?;
    Ok((batch, items))
}

/// Submits a validated batch; a refusal naming a field is located in the file.
pub async fn send(
    farm: &Farm,
    batch: &Batch,
    idempotency_key: Option<String>,
) -> anyhow::Result<pb::SubmitJobResponse> {
    let req = pb::SubmitJobRequest {
        spec: Some(job_spec_to_pb(&batch.spec)),
        idempotency_key: idempotency_key.unwrap_or_default(),
    };
    // The root of the job's trace when spans are exported: the call carries
    // its traceparent to the coordinator.
    let span = tracing::info_span!("submit", job_name = %batch.spec.name);
    farm.submit(req).instrument(span).await.map_err(|status| {
        if let Some(field) = Farm::rejected_field(&status) {
            return anyhow::Error::new(batch.locate(&field));
        }
        farm.explain(status)
    })
}

impl Submit {
    /// Runs `kiln submit`; returns true when every item succeeded (or not waiting).
    pub async fn run(self, farm: &Farm) -> anyhow::Result<bool> {
        let (batch, items) = load(&self.file)?;
        if let Some(key) = &self.idempotency_key {
            // The coordinator's rule, checked before anything is sent.
            check_label("--idempotency-key", key)?;
        }
        if self.dry_run {
            if self.json {
                let first: Vec<_> = items.iter().take(5).map(|i| &i.recipe).collect();
                println!(
                    "{}",
                    json!({"tasks": items.len(), "first": first, "name": batch.spec.name})
                );
            } else {
                println!(
                    "{}: {} tasks; the first ones:",
                    self.file.display(),
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
        let resp = send(farm, &batch, self.idempotency_key).await?;
        let job = resp.job.context("the coordinator returned no job")?;
        if !self.wait {
            if self.json {
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
        if !self.json {
            eprintln!("job {} submitted", job.job_id);
        }
        let done = watch::follow(farm, &job.job_id, self.json).await?;
        let report = match &self.out {
            Some(out) => Some(fetch::fetch(farm, &job.job_id, out).await?),
            None => None,
        };
        if self.json {
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
}
