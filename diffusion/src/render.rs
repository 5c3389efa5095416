//! The denoising loop: txt2img, img2img and inpainting, one task or a batch.
//!
//! Every input is first *prepared* on its own: its sampler planned, its prompt
//! encoded, its init image and mask decoded, its starting latents made. Then
//! inputs that can share UNet calls are *grouped*, and each group is denoised in
//! lockstep: one UNet batch per step holding every task's rows, task after task
//! (`[uncond₁, cond₁, uncond₂, cond₂, …]` with guidance), while each task keeps
//! its own sampler, noise, guidance scale, progress and cancellation. The UNet
//! computes its per-row vector layers task by task (`unet_blocks`), the text
//! encoder and the VAE work per chunk and per image, so a task's bytes do not
//! depend on the batch it ran in; `tests` checks it.
//!
//! **img2img.** The init image is resized to the recipe's size (`images`), VAE
//! encoded to the distribution's *mean* (never a sample: candle's sampling draws
//! from the device generator), scaled, and noised to the level of step
//! `start = steps - floor(steps × strength)` with `noise::Purpose::Img2Img`
//! noise keyed by the recipe's seed; the steps from `start` on are denoised
//! (diffusers' `get_timesteps`). Strength 1 starts from the txt2img noise and
//! ignores the image; strength 0 runs no step and returns the VAE round trip.
//! DPM-Solver++ takes a first-order step at `start`, having no history.
//!
//! **Inpainting.** With a mask (white = repaint), an inpainting UNet (9 input
//! channels) gets the mask at latent size and the latents of the masked image
//! (the init image with the repainted pixels set to grey) beside its input, as
//! diffusers' `StableDiffusionInpaintPipeline` does. An ordinary UNet gets mask
//! blending instead (diffusers' inpainting with a 4-channel UNet, formerly its
//! "legacy" pipeline): after every step the kept region of the latents is
//! replaced by the init latents noised to the level of the next step (clean
//! after the last). For both, the kept pixels of the init image are pasted back
//! over the decoded image, as the A1111 web UI does, so they come out unchanged.
//!
//! **Previews.** After each step the loop offers the task's latents to
//! `preview::offer`, which projects them to a small PNG when one is due
//! (`Pipeline::render_batch_with_previews`); it reads the latents only.
//!
//! **Exactness.** The CPU matrix kernels choose their algorithm by matrix size,
//! so a product whose rows are `batch × tokens` sums in another order when the
//! batch grows past a size threshold (a one-row product, or one of at most 256
//! outputs, has kernels of its own). At the UNet's coarsest level, with few
//! tokens, that happens; such renders are not batched (`Unet::batches_exactly`).

mod hires;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, IndexOp, Tensor};

use super::conditioning::Scheduled;
use super::controlnet::{self, BatchControls, Control, ControlKey};
use super::images;
use super::noise::{self, Purpose};
use super::preview::{self, PreviewSink};
use super::sampling::{self, Sampler};
use super::unet::{AddedConditioning, Conditioning, Unet};
use kiln_domain::recipe::BatchKey;

use super::{Pipeline, PipelineError, Recipe, RgbImage};

/// One image to render: a recipe and the image bytes it refers to.
#[derive(Clone, Copy, Debug)]
pub struct RenderInput<'a> {
    /// What to render.
    pub recipe: &'a Recipe,
    /// The init image (PNG or JPEG) for img2img and inpainting.
    pub init_image: Option<&'a [u8]>,
    /// The inpainting mask (PNG or JPEG, white = repaint); needs an init image.
    pub mask: Option<&'a [u8]>,
    /// The control images (PNG or JPEG), one per entry of the recipe's
    /// `extras.controlnets`, in that order.
    pub controls: &'a [&'a [u8]],
}

