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
}

impl Model {
    /// Runs `kiln model ...`.
    pub async fn run(self) -> anyhow::Result<bool> {
        match self.command {
            ModelCommand::Tiny(c) => tiny(&c.out, c.kind).map(|()| true),
            ModelCommand::Pull(c) => c.run().await.map(|()| true),
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
