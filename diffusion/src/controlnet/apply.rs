//! ControlNets in the render loop: a task's control images, and the residuals of
//! one UNet batch.
//!
//! **Control images.** Each entry of `recipe.extras.controlnets` comes with its
//! image bytes (`RenderInput::controls`, in order). The image is decoded (PNG
//! or JPEG, the init image's limits), run through its preprocessor if the entry
//! names one, fitted to the render size by its resize mode
//! ([`preprocess::fit`]) and fed as diffusers does: RGB in [0, 1]. An entry of
//! scale 0 is dropped: it renders the bytes of a recipe without it.
//!
//! **Steps.** An entry applies on step `i` of a pass of `n` steps when `i / n`
//! lies in `[start, end]` (A1111's guidance start and end); the steps an
//! img2img start skips count. With classifier-free guidance the residuals go
//! to both rows, negative and prompt, as A1111 and diffusers do by default.
//!
//! **Batches.** Tasks that share a UNet batch have the same ControlNets with the
//! same start and end ([`ControlKey`], part of the render's group key); images
//! and scales are per task. Every ControlNet layer works per row or per task
//! (`group`), as the UNet's do, so a task's residuals do not depend on its batch.
//! The residuals of several ControlNets add in the recipe's order.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use kiln_domain::extras::ResizeMode;

use super::ControlNet;
use crate::unet::{Conditioning, Residuals};
use crate::{Pipeline, PipelineError, Recipe, images, preprocess};

/// One ControlNet of a prepared task.
#[derive(Clone, Debug)]
pub(crate) struct Control {
    /// The network.
    net: Arc<ControlNet>,
    /// Its content hash: tasks share a batch only with the same networks.
    hash: String,
    /// The control image after its preprocessor, before fitting (kept for refitting
    /// at the hires fix's size).
    source: image::RgbImage,
    /// How it is fitted to the render size.
    resize: ResizeMode,
    /// `[1, 3, h, w]` in [0, 1], in the UNet's dtype, at the render size.
    image: Tensor,
    /// Multiplier of the residuals.
    scale: f64,
    /// First fraction of the steps it applies on.
    start: f64,
    /// Last fraction of the steps it applies on.
    end: f64,
}

/// What tasks sharing a UNet batch must agree on, per ControlNet.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ControlKey {
    hash: String,
    start_bits: u64,
    end_bits: u64,
}

/// Returns the group-key part of a task's ControlNets.
pub(crate) fn key(controls: &[Control]) -> Vec<ControlKey> {
    controls
        .iter()
        .map(|c| ControlKey {
            hash: c.hash.clone(),
            start_bits: c.start.to_bits(),
            end_bits: c.end.to_bits(),
        })
        .collect()
}

/// Returns an `InvalidRecipe` error on `controlnets`.
fn invalid(message: String) -> PipelineError {
    PipelineError::InvalidRecipe {
        field: "controlnets",
        message,
    }
}

/// Fits `source` to `width` × `height` and returns it as `[1, 3, h, w]` in [0, 1].
fn tensor(
    p: &Pipeline,
    source: &image::RgbImage,
    resize: ResizeMode,
    width: u32,
    height: u32,
) -> Result<Tensor, PipelineError> {
    let fitted = preprocess::fit(source, width, height, resize);
    let values: Vec<f32> = fitted
        .as_raw()
        .iter()
        .map(|&v| f32::from(v) / 255.0)
        .collect();
    let t = Tensor::from_vec(values, (height as usize, width as usize, 3), &Device::Cpu)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .contiguous()?
        .to_device(&p.device)?
        .to_dtype(p.precision.dtype())?;
    Ok(t)
}

/// Prepares the ControlNets of `recipe` with their image bytes `images`, one per entry.
///
/// # Errors
///
/// `InvalidRecipe` on `controlnets` when the images do not match the entries, a
/// ControlNet is not held here or is held with another hash, or an image cannot be
/// decoded; the loader's errors for a ControlNet that does not fit the model.
pub(crate) fn prepare(
    p: &Pipeline,
    recipe: &Recipe,
    bytes: &[&[u8]],
) -> Result<Vec<Control>, PipelineError> {
    let entries = &recipe.extras.controlnets;
    if entries.len() != bytes.len() {
        return Err(invalid(format!(
            "{} control images for {} ControlNets",
            bytes.len(),
            entries.len()
        )));
    }
    let mut out = Vec::with_capacity(entries.len());
    for (i, (entry, bytes)) in entries.iter().zip(bytes).enumerate() {
        if entry.scale == 0.0 {
            continue;
        }
        let file = p.assets.controlnets.get(&entry.model).ok_or_else(|| {
            invalid(format!(
                "[{i}]: no ControlNet named {} here",
                kiln_domain::error::quote(&entry.model)
            ))
        })?;
        if !entry.hash.is_empty() && entry.hash != file.hash {
            return Err(invalid(format!(
                "[{i}]: ControlNet {} here has hash {}, the recipe wants {}",
                kiln_domain::error::quote(&entry.model),
                file.hash,
                kiln_domain::error::quote(&entry.hash)
            )));
        }
        let decoded = images::decode("controlnets", bytes)?.to_rgb8();
        let source = match entry.preprocess {
            Some(pre) => preprocess::run(pre, &decoded),
            None => decoded,
        };
        let net = p
            .controlnets
            .get(file, &p.unet_config, p.precision.dtype(), &p.device)?;
        let image = tensor(p, &source, entry.resize, recipe.width, recipe.height)?;
        out.push(Control {
            net,
            hash: file.hash.clone(),
            source,
            resize: entry.resize,
            image,
            scale: entry.scale,
            start: entry.start,
            end: entry.end,
        });
    }
    Ok(out)
}