impl<'a> RenderInput<'a> {
    /// Returns a txt2img input.
    pub fn txt2img(recipe: &'a Recipe) -> Self {
        Self {
            recipe,
            init_image: None,
            mask: None,
            controls: &[],
        }
    }
}

/// Where one render's time went. Tasks denoised together in one UNet batch
/// share the batch's denoising time; preparing and decoding are their own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenderTimings {
    /// Encoding the prompts and images and making the starting latents.
    pub prepare: Duration,
    /// The denoising steps (of the whole UNet batch the task ran in).
    pub denoise: Duration,
    /// The VAE decode to pixels.
    pub decode: Duration,
}

impl RenderTimings {
    /// Returns the whole render's time.
    pub fn total(&self) -> Duration {
        self.prepare + self.denoise + self.decode
    }
}

/// A rendered image and where its time went.
#[derive(Clone, Debug)]
pub struct Rendered {
    /// The pixels.
    pub image: RgbImage,
    /// Where the time went.
    pub timings: RenderTimings,
}

/// Latent-space inpainting for an ordinary UNet.
struct Blend {
    /// The init image's scaled latents.
    init: Tensor,
    /// `[1, c, h, w]` u8: 1 where the latents are repainted.
    repaint: Tensor,
}

/// The init image pixels pasted back outside the mask.
struct Overlay {
    /// The init image at the recipe's size.
    init: RgbImage,
    /// Per pixel: repainted (true) or kept.
    repaint: Vec<bool>,
}

/// A prepared task.
struct Task<'a> {
    /// Its position among the inputs.
    index: usize,
    /// What it renders (seed, guidance scale, prompt); the hires fix's second pass
    /// renders its own recipe at the upscaled size.
    recipe: Cow<'a, Recipe>,
    /// Its own sampler: samplers with memory (DPM-Solver++) must not be shared.
    sampler: Box<dyn Sampler>,
    /// The first step run; `steps` when nothing is left to denoise.
    start: usize,
    /// Rows per UNet call: 2 with guidance (negative, prompt), else 1.
    rows: usize,
    /// The UNet it denoises with: the base one or one merged with its LoRAs.
    unet: Arc<Unet>,
    /// The key of its UNet LoRA set (empty: the base UNet).
    unet_key: String,
    /// Its text conditioning at every step (prompt editing, alternation).
    text: Scheduled,
    /// The rows of `text` that `cond` holds now.
    text_rows: Vec<usize>,
    /// The UNet conditioning of its rows at the current step.
    cond: Conditioning,
    /// `[1, c, h, w]` f32.
    latents: Tensor,
    /// The unit noise the start was made from (blending re-noises the init with it).
    noise: Tensor,
    blend: Option<Blend>,
    overlay: Option<Overlay>,
    /// Its ControlNets with their control images at its size.
    controls: Vec<Control>,
    /// The noise purpose of its ancestral steps (the hires pass has its own).
    ancestral: Purpose,
    /// Steps reported before this pass's (the first pass's, in the hires pass).
    offset: u32,
    /// Steps reported in all (both passes' with the hires fix).
    total: u32,
    /// Time spent in [`prepare`].
    prepared_in: Duration,
}

