//! `kiln model ...`: model tools.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use kiln_diffusion::{self as pipeline, TinyControlNetLayout, TinyKind};

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
            ModelCommand::Tiny(c) => c.run().map(|()| true),
            ModelCommand::Pull(c) => c.run().await.map(|()| true),
            ModelCommand::Push(c) => push(&c.dir, &c.url).await.map(|()| true),
        }
    }
}

/// Write a tiny random-weight model (for tests and trying kiln out).
#[derive(clap::Args, Debug)]
struct Tiny {
    /// The folder to write it to (with --single-file: the `.safetensors` file).
    #[arg(long)]
    out: PathBuf,
    /// Its architecture: sd15, sd21 (GELU text encoder, v-prediction), sdxl (two
    /// text encoders, added conditioning), inpaint (SD 1.5 inpainting UNet), or
    /// controlnet (a ControlNet for the tiny model named by --base).
    #[arg(long, default_value = "sd15")]
    kind: TinyTarget,
    /// With --kind controlnet: the tiny base it fits, sd15 or sdxl.
    #[arg(long, default_value_t = TinyKind::Sd15)]
    base: TinyKind,
    /// With --kind controlnet: write one `.safetensors` file in the original
    /// layout (`control_model.input_blocks...`) instead of a diffusers folder.
    #[arg(long)]
    single_file: bool,
}

/// What `kiln model tiny --kind` writes: a base model or a ControlNet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TinyTarget {
    /// A whole model of this architecture.
    Model(TinyKind),
    /// A ControlNet for the tiny base named by `--base`.
    ControlNet,
}

impl std::str::FromStr for TinyTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "controlnet" {
            return Ok(TinyTarget::ControlNet);
        }
        s.parse::<TinyKind>().map(TinyTarget::Model).map_err(|_| {
            format!("unknown tiny kind {s:?}: expected sd15, sd21, sdxl, inpaint or controlnet")
        })
    }
}

impl Tiny {
    /// Writes what was asked for.
    fn run(&self) -> anyhow::Result<()> {
        match self.kind {
            TinyTarget::Model(kind) => tiny(&self.out, kind),
            TinyTarget::ControlNet => tiny_controlnet(&self.out, self.base, self.single_file),
        }
    }
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

/// Writes the tiny ControlNet for `base` to `out`: a diffusers folder, or one
/// original-layout file.
fn tiny_controlnet(out: &Path, base: TinyKind, single_file: bool) -> anyhow::Result<()> {
    let layout = if single_file {
        TinyControlNetLayout::Original
    } else {
        TinyControlNetLayout::Diffusers
    };
    pipeline::write_tiny_controlnet(out, base, layout).with_context(|| {
        format!(
            "cannot write the tiny {base} ControlNet to {}",
            out.display()
        )
    })?;
    let assets = pipeline::Assets::scan(&[], &[], &[("tiny".into(), out.to_path_buf())])
        .with_context(|| format!("cannot hash the ControlNet in {}", out.display()))?;
    let hash = assets
        .controlnets
        .get("tiny")
        .map(|c| c.hash.clone())
        .unwrap_or_default();
    println!(
        "tiny {base} ControlNet written to {} (hash {hash})",
        out.display()
    );
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