/// Returns `controls` with their images refitted to `width` × `height` (the hires
/// fix's second pass).
///
/// # Errors
///
/// A candle error when the tensor cannot be made.
pub(crate) fn refit(
    p: &Pipeline,
    controls: &[Control],
    width: u32,
    height: u32,
) -> Result<Vec<Control>, PipelineError> {
    controls
        .iter()
        .map(|c| {
            Ok(Control {
                image: tensor(p, &c.source, c.resize, width, height)?,
                ..c.clone()
            })
        })
        .collect()
}

/// One ControlNet over a whole UNet batch.
#[derive(Debug)]
struct Entry {
    net: Arc<ControlNet>,
    /// `[batch, 3, h, w]`: each task's image, once per row.
    image: Tensor,
    /// `[batch, 1, 1, 1]`: each task's scale, once per row.
    scale: Tensor,
    start: f64,
    end: f64,
}

/// The ControlNets of a UNet batch, in the recipes' order.
#[derive(Debug)]
pub(crate) struct BatchControls {
    entries: Vec<Entry>,
}

impl BatchControls {
    /// Stacks the tasks' controls (`per_task`, equal [`key`]s) for batches of `rows`
    /// rows per task; `None` when the tasks have no ControlNet.
    ///
    /// # Errors
    ///
    /// A candle error, or tasks whose ControlNets differ.
    pub(crate) fn new(per_task: &[&[Control]], rows: usize) -> candle_core::Result<Option<Self>> {
        let Some(first) = per_task.first() else {
            return Ok(None);
        };
        if first.is_empty() {
            return Ok(None);
        }
        if per_task.iter().any(|c| key(c) != key(first)) {
            return Err(candle_core::Error::Msg(
                "tasks with different ControlNets in one UNet batch".into(),
            ));
        }
        let mut entries = Vec::with_capacity(first.len());
        for (k, control) in first.iter().enumerate() {
            let mut images = Vec::with_capacity(per_task.len() * rows);
            let mut scales = Vec::with_capacity(per_task.len() * rows);
            for task in per_task {
                for _ in 0..rows {
                    images.push(task[k].image.clone());
                    scales.push(task[k].scale as f32);
                }
            }
            let device = control.image.device();
            let dtype = control.image.dtype();
            let n = scales.len();
            entries.push(Entry {
                net: Arc::clone(&control.net),
                image: Tensor::cat(&images, 0)?,
                scale: Tensor::from_vec(scales, (n, 1, 1, 1), &Device::Cpu)?
                    .to_device(device)?
                    .to_dtype(dtype)?,
                start: control.start,
                end: control.end,
            });
        }
        Ok(Some(Self { entries }))
    }

    /// Returns the summed residuals of the ControlNets that apply on step `step` of
    /// `total` for the UNet input `latents`; `None` when none applies.
    ///
    /// # Errors
    ///
    /// A candle error.
    pub(crate) fn residuals(
        &self,
        latents: &Tensor,
        timestep: f64,
        cond: &Conditioning,
        group: usize,
        step: usize,
        total: usize,
    ) -> candle_core::Result<Option<Residuals>> {
        let fraction = step as f64 / total.max(1) as f64;
        // A ControlNet takes the latents alone, even beside an inpainting UNet.
        let own = Conditioning {
            image: None,
            ..cond.clone()
        };
        let mut sum: Option<Residuals> = None;
        for e in &self.entries {
            if fraction < e.start || fraction > e.end {
                continue;
            }
            let r = e
                .net
                .forward(latents, timestep, &own, group, &e.image, &e.scale)?;
            sum = Some(match sum {
                None => r,
                Some(s) => Residuals {
                    down: s
                        .down
                        .iter()
                        .zip(&r.down)
                        .map(|(a, b)| a + b)
                        .collect::<candle_core::Result<Vec<_>>>()?,
                    mid: (&s.mid + &r.mid)?,
                },
            });
        }
        Ok(sum)
    }
}