/// Runs [`Pipeline::render_batch`].
pub(super) fn render_batch(
    pipeline: &Pipeline,
    inputs: &[RenderInput<'_>],
    on_step: &mut dyn FnMut(usize, u32, u32) -> bool,
    previews: &mut PreviewSink<'_>,
) -> Vec<Result<Rendered, PipelineError>> {
    let mut results: Vec<Option<Result<Rendered, PipelineError>>> =
        inputs.iter().map(|_| None).collect();
    let mut ready = Vec::with_capacity(inputs.len());
    for (index, input) in inputs.iter().enumerate() {
        let span = tracing::info_span!("prepare", seed = input.recipe.seed);
        let _entered = span.enter();
        let started = Instant::now();
        match prepare(pipeline, index, input) {
            Ok(mut task) => {
                task.prepared_in = started.elapsed();
                ready.push(task)
            }
            Err(e) => results[index] = Some(Err(e)),
        }
    }
    for group in groups(pipeline, ready) {
        for (index, outcome) in denoise(pipeline, group, on_step, previews) {
            results[index] = Some(outcome);
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or(Err(PipelineError::Cancelled)))
        .collect()
}

/// Plans the sampler, encodes the prompt and images, and makes the starting latents.
fn prepare<'a>(
    p: &Pipeline,
    index: usize,
    input: &RenderInput<'a>,
) -> Result<Task<'a>, PipelineError> {
    let recipe = input.recipe;
    let latent_width = p.latent_side("width", recipe.width)?;
    let latent_height = p.latent_side("height", recipe.height)?;
    let sampler = sampling::for_recipe(&p.scheduler, recipe)?;
    let guided = recipe.guidance > 1.0;
    let negative = guided.then_some(recipe.negative_prompt.as_str());
    let applied = super::adapters::apply(p, recipe)?;

    let init = match input.init_image {
        Some(bytes) => Some(images::init_image(bytes, recipe.width, recipe.height)?),
        None if input.mask.is_some() => {
            return Err(PipelineError::InvalidRecipe {
                field: "mask",
                message: "needs an init_image to paint into".into(),
            });
        }
        None => None,
    };
    let repaint = match input.mask {
        Some(bytes) => Some(images::mask(bytes, recipe.width, recipe.height)?),
        None => None,
    };
    if recipe.extras.hires.is_some() && input.mask.is_some() {
        return Err(PipelineError::InvalidRecipe {
            field: "hires",
            message: "the hires fix does not run with a mask".into(),
        });
    }
    let start = match &init {
        Some(_) => sampler.start_index(recipe.strength),
        None => 0,
    };
    let controls = controlnet::prepare(p, recipe, input.controls)?;
    let steps = sampler.timesteps().len() as u32;
    let total = steps + recipe.extras.hires.as_ref().map_or(0, |h| h.steps);

    let device = &p.device;
    let shape = (1, p.latent_channels, latent_height, latent_width);
    let len = shape.1 * shape.2 * shape.3;
    let unit = |seed, purpose| {
        Tensor::from_vec(
            noise::standard_normal(seed, purpose, 0, len),
            shape,
            &Device::Cpu,
        )?
        .to_device(device)
    };
    // Strength 1 (start 0) begins from the txt2img noise: the init image is not encoded
    // unless inpainting needs it. The img2img start noise comes from `noise_seed` when
    // the recipe has one: a series' shots share their anchor's noise.
    let noise = if start == 0 {
        unit(recipe.seed, Purpose::InitialLatents)?
    } else {
        unit(recipe.noise_seed.unwrap_or(recipe.seed), Purpose::Img2Img)?
    };
    let init_pixels = match &init {
        Some(img) => Some(images::to_tensor(img, &Device::Cpu)?.to_device(device)?),
        None => None,
    };
    let needs_init_latents = start > 0 || (repaint.is_some() && !p.inpainting);
    let init_latents = match (&init_pixels, needs_init_latents) {
        (Some(pixels), true) => Some(p.encode(pixels)?),
        _ => None,
    };
    let latents = match &init_latents {
        Some(init) if start > 0 => sampler.add_noise(init, &noise, start)?,
        _ => (&noise * sampler.init_noise_sigma())?,
    };

    let latent_repaint = match &repaint {
        Some(r) => Some(images::latent_mask(
            r,
            recipe.width as usize,
            recipe.height as usize,
            p.vae_downscale,
            device,
        )?),
        None => None,
    };
    let image_cond = match (&init, &repaint, &latent_repaint) {
        (Some(img), Some(r), Some(mask)) if p.inpainting => {
            let masked = images::masked_tensor(img, r, &Device::Cpu)?.to_device(device)?;
            let masked = p.encode(&masked)?;
            Some(Tensor::cat(&[mask, &masked], 1)?)
        }
        _ => p.blank_image_conditioning(latent_height, latent_width)?,
    };
    let text = tracing::info_span!("text_encode").in_scope(|| {
        p.scheduled_conditioning(
            &recipe.prompt,
            negative,
            recipe.steps,
            (latent_height, latent_width),
            image_cond,
            &applied.text,
        )
    })?;
    let text_rows = text.rows_at(0);
    let cond = text.select(&text_rows)?;
    let blend = match (&init_latents, &latent_repaint) {
        (Some(init), Some(mask)) if !p.inpainting => Some(Blend {
            init: init.clone(),
            repaint: mask
                .to_dtype(DType::U8)?
                .broadcast_as(shape)?
                .contiguous()?,
        }),
        _ => None,
    };
    let overlay = match (init, repaint) {
        (Some(init), Some(repaint)) => Some(Overlay { init, repaint }),
        _ => None,
    };
    Ok(Task {
        index,
        recipe: Cow::Borrowed(recipe),
        sampler,
        start,
        rows: if guided { 2 } else { 1 },
        unet: applied.unet,
        unet_key: applied.unet_key,
        text,
        text_rows,
        cond,
        latents,
        noise,
        blend,
        overlay,
        controls,
        ancestral: Purpose::AncestralStep,
        offset: 0,
        total,
        prepared_in: Duration::ZERO,
    })
}

