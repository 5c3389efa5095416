//! LoRA: low-rank weight deltas for the UNet and the text encoders, read from
//! kohya/A1111 or diffusers/PEFT files and merged into variants of the model.
//!
//! A LoRA file holds, per targeted module (a Linear or convolution weight `W` of
//! shape `[out, in, (k, k)]`), a down matrix `[rank, in, (k, k)]`, an up matrix
//! `[out, rank, (1, 1)]` and optionally a scalar `alpha`. Applied at weight `w`,
//! it changes the weight to `W + w · alpha / rank · up · down` (the product taken
//! over the rank, reshaped to `W`'s shape); `alpha` missing means `alpha = rank`.
//! Convolution targets (LoCon) take a 3×3 or 1×1 down convolution and a 1×1 up.
//! `format` says how a key names its module; [`read`] checks every key of a file
//! against the model, in key order, and refuses the file with the first key that
//! does not fit (an unknown target or a wrong shape) as `PipelineError::Weights`.
//!
//! kiln merges rather than adding the low-rank products on the fly: a merged
//! model runs every step at the base model's speed, where a low-rank branch on
//! every targeted layer costs extra products at every step (measured on an SD
//! 1.5 attention projection at 256 px: 12–49 % more for ranks 4–64), while
//! merging costs about one load of the component per new LoRA set. A variant is built from the base files with the deltas added as each
//! weight is loaded (`weights::build_merged`), so the base model is never touched
//! and a render without LoRAs is the base model's, bit for bit. `variants` keeps
//! the merged UNets and text encoders under a memory budget, keyed by LoRA set.

mod format;
mod tiny;
pub(crate) mod variants;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::error::PipelineError;
use super::weights;

pub(crate) use format::Modules;
pub use tiny::{LoraFormat, ParseLoraFormatError, write_tiny_lora};

/// The part of a pipeline a LoRA tensor changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Component {
    /// The denoiser.
    Unet,
    /// A text encoder: 0 is `text_encoder`, 1 SDXL's `text_encoder_2`.
    Text(usize),
}

impl Component {
    /// The component's folder name in a diffusers model.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::Text(0) => "text_encoder",
            Component::Text(_) => "text_encoder_2",
        }
    }
}

/// The modules a LoRA may change in one model.
#[derive(Clone, Debug, Default)]
pub(crate) struct Targets {
    /// The UNet's.
    pub(crate) unet: Modules,
    /// Each text encoder's, `text_encoder` first.
    pub(crate) text: Vec<Modules>,
}

impl Targets {
    /// Returns a component's modules, if the model has that component.
    pub(crate) fn modules(&self, c: Component) -> Option<&Modules> {
        match c {
            Component::Unet => Some(&self.unet),
            Component::Text(i) => self.text.get(i),
        }
    }
}

/// A module's tensors as read so far: key, shape and (for the component being
/// merged) the tensor of down and up, and alpha.
#[derive(Default)]
struct Pair {
    down: Option<(String, Vec<usize>, Option<Tensor>)>,
    up: Option<(String, Vec<usize>, Option<Tensor>)>,
    alpha: Option<f64>,
}

