//! `kiln model ...`: model tools.

use std::path::Path;

use anyhow::Context;
use kiln_diffusion::{self as pipeline, TinyKind};

/// Writes the tiny random-weight model of architecture `kind` into `out`.
pub fn tiny(out: &Path, kind: TinyKind) -> anyhow::Result<()> {
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
