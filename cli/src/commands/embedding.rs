//! `kiln embedding ...`: textual-inversion embedding tools.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use kiln_diffusion as pipeline;

/// Textual-inversion embedding tools.
#[derive(clap::Args, Debug)]
pub struct Embedding {
    #[command(subcommand)]
    command: EmbeddingCommand,
}

#[derive(Subcommand, Debug)]
enum EmbeddingCommand {
    Tiny(Tiny),
}

impl Embedding {
    /// Runs `kiln embedding ...`.
    pub fn run(self) -> anyhow::Result<bool> {
        match self.command {
            EmbeddingCommand::Tiny(c) => c.run().map(|()| true),
        }
    }
}

/// Write a random 2-vector embedding that fits a model (for tests): `emb_params`,
/// or `clip_l` and `clip_g` for SDXL. Its file stem is the word that stands for it
/// in prompts.
#[derive(clap::Args, Debug)]
struct Tiny {
    /// The model folder (diffusers layout) it must fit.
    #[arg(long)]
    model: PathBuf,
    /// The `.safetensors` file to write.
    #[arg(long)]
    out: PathBuf,
    /// Seed of the random values: the same seed and model give the same bytes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl Tiny {
    fn run(self) -> anyhow::Result<()> {
        pipeline::write_tiny_embedding(&self.model, &self.out, self.seed).with_context(|| {
            format!(
                "cannot write an embedding for {} to {}",
                self.model.display(),
                self.out.display()
            )
        })?;
        let hash = pipeline::file_hash(&self.out)
            .with_context(|| format!("cannot hash {}", self.out.display()))?;
        println!("embedding written to {} (hash {hash})", self.out.display());
        Ok(())
    }
}
