//! ControlNets: loading (diffusers folders and single original-layout files),
//! the per-pipeline cache, and their use in the render loop.
//!
//! A recipe's `extras.controlnets` names ControlNets the pipeline's
//! [`Assets`](crate::Assets) hold. Each is loaded on first use, against the
//! pipeline's own UNet config (a ControlNet for another base is refused naming
//! the first tensor that does not fit), and kept in [`ControlNets`] until the
//! pipeline's owner drops it (`Pipeline::drop_part`; by default, for the
//! pipeline's life), its bytes measured as the catalog measures models
//! (`inspect::file_bytes` of its weights file). Files: `model` (the network),
//! `original` (the single-file layout's tensor names), `apply` (control images
//! per task and the residuals of a UNet batch), `tiny` (the random test
//! ControlNets).

mod apply;
mod model;
mod original;
mod tiny;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device};
use serde_json::Value;

pub(crate) use apply::{BatchControls, Control, ControlKey, key, prepare, refit};
pub(crate) use model::{ControlNet, ControlNetConfig};
pub use tiny::{TinyControlNetLayout, write_tiny_controlnet};

use crate::config::Keys;
use crate::error::PipelineError;
use crate::unet::UnetConfig;
use crate::{AssetFile, weights};

/// The config file of a diffusers ControlNet folder.
pub(crate) const CONFIG: &str = "config.json";
/// The weights file of a diffusers ControlNet folder.
pub(crate) const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

/// diffusers' default `conditioning_embedding_out_channels`.
const DEFAULT_EMBEDDING_CHANNELS: [usize; 4] = [16, 32, 96, 256];

/// The ControlNets a pipeline has loaded, by content hash.
#[derive(Debug, Default)]
pub(crate) struct ControlNets {
    /// Loaded networks and their bytes; the lock is held while one loads, so
    /// each loads once.
    loaded: Mutex<HashMap<String, (Arc<ControlNet>, u64)>>,
}

impl ControlNets {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Arc<ControlNet>, u64)>> {
        // Inserts and removals are single steps: a panic elsewhere leaves the map whole.
        self.loaded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns every ControlNet loaded: its hash and bytes.
    pub(crate) fn held(&self) -> Vec<(String, u64)> {
        self.lock()
            .iter()
            .map(|(hash, (_, bytes))| (hash.clone(), *bytes))
            .collect()
    }

    /// Drops the ControlNet with content hash `hash`; returns whether it was loaded.
    /// A render that holds it keeps it until it ends.
    pub(crate) fn remove(&self, hash: &str) -> bool {
        self.lock().remove(hash).is_some()
    }

    /// Returns the bytes the ControlNet of `file` holds once loaded; `None` when
    /// its weights file cannot be read (loading it then fails, naming the file).
    pub(crate) fn needs(&self, file: &AssetFile) -> Option<u64> {
        if let Some((_, bytes)) = self.lock().get(&file.hash) {
            return Some(*bytes);
        }
        weights_bytes(&file.path).ok()
    }