/// Reads a LoRA file for the model whose modules are `targets` and returns its
/// deltas for `component` at weight 1: each changed tensor (`<module>.weight`) →
/// `alpha / rank · up · down` in f32, shaped as the tensor. Every key is checked;
/// only `component`'s tensors are loaded and multiplied.
///
/// # Errors
///
/// `Io` or `Weights` for an unreadable file; `Weights` naming the first key (in
/// sorted order) that does not fit the model: a key in neither layout, a module
/// the model lacks, a shape that does not fit the module, a down without its up
/// (or the reverse), ranks that differ; or a file without any LoRA tensor.
pub(crate) fn read(
    file: &Path,
    targets: &Targets,
    component: Component,
    device: &Device,
) -> Result<BTreeMap<String, Tensor>, PipelineError> {
    let err = |key: &str, message: String| PipelineError::Weights {
        file: file.to_path_buf(),
        message: format!("tensor {key} {message}"),
    };
    let tensors = weights::map_file(file)?;
    let mut keys: Vec<(String, Vec<usize>)> = tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec()))
        .collect();
    keys.sort();
    if keys.is_empty() {
        return Err(PipelineError::Weights {
            file: file.to_path_buf(),
            message: "holds no LoRA tensors".into(),
        });
    }
    let mut pairs: BTreeMap<(Component, String), Pair> = BTreeMap::new();
    for (key, shape) in &keys {
        let placed = format::place(key, &targets.unet, &targets.text).map_err(|m| err(key, m))?;
        let target = targets
            .modules(placed.component)
            .and_then(|m| m.shape(&placed.module))
            .ok_or_else(|| err(key, "names no module of this model".into()))?;
        let out = target[0];
        let fan_in: usize = target[1..].iter().product();
        let misfit = || {
            err(
                key,
                format!(
                    "has shape {shape:?}, which does not fit {}.weight of shape {target:?}",
                    placed.module
                ),
            )
        };
        let load = || -> Result<Tensor, PipelineError> {
            let t = tensors
                .load(key, device)
                .and_then(|t| t.to_dtype(DType::F32))
                .map_err(|e| err(key, format!("cannot be loaded: {e}")))?;
            Ok(t)
        };
        let merged = placed.component == component;
        let load_merged = || merged.then(load).transpose();
        let pair = pairs
            .entry((placed.component, placed.module.clone()))
            .or_default();
        match placed.part {
            format::Part::Down => {
                if shape.len() < 2 || shape[1..].iter().product::<usize>() != fan_in {
                    return Err(misfit());
                }
                pair.down = Some((key.clone(), shape.clone(), load_merged()?));
            }
            format::Part::Up => {
                if shape.len() < 2 || shape[0] != out || shape[2..].iter().product::<usize>() != 1 {
                    return Err(misfit());
                }
                pair.up = Some((key.clone(), shape.clone(), load_merged()?));
            }
            format::Part::Alpha => {
                if shape.iter().product::<usize>() != 1 {
                    return Err(misfit());
                }
                let value = load()?
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(|e| err(key, format!("cannot be read: {e}")))?;
                pair.alpha = value.first().map(|&a| f64::from(a));
            }
        }
    }
    let mut deltas = BTreeMap::new();
    for ((of, module), pair) in pairs {
        let ((down_key, down_shape, down), (_, up_shape, up)) = match (pair.down, pair.up) {
            (Some(d), Some(u)) => (d, u),
            (Some((key, ..)), None) => return Err(err(&key, "has no up matrix beside it".into())),
            (None, Some((key, ..))) => {
                return Err(err(&key, "has no down matrix beside it".into()));
            }
            (None, None) => {
                return Err(PipelineError::Weights {
                    file: file.to_path_buf(),
                    message: format!("the alpha of {module} has no down and up matrices"),
                });
            }
        };
        let rank = down_shape[0];
        if up_shape[1] != rank {
            return Err(err(
                &down_key,
                format!("has rank {rank} but its up matrix has {}", up_shape[1]),
            ));
        }
        let (Some(down), Some(up)) = (down, up) else {
            continue; // Another component's module: checked, not merged.
        };
        let target = targets
            .modules(of)
            .and_then(|m| m.shape(&module))
            .ok_or_else(|| err(&down_key, "names no module of this model".into()))?;
        let scale = pair.alpha.unwrap_or(rank as f64) / rank as f64;
        let up = up.reshape((target[0], rank))?;
        let down = down.reshape((rank, ()))?;
        let delta = (up.matmul(&down)? * scale)?.reshape(target)?;
        deltas.insert(format!("{module}.weight"), delta);
    }
    Ok(deltas)
}
