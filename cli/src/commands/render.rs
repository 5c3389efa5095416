//! `kiln render FILE --model NAME=DIR --out DIR`: the whole farm in one process.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use kiln_proto::error::FieldError;
use kiln_proto::pb;
use kiln_worker::render::{CandleRenderer, Renderer, parse_model_args};
use serde_json::json;

use crate::commands::{fetch, submit, watch};
use crate::embedded::EmbeddedFarm;

/// What `render` was asked.
pub struct RenderOptions<'a> {
    /// The batch file.
    pub file: &'a Path,
    /// `NAME=DIR` model arguments.
    pub models: &'a [String],
    /// Where images and the manifest go.
    pub out: &'a Path,
    /// In-process workers.
    pub workers: u32,
    /// Print JSON instead of text.
    pub json: bool,
}

/// Runs `kiln render`; returns true when every item succeeded.
pub async fn run(opts: RenderOptions<'_>) -> anyhow::Result<bool> {
    if opts.workers == 0 {
        bail!("--workers must be at least 1, got 0");
    }
    let batch = submit::load(opts.file)?;
    let models = parse_model_args(opts.models)?;
    let loaded: BTreeSet<&str> = models.iter().map(|(n, _)| n.as_str()).collect();
    for item in batch.validate()? {
        if !loaded.contains(item.recipe.model.as_str()) {
            let e = FieldError::new(
                kiln_proto::spec::model_field(&batch.spec, &item.recipe.model),
                format!(
                    "model {:?} is not given with --model NAME=DIR (given: {})",
                    item.recipe.model,
                    loaded.iter().copied().collect::<Vec<_>>().join(", ")
                ),
            );
            return Err(batch.locate(&e).into());
        }
    }
    let renderer: Arc<dyn Renderer> = Arc::new(
        tokio::task::spawn_blocking(move || {
            CandleRenderer::load(&models, &candle_core::Device::Cpu)
        })
        .await
        .context("model loading stopped")??,
    );
    let farm = EmbeddedFarm::start(renderer, opts.workers).await?;
    let outcome = async {
        let resp = submit::send(&farm.farm, &batch, None).await?;
        let job = resp.job.context("the coordinator returned no job")?;
        let done = watch::follow(&farm.farm, &job.job_id, opts.json).await?;
        let report = fetch::fetch(&farm.farm, &job.job_id, opts.out).await?;
        anyhow::Ok((done, report))
    }
    .await;
    farm.stop().await?;
    let (done, report) = outcome?;
    if opts.json {
        let c = done.counts.unwrap_or_default();
        println!(
            "{}",
            json!({"out": report.out, "items": c.total, "completed": c.completed, "failed": c.failed, "written": report.written})
        );
    } else {
        println!("{}", fetch::summary_line(&report));
        if done.state != pb::JobState::Completed as i32 {
            println!("{}", watch::summary_line(&done));
        }
    }
    Ok(done.state == pb::JobState::Completed as i32)
}
