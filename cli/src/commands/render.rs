//! `kiln render FILE --model NAME=DIR --out DIR`: the whole farm in one process.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use kiln_diffusion::Precision;
use kiln_proto::error::{FieldError, quote};
use kiln_proto::pb;
use kiln_worker::render::{
    Assets, CandleRenderer, Renderer, parse_controlnet_args, parse_model_args,
};
use serde_json::json;

use crate::commands::{fetch, submit, watch};
use crate::embedded::EmbeddedFarm;

/// Render a batch file on a farm run inside this process (no coordinator needed).
#[derive(clap::Args, Debug)]
pub struct Render {
    /// The batch file (TOML).
    file: PathBuf,
    /// A model, as NAME=DIR (a diffusers-layout folder); repeat for more.
    #[arg(long = "model", value_name = "NAME=DIR", required = true)]
    models: Vec<String>,
    /// A folder of LoRAs (`NAME.safetensors`); repeat for more.
    #[arg(long = "lora-dir", value_name = "DIR")]
    lora_dirs: Vec<PathBuf>,
    /// A folder of textual-inversion embeddings (`NAME.safetensors`); repeat for more.
    #[arg(long = "embedding-dir", value_name = "DIR")]
    embedding_dirs: Vec<PathBuf>,
    /// A ControlNet, as NAME=PATH (a diffusers folder or one .safetensors file); repeat for more.
    #[arg(long = "controlnet", value_name = "NAME=PATH")]
    controlnets: Vec<String>,
    /// Decode images larger than PX pixels a side in overlapping tiles, as
    /// `kiln-worker --vae-tile` does.
    #[arg(long, value_name = "PX", value_parser = kiln_diffusion::VaeTile::parse)]
    vae_tile: Option<kiln_diffusion::VaeTile>,
    /// Where the images and manifest.jsonl go.
    #[arg(long)]
    out: PathBuf,
    /// Workers rendering in parallel.
    #[arg(long, default_value_t = 1)]
    workers: u32,
    /// Print a JSON summary.
    #[arg(long)]
    json: bool,
}

impl Render {
    /// Runs `kiln render`; returns true when every item succeeded.
    pub async fn run(self) -> anyhow::Result<bool> {
        if self.workers == 0 {
            bail!("--workers must be at least 1, got 0");
        }
        let (batch, items) = submit::load(&self.file)?;
        let models = parse_model_args(&self.models)?;
        let loaded: BTreeSet<&str> = models.iter().map(|(n, _)| n.as_str()).collect();
        for item in &items {
            if !loaded.contains(item.recipe.model.as_str()) {
                let e = FieldError::new(
                    kiln_proto::spec::model_field(&batch.spec, &item.recipe.model),
                    format!(
                        "model {} is not given with --model NAME=DIR (given: {})",
                        quote(&item.recipe.model),
                        loaded.iter().copied().collect::<Vec<_>>().join(", ")
                    ),
                );
                return Err(batch.locate(&e).into());
            }
        }
        let controlnets = parse_controlnet_args(&self.controlnets)?;
        let (lora_dirs, embedding_dirs) = (self.lora_dirs.clone(), self.embedding_dirs.clone());
        let tile = self.vae_tile;
        let renderer: Arc<dyn Renderer> = Arc::new(
            tokio::task::spawn_blocking(move || {
                let assets = Assets::scan(&lora_dirs, &embedding_dirs, &controlnets)
                    .context("--lora-dir, --embedding-dir or --controlnet")?;
                let mut renderer = CandleRenderer::open_with(
                    &models,
                    &candle_core::Device::Cpu,
                    Precision::F32,
                    None,
                    Arc::new(assets),
                )?;
                renderer.set_vae_tile(tile);
                anyhow::Ok(renderer)
            })
            .await
            .context("model loading stopped")??,
        );
        let farm = EmbeddedFarm::start(renderer, self.workers).await?;
        let outcome = async {
            let resp = submit::send(&farm.farm, &batch, None).await?;
            let job = resp.job.context("the coordinator returned no job")?;
            let done = watch::follow(&farm.farm, &job.job_id, self.json).await?;
            let report = fetch::fetch(&farm.farm, &job.job_id, &self.out).await?;
            anyhow::Ok((done, report))
        }
        .await;
        farm.stop().await?;
        let (done, report) = outcome?;
        if self.json {
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
}
