//! Random LoRA files that fit a model, for tests: `kiln lora tiny`.
//!
//! A tiny LoRA targets every attention projection of the UNet (`to_q`, `to_k`,
//! `to_v`, `to_out.0` of self- and cross-attention) and of each text encoder
//! (`q_proj`, `k_proj`, `v_proj`, `out_proj`), at rank 4. The kohya file also
//! targets convolutions, as LoCon does (every ResNet's 3×3 `conv1` with a 3×3
//! down convolution; the attention blocks' `proj_in` when it is a 1×1
//! convolution, with a 1×1 down) and the text encoders' feed-forward layers,
//! with `alpha` = 2 (half the rank); the diffusers/PEFT file has no alpha. Down
//! matrices are N(0, 1/fan_in), up matrices N(0, 0.5²), from kiln's portable
//! generator keyed by the seed and the tensor's name, so the bytes depend only on
//! the model's shapes and the seed; at weight 0.7 the deltas are about a third
//! (kohya) or two thirds (PEFT) of the tiny model's weights, which visibly
//! changes a 64 px render.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

use super::super::error::PipelineError;
use super::super::layout::ModelFiles;
use super::super::noise::{self, Purpose};
use super::super::weights;
use super::{Component, Modules};

/// The rank of a tiny LoRA.
const RANK: usize = 4;
/// kohya's `alpha` in a tiny LoRA: the deltas are scaled by alpha / rank = 1/2.
const ALPHA: f32 = 2.0;
/// Standard deviation of the up matrices.
const UP_GAIN: f32 = 0.5;

/// The key layout of a LoRA file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoraFormat {
    /// kohya / A1111: `lora_unet_…`, `lora_te_…`, `.lora_down/.lora_up/.alpha`.
    #[default]
    Kohya,
    /// diffusers / PEFT: `unet.….lora_A.weight`, `text_encoder.….lora_B.weight`.
    Peft,
}

impl LoraFormat {
    /// The command-line name: `kohya` or `peft`.
    pub fn name(self) -> &'static str {
        match self {
            LoraFormat::Kohya => "kohya",
            LoraFormat::Peft => "peft",
        }
    }
}

impl fmt::Display for LoraFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A LoRA format name that is neither `kohya` nor `peft`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown LoRA format {0:?}: expected kohya or peft")]
pub struct ParseLoraFormatError(pub String);

impl FromStr for LoraFormat {
    type Err = ParseLoraFormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [LoraFormat::Kohya, LoraFormat::Peft]
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| ParseLoraFormatError(s.to_string()))
    }
}

/// Returns whether a tiny LoRA of `format` targets `module` (weight shape `shape`).
fn targeted(format: LoraFormat, component: Component, module: &str, shape: &[usize]) -> bool {
    let last = module.rsplit('.').next().unwrap_or_default();
    let to_out = module.ends_with(".to_out.0");
    match component {
        Component::Unet => {
            let attention = (module.contains(".attn1.") || module.contains(".attn2."))
                && (matches!(last, "to_q" | "to_k" | "to_v") || to_out);
            let locon = format == LoraFormat::Kohya
                && ((module.contains(".resnets.") && last == "conv1")
                    || (last == "proj_in" && shape.len() == 4));
            attention || locon
        }
        Component::Text(_) => {
            matches!(last, "q_proj" | "k_proj" | "v_proj" | "out_proj")
                || (format == LoraFormat::Kohya && matches!(last, "fc1" | "fc2"))
        }
    }
}

/// Returns N(0, scale²) values for one tensor of the file.
fn random(seed: u64, key: &str, len: usize, scale: f32) -> Vec<f32> {
    let digest = Sha256::digest(key.as_bytes());
    let stream = u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]);
    noise::standard_normal(seed, Purpose::Weights(stream), 0, len)
        .into_iter()
        .map(|x| x * scale)
        .collect()
}

/// Writes a random LoRA of `format` that fits the model in `model` to `out`, and
/// returns how many modules it changes.
///
/// # Errors
///
/// `Io`, `Config` or `Weights` when the model folder cannot be read, `Weights`
/// when the file cannot be written.
pub fn write_tiny_lora(
    model: &Path,
    out: &Path,
    format: LoraFormat,
    seed: u64,
) -> Result<usize, PipelineError> {
    let files = ModelFiles::locate(model)?;
    let mut components = vec![(
        Component::Unet,
        Modules::new(&weights::shapes(&files.path(&files.unet_weights))?),
    )];
    for (i, text) in files.text.iter().enumerate() {
        components.push((
            Component::Text(i),
            Modules::new(&weights::shapes(&files.path(&text.weights))?),
        ));
    }
    let encoders = files.text.len();
    let mut tensors = HashMap::new();
    let mut modules = 0;
    let cpu = &Device::Cpu;
    for (component, m) in &components {
        for (module, shape) in m.paths() {
            if !targeted(format, *component, module, shape) {
                continue;
            }
            modules += 1;
            let (out_features, fan_in) = (shape[0], shape[1..].iter().product::<usize>());
            // A convolution's down matrix is a convolution of the same kernel; its up a 1×1.
            let (down_shape, up_shape) = if shape.len() == 4 {
                (
                    vec![RANK, shape[1], shape[2], shape[3]],
                    vec![out_features, RANK, 1, 1],
                )
            } else {
                (vec![RANK, shape[1]], vec![out_features, RANK])
            };
            let (prefix, down_key, up_key) = match (format, component) {
                (LoraFormat::Kohya, c) => {
                    let prefix = match c {
                        Component::Unet => "lora_unet_".to_string(),
                        Component::Text(0) if encoders == 1 => "lora_te_".to_string(),
                        Component::Text(i) => format!("lora_te{}_", i + 1),
                    };
                    (
                        format!("{prefix}{}", module.replace('.', "_")),
                        ".lora_down.weight",
                        ".lora_up.weight",
                    )
                }
                (LoraFormat::Peft, c) => (
                    format!("{}.{module}", c.name()),
                    ".lora_A.weight",
                    ".lora_B.weight",
                ),
            };
            let down = format!("{prefix}{down_key}");
            let up = format!("{prefix}{up_key}");
            let down_len = RANK * fan_in;
            let down_values = random(seed, &down, down_len, 1.0 / (fan_in as f32).sqrt());
            let up_values = random(seed, &up, out_features * RANK, UP_GAIN);
            tensors.insert(down, Tensor::from_vec(down_values, down_shape, cpu)?);
            tensors.insert(up, Tensor::from_vec(up_values, up_shape, cpu)?);
            if format == LoraFormat::Kohya {
                tensors.insert(format!("{prefix}.alpha"), Tensor::new(ALPHA, cpu)?);
            }
        }
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| PipelineError::io(parent, e))?;
    }
    candle_core::safetensors::save(&tensors, out).map_err(|e| PipelineError::Weights {
        file: out.to_path_buf(),
        message: format!("cannot be written: {e}"),
    })?;
    Ok(modules)
}
