//! `kiln model ...`: model tools.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use kiln_diffusion::{self as pipeline, TinyKind};

use crate::commands::pull::Pull;

/// Model tools.
#[derive(clap::Args, Debug)]
pub struct Model {
    #[command(subcommand)]
    command: ModelCommand,
}

#[derive(Subcommand, Debug)]
enum ModelCommand {
    Tiny(Tiny),
    Pull(Pull),
    Push(Push),
}

impl Model {
    /// Runs `kiln model ...`.
    pub async fn run(self) -> anyhow::Result<bool> {
        match self.command {
            ModelCommand::Tiny(c) => tiny(&c.out, c.kind).map(|()| true),
            ModelCommand::Pull(c) => c.run().await.map(|()| true),
            ModelCommand::Push(c) => push(&c.dir, &c.url).await.map(|()| true),
        }
    }
}

/// Write a tiny random-weight model (for tests and trying kiln out).
#[derive(clap::Args, Debug)]
struct Tiny {
    /// The folder to write it to.
    #[arg(long)]
    out: PathBuf,
    /// Its architecture: sd15, sd21 (GELU text encoder, v-prediction), sdxl (two
    /// text encoders, added conditioning) or inpaint (SD 1.5 inpainting UNet).
    #[arg(long, default_value_t = TinyKind::Sd15)]
    kind: TinyKind,
}

/// Writes the tiny random-weight model of architecture `kind` into `out`.
fn tiny(out: &Path, kind: TinyKind) -> anyhow::Result<()> {
    pipeline::write_tiny_model_kind(out, kind)
        .with_context(|| format!("cannot write the tiny {kind} model to {}", out.display()))?;
    let hash = pipeline::model_hash(out)
        .with_context(|| format!("cannot hash the model in {}", out.display()))?;
    if kind == TinyKind::Sd15 {
        println!("tiny model written to {} (hash {hash})", out.display());
    } else {
        println!(
            "tiny {kind} model written to {} (hash {hash})",
            out.display()
        );
    }
    Ok(())
}

/// Upload a model folder to a bucket, with its manifest (file sizes, sha256s
/// and the model's content hash) written last; workers fetch it with
/// `--model NAME=URL --model-cache DIR`. Credentials and endpoint come from
/// the cloud's environment variables (AWS_ACCESS_KEY_ID, AWS_REGION,
/// AWS_ENDPOINT_URL, ...).
#[derive(clap::Args, Debug)]
struct Push {
    /// The model folder (diffusers layout).
    dir: PathBuf,
    /// Where it goes: s3://BUCKET/models/NAME (or gs://, az://).
    url: String,
}

/// Pushes the model in `dir` to the bucket folder `url`.
async fn push(dir: &Path, url: &str) -> anyhow::Result<()> {
    let hash = pipeline::model_hash(dir)
        .with_context(|| format!("{} is not a model folder kiln can load", dir.display()))?;
    let store = kiln_storage::bucket::Bucket::from_url(url)
        .and_then(|bucket| bucket.open(std::env::vars()))
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("cannot open {}", kiln_domain::error::quote(url)))?;
    let manifest = kiln_storage::models::push(store.as_ref(), dir, &hash)
        .await
        .with_context(|| {
            format!(
                "cannot push {} to {}",
                dir.display(),
                kiln_domain::error::quote(url)
            )
        })?;
    let bytes: u64 = manifest.files.iter().map(|f| f.size).sum();
    println!(
        "pushed {} files ({bytes} bytes) of {} to {url} (hash {hash})",
        manifest.files.len(),
        dir.display()
    );
    Ok(())
}