/// What must be equal for tasks to share UNet calls: the recipe's
/// [`BatchKey`] (the one rule the coordinator and the worker group by), plus
/// what only the engine knows once a task is prepared.
#[derive(Clone, Debug, PartialEq)]
struct GroupKey {
    /// Model, size, schedule, guidance on or off, mode and strength.
    recipe: BatchKey,
    /// The first step run: equal for equal recipes keys, kept so that a task
    /// given images its recipe does not name can never join the wrong lockstep.
    start: usize,
    /// Text tokens (chunks × window) and width: prompts of different lengths
    /// in chunks cannot share a UNet call.
    context: Vec<usize>,
    /// The UNet LoRA set: tasks merged with other LoRAs run other UNets. The
    /// recipe key already tells LoRA sets apart; this holds even for a caller
    /// that batches without it.
    loras: String,
    /// The ControlNets and their steps (images and scales may differ).
    controlnets: Vec<ControlKey>,
    /// The pass: the hires fix's second pass has its own noise and progress.
    ancestral: Purpose,
}

/// Splits prepared tasks into groups that can run as one UNet batch, in input order.
fn groups<'a>(p: &Pipeline, tasks: Vec<Task<'a>>) -> Vec<Vec<Task<'a>>> {
    let mut groups: Vec<(Option<GroupKey>, Vec<Task<'a>>)> = Vec::new();
    for task in tasks {
        let key = group_key(p, &task);
        match groups.iter_mut().find(|(k, _)| k.is_some() && *k == key) {
            Some((_, members)) => members.push(task),
            None => groups.push((key, vec![task])),
        }
    }
    groups.into_iter().map(|(_, members)| members).collect()
}

/// Returns the task's group key, or `None` when it must run alone.
fn group_key(p: &Pipeline, task: &Task<'_>) -> Option<GroupKey> {
    let shape = task.latents.dims();
    let (h, w) = (*shape.get(2)?, *shape.get(3)?);
    if !p.unet.batches_exactly(h, w) {
        return None;
    }
    Some(GroupKey {
        recipe: task.recipe.batch_key(),
        start: task.start,
        context: task.cond.context.dims()[1..].to_vec(),
        loras: task.unet_key.clone(),
        controlnets: controlnet::key(&task.controls),
        ancestral: task.ancestral,
    })
}

