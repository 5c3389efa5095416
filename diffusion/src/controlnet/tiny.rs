//! Tiny random ControlNets matching the tiny base models, for tests and trying
//! ControlNet out: `kiln model tiny --kind controlnet --base sd15|sdxl`.
//!
//! The diffusers layout is a folder (`config.json` with diffusers'
//! `ControlNetModel` keys copied from the tiny base's UNet config, and
//! `diffusion_pytorch_model.safetensors`); the original layout is one
//! `.safetensors` file with the same values under the original names
//! (`control_model.input_blocks…`), so loading either gives the same network.
//! Weights follow the tiny models' rule (`tiny`), including the convolutions a
//! trained ControlNet starts at zero: at zero a control image would change nothing.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Value, json};

use super::{CONFIG, ControlNet, ControlNetConfig, WEIGHTS, encoder_config, original};
use crate::config::{self, Keys};
use crate::error::PipelineError;
use crate::{TinyKind, tiny, tiny_configs};

/// Where a tiny ControlNet is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TinyControlNetLayout {
    /// A diffusers folder: `config.json` + `diffusion_pytorch_model.safetensors`.
    Diffusers,
    /// One `.safetensors` file in the original layout (`control_model.…`).
    Original,
}

/// Channels of the tiny control-image encoder: three stride-2 steps, the VAE's 8×.
const EMBEDDING_CHANNELS: [usize; 4] = [8, 8, 16, 16];

/// The `ControlNetModel` keys kiln copies from the base UNet's config.
const UNET_KEYS: &[&str] = &[
    "act_fn",
    "addition_embed_type",
    "addition_embed_type_num_heads",
    "addition_time_embed_dim",
    "attention_head_dim",
    "block_out_channels",
    "cross_attention_dim",
    "down_block_types",
    "downsample_padding",
    "flip_sin_to_cos",
    "freq_shift",
    "in_channels",
    "layers_per_block",
    "mid_block_scale_factor",
    "norm_eps",
    "norm_num_groups",
    "projection_class_embeddings_input_dim",
    "resnet_time_scale_shift",
    "transformer_layers_per_block",
    "upcast_attention",
    "use_linear_projection",
];

/// The `config.json` of the tiny ControlNet for `base`.
fn config_json(base: TinyKind) -> Value {
    let unet = tiny_configs::unet_config(base);
    let mut out = serde_json::Map::new();
    out.insert("_class_name".into(), json!("ControlNetModel"));
    out.insert("_diffusers_version".into(), json!("0.30.0"));
    for key in UNET_KEYS {
        if let Some(v) = unet.get(*key) {
            out.insert((*key).into(), v.clone());
        }
    }
    out.insert("in_channels".into(), json!(4));
    out.insert("conditioning_channels".into(), json!(3));
    out.insert(
        "conditioning_embedding_out_channels".into(),
        json!(EMBEDDING_CHANNELS),
    );
    out.insert("controlnet_conditioning_channel_order".into(), json!("rgb"));
    out.insert("global_pool_conditions".into(), json!(false));
    out.insert("only_cross_attention".into(), json!(false));
    out.sort_keys();
    Value::Object(out)
}

/// Writes the tiny ControlNet for the tiny model of kind `base` (deterministic):
/// a diffusers folder `out`, or the original layout's single file `out`.
///
/// # Errors
///
/// `InvalidRecipe` on `base` for a base with no tiny ControlNet (SD 2.1 and
/// inpainting: use the SD 1.5 one's shapes with `sd15`); `Io` when writing fails.
pub fn write_tiny_controlnet(
    out: &Path,
    base: TinyKind,
    layout: TinyControlNetLayout,
) -> Result<(), PipelineError> {
    if !matches!(base, TinyKind::Sd15 | TinyKind::Sdxl) {
        return Err(PipelineError::InvalidRecipe {
            field: "base",
            message: format!("no tiny ControlNet for {base}: expected sd15 or sdxl"),
        });
    }
    let unet_json = tiny_configs::unet_config(base).to_string();
    let keys = Keys::parse(Path::new("unet/config.json"), &unet_json)?;
    let unet = encoder_config(&config::unet_config(&keys)?);
    let cfg = ControlNetConfig {
        unet: unet.clone(),
        conditioning_channels: 3,
        embedding_channels: EMBEDDING_CHANNELS.to_vec(),
    };
    let tensors = tiny::random_weights(&format!("controlnet-{base}"), |vb| {
        ControlNet::new(vb, &cfg).map(drop)
    })?;
    match layout {
        TinyControlNetLayout::Diffusers => {
            std::fs::create_dir_all(out).map_err(|e| PipelineError::io(out, e))?;
            tiny::write_json(out, CONFIG, &config_json(base))?;
            tiny::save(out, WEIGHTS, &tensors)
        }
        TinyControlNetLayout::Original => {
            let hint = EMBEDDING_CHANNELS.len().saturating_sub(1) * 2;
            let mut renamed = HashMap::with_capacity(tensors.len());
            for (name, t) in tensors {
                let to = original::to_original(&name, &unet, hint).ok_or_else(|| {
                    PipelineError::config(out, format!("no original-layout name for {name}"))
                })?;
                renamed.insert(to, t);
            }
            let (dir, file) = match (out.parent(), out.file_name()) {
                (Some(dir), Some(file)) => (dir, file),
                _ => return Err(PipelineError::config(out, "is not a file path")),
            };
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| PipelineError::io(dir, e))?;
            }
            tiny::save(dir, &file.to_string_lossy(), &renamed)
        }
    }
}
