//! `kiln lora ...`: LoRA tools.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use kiln_diffusion::{self as pipeline, LoraFormat};

/// LoRA tools.
#[derive(clap::Args, Debug)]
pub struct Lora {
    #[command(subcommand)]
    command: LoraCommand,
}

#[derive(Subcommand, Debug)]
enum LoraCommand {
    Tiny(Tiny),
}

impl Lora {
    /// Runs `kiln lora ...`.
    pub fn run(self) -> anyhow::Result<bool> {
        match self.command {
            LoraCommand::Tiny(c) => c.run().map(|()| true),
        }
    }
}

/// Write a random LoRA that fits a model (for tests): every attention projection of
/// the UNet and the text encoders, and for kohya the ResNet convolutions (LoCon)
/// and the text encoders' feed-forward layers too.
#[derive(clap::Args, Debug)]
struct Tiny {
    /// The model folder (diffusers layout) it must fit.
    #[arg(long)]
    model: PathBuf,
    /// The `.safetensors` file to write; its stem is the LoRA's name on a worker.
    #[arg(long)]
    out: PathBuf,
    /// The key layout: kohya (lora_unet_..., lora_te_...) or peft (diffusers'
    /// unet.....lora_A.weight).
    #[arg(long, default_value_t = LoraFormat::Kohya)]
    format: LoraFormat,
    /// Seed of the random values: the same seed and model give the same bytes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl Tiny {
    fn run(self) -> anyhow::Result<()> {
        let modules = pipeline::write_tiny_lora(&self.model, &self.out, self.format, self.seed)
            .with_context(|| {
                format!(
                    "cannot write a {} LoRA for {} to {}",
                    self.format,
                    self.model.display(),
                    self.out.display()
                )
            })?;
        let hash = pipeline::file_hash(&self.out)
            .with_context(|| format!("cannot hash {}", self.out.display()))?;
        println!(
            "{} LoRA of {modules} modules written to {} (hash {hash})",
            self.format,
            self.out.display()
        );
        Ok(())
    }
}
