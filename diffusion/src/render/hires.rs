//! The hires fix (A1111's "Hires. fix"): after the first pass at the recipe's
//! size, upscale and run an img2img pass at [`Hires::target_size`].
//!
//! - **Upscaling.** `latent`: the final latents, bilinearly (A1111's default
//!   "Latent" upscaler: `interpolate(mode="bilinear")`, corners not aligned).
//!   `lanczos`: the first pass is decoded, resized with a Lanczos3 filter and
//!   encoded again with the VAE (the distribution's mean, as img2img does).
//! - **Second pass.** The recipe's prompt, guidance and sampler at the new size,
//!   `hires.steps` steps with strength `hires.denoise`: the upscaled latents are
//!   noised to the level of step `steps - floor(steps × denoise)` and the steps
//!   from there on are run, as img2img does. Its noise has purposes of its own
//!   (`Purpose::HiresLatents`, `Purpose::HiresStep`), keyed by the recipe's seed.
//!   The text is encoded again (SDXL's time ids carry the size) and the
//!   ControlNets' images are refitted to the new size from the originals.
//! - Progress counts both passes: `steps + hires.steps` in all. A mask is
//!   refused with the hires fix (the kept pixels would not survive the upscale).
//!
//! [`Hires::target_size`]: kiln_domain::extras::Hires::target_size

use std::borrow::Cow;

use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use kiln_domain::extras::{Extras, Upscaler};

use super::super::controlnet;
use super::super::images;
use super::super::noise::{self, Purpose};
use super::super::sampling;
use super::{Pipeline, PipelineError, Recipe, RgbImage, Task};

/// Returns the second-pass task of a task whose first pass is done; a task without
/// the hires fix is returned as it is.
///
/// # Errors
///
/// `InvalidRecipe` naming `hires` for a size or step count the model or the sampler
/// cannot run; candle errors.
pub(super) fn second_pass<'a>(p: &Pipeline, task: Task<'a>) -> Result<Task<'a>, PipelineError> {
    let Some(hires) = task.recipe.extras.hires.clone() else {
        return Ok(task);
    };
    let first = &task.recipe;
    let (width, height) = hires.target_size(first.width, first.height);
    let latent_width = p.latent_side("hires", width)?;
    let latent_height = p.latent_side("hires", height)?;
    let recipe = Recipe {
        width,
        height,
        steps: hires.steps,
        strength: hires.denoise,
        extras: Extras {
            hires: None,
            ..first.extras.clone()
        },
        ..(**first).clone()
    };
    let sampler = sampling::for_recipe(&p.scheduler, &recipe).map_err(|e| match e {
        PipelineError::InvalidRecipe { message, .. } => PipelineError::InvalidRecipe {
            field: "hires",
            message,
        },
        other => other,
    })?;
    let upscaled = match hires.upscaler {
        Upscaler::Latent => task
            .latents
            .upsample_bilinear2d(latent_height, latent_width, false)?,
        Upscaler::Lanczos => {
            let small = p.decode(&task.latents)?;
            let buffer = image::RgbImage::from_raw(small.width, small.height, small.pixels)
                .ok_or_else(|| {
                    candle_core::Error::Msg("a decoded image of the wrong size".into())
                })?;
            let big = image::imageops::resize(&buffer, width, height, FilterType::Lanczos3);
            let big = RgbImage {
                width,
                height,
                pixels: big.into_raw(),
            };
            p.encode(&images::to_tensor(&big, &Device::Cpu)?.to_device(&p.device)?)?
        }
    };
    let shape = (1, p.latent_channels, latent_height, latent_width);
    let unit = Tensor::from_vec(
        noise::standard_normal(
            recipe.seed,
            Purpose::HiresLatents,
            0,
            shape.1 * shape.2 * shape.3,
        ),
        shape,
        &Device::Cpu,
    )?
    .to_device(&p.device)?;
    let start = sampler.start_index(hires.denoise);
    let latents = if start > 0 {
        sampler.add_noise(&upscaled, &unit, start)?
    } else {
        (&unit * sampler.init_noise_sigma())?
    };
    let guided = recipe.guidance > 1.0;
    let negative = guided.then_some(recipe.negative_prompt.as_str());
    let image = p.blank_image_conditioning(latent_height, latent_width)?;
    // The same LoRAs and embeddings as the first pass (their variants are kept).
    let applied = crate::adapters::apply(p, &recipe)?;
    // The second pass schedules prompt editing over its own steps, as A1111's
    // hires pass does.
    let text = tracing::info_span!("text_encode").in_scope(|| {
        p.scheduled_conditioning(
            &recipe.prompt,
            negative,
            hires.steps,
            (latent_height, latent_width),
            image,
            &applied.text,
        )
    })?;
    let text_rows = text.rows_at(0);
    let cond = text.select(&text_rows)?;
    let controls = controlnet::refit(p, &task.controls, width, height)?;
    Ok(Task {
        index: task.index,
        offset: task.total - hires.steps,
        total: task.total,
        recipe: Cow::Owned(recipe),
        sampler,
        start,
        rows: task.rows,
        unet: applied.unet,
        unet_key: applied.unet_key,
        text,
        text_rows,
        cond,
        latents,
        noise: unit,
        blend: None,
        overlay: None,
        controls,
        ancestral: Purpose::HiresStep,
        prepared_in: task.prepared_in,
    })
}