/// Concatenates the tasks' conditioning in task order.
fn batch_conditioning(tasks: &[Task<'_>]) -> candle_core::Result<Conditioning> {
    let cat = |f: &dyn Fn(&Task<'_>) -> Option<Tensor>| -> candle_core::Result<Option<Tensor>> {
        let parts: Option<Vec<Tensor>> = tasks.iter().map(f).collect();
        parts.map(|p| Tensor::cat(&p, 0)).transpose()
    };
    let context = cat(&|t| Some(t.cond.context.clone()))?
        .ok_or_else(|| candle_core::Error::Msg("an empty batch".into()))?;
    let text_embeds = cat(&|t| t.cond.added.as_ref().map(|a| a.text_embeds.clone()))?;
    let time_ids = cat(&|t| t.cond.added.as_ref().map(|a| a.time_ids.clone()))?;
    let added = match (text_embeds, time_ids) {
        (Some(text_embeds), Some(time_ids)) => Some(AddedConditioning {
            text_embeds,
            time_ids,
        }),
        _ => None,
    };
    Ok(Conditioning {
        context,
        added,
        image: cat(&|t| t.cond.image.clone())?,
    })
}

/// Denoises a group in lockstep and decodes each task; returns (index, outcome) per task.
///
/// A failure of a shared UNet call fails every task still running in the group.
fn denoise(
    p: &Pipeline,
    mut tasks: Vec<Task<'_>>,
    on_step: &mut dyn FnMut(usize, u32, u32) -> bool,
    previews: &mut PreviewSink<'_>,
) -> Vec<(usize, Result<Rendered, PipelineError>)> {
    let mut done = Vec::with_capacity(tasks.len());
    let started = Instant::now();
    // The sampling loop alone: each task's `vae_decode` follows it.
    let steps = tracing::info_span!("denoise", tasks = tasks.len())
        .in_scope(|| run_steps(p, &mut tasks, &mut done, on_step, previews));
    if let Err(e) = steps {
        fail_all(&tasks, &e, &mut done);
        return done;
    }
    // The hires fix: the tasks that ask for it get a second pass at the upscaled size.
    let (second, mut tasks): (Vec<_>, Vec<_>) = tasks
        .into_iter()
        .partition(|t| t.recipe.extras.hires.is_some());
    let mut ready = Vec::with_capacity(second.len());
    for task in second {
        let index = task.index;
        match tracing::info_span!("hires").in_scope(|| hires::second_pass(p, task)) {
            Ok(t) => ready.push(t),
            Err(e) => done.push((index, Err(e))),
        }
    }
    for mut group in groups(p, ready) {
        let steps = tracing::info_span!("denoise", tasks = group.len(), pass = "hires")
            .in_scope(|| run_steps(p, &mut group, &mut done, on_step, previews));
        match steps {
            Ok(()) => tasks.extend(group),
            Err(e) => fail_all(&group, &e, &mut done),
        }
    }
    let denoised_in = started.elapsed();
    for task in tasks {
        let span = tracing::info_span!("vae_decode", seed = task.recipe.seed);
        let _entered = span.enter();
        let started = Instant::now();
        let image = p.decode(&task.latents).map(|mut image| {
            if let Some(o) = &task.overlay {
                images::keep_unmasked(&mut image, &o.init, &o.repaint);
            }
            Rendered {
                image,
                timings: RenderTimings {
                    prepare: task.prepared_in,
                    denoise: denoised_in,
                    decode: started.elapsed(),
                },
            }
        });
        done.push((task.index, image));
    }
    done
}

/// Records `e` as the outcome of every task of `tasks`.
fn fail_all(
    tasks: &[Task<'_>],
    e: &PipelineError,
    done: &mut Vec<(usize, Result<Rendered, PipelineError>)>,
) {
    let text = e.to_string();
    for task in tasks {
        let e = PipelineError::Candle(candle_core::Error::Msg(text.clone()));
        done.push((task.index, Err(e)));
    }
}

/// Runs the group's steps; cancelled tasks move from `tasks` to `done`.
fn run_steps(
    p: &Pipeline,
    tasks: &mut Vec<Task<'_>>,
    done: &mut Vec<(usize, Result<Rendered, PipelineError>)>,
    on_step: &mut dyn FnMut(usize, u32, u32) -> bool,
    previews: &mut PreviewSink<'_>,
) -> Result<(), PipelineError> {
    let Some(first) = tasks.first() else {
        return Ok(());
    };
    let (start, rows) = (first.start, first.rows);
    let unet = Arc::clone(&first.unet);
    let timesteps = first.sampler.timesteps().to_vec();
    let dtype = p.precision.dtype();
    let mut cond = batch_conditioning(tasks)?;
    let controls_of = |tasks: &[Task<'_>]| {
        let per_task: Vec<&[Control]> = tasks.iter().map(|t| &t.controls[..]).collect();
        BatchControls::new(&per_task, rows)
    };
    let mut controls = controls_of(tasks)?;
    for (i, &t) in timesteps.iter().enumerate().skip(start) {
        // Prompt editing and alternation: a task whose text changes at this step
        // takes its new rows, and the batch's conditioning is put together again.
        let counter = (i - start) as u32;
        let mut changed = false;
        for task in tasks.iter_mut() {
            let rows = task.text.rows_at(counter);
            if rows != task.text_rows {
                task.cond = task.text.select(&rows)?;
                task.text_rows = rows;
                changed = true;
            }
        }
        if changed {
            cond = batch_conditioning(tasks)?;
        }
        let mut input = Vec::with_capacity(tasks.len() * rows);
        for task in tasks.iter() {
            let scaled = task.sampler.scale_model_input(&task.latents, i)?;
            for _ in 0..rows {
                input.push(scaled.clone());
            }
        }
        let input = Tensor::cat(&input, 0)?.to_dtype(dtype)?;
        let residuals = match &controls {
            Some(c) => tracing::info_span!("controlnet")
                .in_scope(|| c.residuals(&input, t, &cond, rows, i, timesteps.len()))?,
            None => None,
        };
        let prediction = unet
            .forward_with_residuals(&input, t, &cond, rows, residuals.as_ref())?
            .to_dtype(DType::F32)?;
        let mut cancelled = Vec::new();
        for (j, task) in tasks.iter_mut().enumerate() {
            let own = prediction.narrow(0, j * rows, rows)?;
            let guided = if rows == 2 {
                // Rows are (negative, prompt), as `TextEncoders::encode` orders them.
                let uncond = own.i(0..1)?;
                let cond = own.i(1..2)?;
                (&uncond + ((cond - &uncond)? * task.recipe.guidance)?)?
            } else {
                own
            };
            let (seed, shape) = (task.recipe.seed, task.latents.shape().clone());
            let purpose = task.ancestral;
            // Fresh noise of ancestral steps, keyed by (seed, step index): never the device RNG.
            let step_noise = |step: u32| {
                let values = noise::standard_normal(seed, purpose, step, shape.elem_count());
                Tensor::from_vec(values, &shape, &Device::Cpu)?.to_device(&p.device)
            };
            let mut latents = task.sampler.step(&guided, i, &task.latents, &step_noise)?;
            if let Some(blend) = &task.blend {
                let known = task.sampler.add_noise(&blend.init, &task.noise, i + 1)?;
                latents = blend.repaint.where_cond(&latents, &known)?;
            }
            task.latents = latents;
            // At the UNet's input scale for the next step (the clean latents after the last).
            let next = (i + 1).min(timesteps.len() - 1);
            preview::offer(
                previews,
                p.preview.as_ref(),
                task.index,
                task.offset + i as u32 + 1,
                task.total,
                || task.sampler.scale_model_input(&task.latents, next),
            );
            if !on_step(task.index, task.offset + i as u32 + 1, task.total) {
                cancelled.push(task.index);
            }
        }
        if !cancelled.is_empty() {
            tasks.retain(|t| !cancelled.contains(&t.index));
            done.extend(
                cancelled
                    .into_iter()
                    .map(|index| (index, Err(PipelineError::Cancelled))),
            );
            if tasks.is_empty() {
                return Ok(());
            }
            cond = batch_conditioning(tasks)?;
            controls = controls_of(tasks)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::super::img2img_tests::{left_half_mask, picture};
    use super::super::tests::{TestResult, recipe, tiny};
    use super::*;

    #[test]
    fn mask_blending_ends_on_the_init_latents_outside_the_mask() -> TestResult {
        let dir = tempfile::tempdir()?;
        super::super::write_tiny_model(dir.path())?;
        let p = Pipeline::load(dir.path(), &Device::Cpu)?;
        let (init, mask) = (picture(64, 64, 0), left_half_mask(64, 64));
        let r = Recipe {
            strength: 0.75,
            ..recipe("a boat", 3)
        };
        let input = RenderInput {
            recipe: &r,
            init_image: Some(&init),
            mask: Some(&mask),
            controls: &[],
        };
        let mut tasks = vec![prepare(&p, 0, &input)?];
        let blend = tasks[0].blend.as_ref().ok_or("an ordinary UNet blends")?;
        let (init_latents, repaint) = (blend.init.clone(), blend.repaint.clone());
        let mut ignore = |_: usize, _: kiln_domain::preview::Preview| {};
        let mut previews = PreviewSink {
            every: 0,
            send: &mut ignore,
        };
        run_steps(
            &p,
            &mut tasks,
            &mut Vec::new(),
            &mut |_, _, _| true,
            &mut previews,
        )?;
        let zero = init_latents.zeros_like()?;
        let kept = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
            repaint.where_cond(&zero, t)?.flatten_all()?.to_vec1()
        };
        let painted = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
            repaint.where_cond(t, &zero)?.flatten_all()?.to_vec1()
        };
        assert_eq!(kept(&tasks[0].latents)?, kept(&init_latents)?);
        assert!(painted(&tasks[0].latents)? != painted(&init_latents)?);
        Ok(())
    }

    #[test]
    fn compatible_tasks_group_and_others_run_apart() -> TestResult {
        let p = tiny();
        let base = recipe("a cat", 1);
        let recipes = [
            base.clone(),
            Recipe {
                seed: 2,
                guidance: 9.0,
                prompt: "a (dog:1.2)".into(),
                ..base.clone()
            },
            Recipe {
                steps: 5,
                ..base.clone()
            },
            Recipe {
                guidance: 1.0,
                ..base.clone()
            },
            Recipe {
                prompt: vec!["x"; 80].join(" "),
                ..base.clone()
            },
            Recipe {
                width: 32,
                height: 32,
                ..base.clone()
            },
            Recipe {
                width: 32,
                height: 32,
                seed: 5,
                ..base.clone()
            },
            Recipe {
                seed: 3,
                eta: 0.5,
                ..base.clone()
            },
        ];
        let tasks = recipes
            .iter()
            .enumerate()
            .map(|(i, r)| prepare(p, i, &RenderInput::txt2img(r)))
            .collect::<Result<Vec<_>, _>>()?;
        let sizes: Vec<Vec<usize>> = groups(p, tasks)
            .into_iter()
            .map(|g| g.iter().map(|t| t.index).collect())
            .collect();
        // Same schedule, size, guidance on, one chunk: 0, 1 and 7 (eta is per sampler).
        // Other steps, no guidance, two chunks: apart. 32 px is too small to batch
        // exactly (2 × 2 tokens at the coarsest level), so 5 and 6 run alone.
        assert_eq!(
            sizes,
            [vec![0, 1, 7], vec![2], vec![3], vec![4], vec![5], vec![6]]
        );
        Ok(())
    }
}