    /// Returns the ControlNet of `file`, loading it on first use.
    pub(crate) fn get(
        &self,
        file: &AssetFile,
        base: &UnetConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Arc<ControlNet>, PipelineError> {
        let mut loaded = self.lock();
        if let Some((net, _)) = loaded.get(&file.hash) {
            return Ok(Arc::clone(net));
        }
        let net = Arc::new(load(&file.path, base, dtype, device)?);
        let bytes = weights_bytes(&file.path)?;
        tracing::debug!(name = %file.name, hash = %file.hash, bytes, "ControlNet loaded");
        loaded.insert(file.hash.clone(), (Arc::clone(&net), bytes));
        Ok(net)
    }
}

/// Returns the loaded bytes of a ControlNet's weights: the folder's weights file,
/// or the single file.
fn weights_bytes(path: &Path) -> Result<u64, PipelineError> {
    if path.is_dir() {
        crate::inspect::file_bytes(&path.join(WEIGHTS))
    } else {
        crate::inspect::file_bytes(path)
    }
}

/// The base UNet's config as a ControlNet's down half takes it: the latents alone.
fn encoder_config(base: &UnetConfig) -> UnetConfig {
    UnetConfig {
        in_channels: base.out_channels,
        ..base.clone()
    }
}

/// Loads a ControlNet made for the UNet `base`: a diffusers folder (`config.json` +
/// `diffusion_pytorch_model.safetensors`) or a single original-layout `.safetensors`.
///
/// # Errors
///
/// `Io` for a missing file, `Config` for a config kiln cannot run, `Weights` naming
/// the first tensor that is missing or does not fit the base.
pub(crate) fn load(
    path: &Path,
    base: &UnetConfig,
    dtype: DType,
    device: &Device,
) -> Result<ControlNet, PipelineError> {
    let unet = encoder_config(base);
    if path.is_dir() {
        let config = path.join(CONFIG);
        let keys = Keys::read(&config)?;
        if keys.or("global_pool_conditions", false)? {
            return Err(keys.error(
                "global_pool_conditions = true (shuffle-style ControlNets) is not supported",
            ));
        }
        match keys
            .get::<String>("controlnet_conditioning_channel_order")?
            .as_deref()
        {
            None | Some("rgb") => {}
            Some(other) => {
                return Err(keys.error(format!(
                    "controlnet_conditioning_channel_order = {other:?}: kiln feeds RGB"
                )));
            }
        }
        let cfg = ControlNetConfig {
            unet,
            conditioning_channels: keys.or("conditioning_channels", 3)?,
            embedding_channels: keys.or(
                "conditioning_embedding_out_channels",
                DEFAULT_EMBEDDING_CHANNELS.to_vec(),
            )?,
        };
        let net = weights::build(&path.join(WEIGHTS), dtype, device, |vb| {
            ControlNet::new(vb, &cfg)
        })?;
        check_heads(&keys, base)?;
        Ok(net)
    } else {
        let shapes = weights::tensor_shapes(path)?;
        let hint = original::hint_convs(shapes.iter().map(|(n, _)| n.as_str()));
        let shape = |i: usize| {
            shapes.iter().find_map(|(n, s)| {
                let n = n.strip_prefix(original::MODEL_PREFIX).unwrap_or(n);
                (n == format!("input_hint_block.{i}.weight")).then_some(s.clone())
            })
        };
        let first = shape(0).filter(|s| s.len() == 4).ok_or_else(|| PipelineError::Weights {
            file: path.to_path_buf(),
            message: "tensor control_model.input_hint_block.0.weight is missing: not a ControlNet in the original layout".into(),
        })?;
        let mut embedding_channels = vec![first[0]];
        for b in (1..hint).step_by(2) {
            if let Some(s) = shape(2 * (b + 1)) {
                embedding_channels.push(s[0]);
            }
        }
        let cfg = ControlNetConfig {
            conditioning_channels: first[1],
            embedding_channels,
            unet: unet.clone(),
        };
        weights::build_renamed(
            path,
            dtype,
            device,
            |name| original::to_diffusers(name, &unet, hint),
            |vb| ControlNet::new(vb, &cfg),
        )
    }
}

/// Refuses a ControlNet whose attention head counts differ from its base's (shapes
/// cannot show them).
fn check_heads(keys: &Keys, base: &UnetConfig) -> Result<(), PipelineError> {
    let n = base.blocks.len();
    let heads = match keys.raw("attention_head_dim") {
        None | Some(Value::Null) => return Ok(()),
        Some(_) => keys.per_block("attention_head_dim", n, 8)?,
    };
    for (i, block) in base.blocks.iter().enumerate() {
        if let Some(a) = block.attention
            && a.heads != heads[i]
        {
            return Err(keys.error(format!(
                "attention_head_dim[{i}] = {} but the base UNet has {} heads there",
                heads[i], a.heads
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
