//! `kiln model ...`: model tools.

use std::path::Path;

use anyhow::Context;
use kiln_worker::pipeline;

/// Writes the tiny random-weight model into `out`.
pub fn tiny(out: &Path) -> anyhow::Result<()> {
    pipeline::write_tiny_model(out)
        .with_context(|| format!("cannot write the tiny model to {}", out.display()))?;
    let hash = pipeline::model_hash(out)
        .with_context(|| format!("cannot hash the model in {}", out.display()))?;
    println!("tiny model written to {} (hash {hash})", out.display());
    Ok(())
}
