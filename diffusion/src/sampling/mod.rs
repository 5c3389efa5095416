//! Samplers owned by kiln: DDIM (with eta), Euler, Euler ancestral and DPM-Solver++ 2M,
//! each optionally on Karras sigmas, all reading the model's own scheduler config.
//!
//! Every sampler is planned per render from the model's [`SchedulerConfig`] and
//! the recipe (`scheduler`, `steps`, `karras`, `eta`) by [`for_recipe`], and
//! driven through the [`Sampler`] trait: scale the model input, step, and for
//! img2img add noise at a start index. A sampler never draws noise itself: the
//! stochastic ones (Euler ancestral, DDIM with eta > 0) ask the loop for the
//! noise of step `i`, which the loop takes from kiln's portable generator
//! (`noise::Purpose::AncestralStep`, keyed by seed and step), so they are as
//! reproducible as the deterministic ones. candle's schedulers are not used:
//! their noise comes from the device generator (unseedable on the CPU), their
//! spacings round differently from diffusers, and `Box<dyn Scheduler>` is not
//! `Send`.
//!
//! The formulas follow the papers named in each file and diffusers'
//! implementations (`src/diffusers/schedulers/`), so that a diffusers config
//! means the same thing here and the schedules match diffusers' numbers.
//! Files: `config` (scheduler_config.json), `schedule` (spacings, sigmas,
//! Karras), `ddim`, `euler`, `euler_ancestral`, `dpmpp_2m`; `tests` checks the
//! SD 1.5 schedules against values computed from the published formulas.

mod config;
mod ddim;
mod dpmpp_2m;
mod euler;
mod euler_ancestral;
mod schedule;

#[cfg(test)]
pub(crate) mod tests;

use candle_core::{Result, Tensor};
use kiln_domain::recipe::{Recipe, Scheduler};

use super::error::PipelineError;

pub(crate) use config::SchedulerConfig;
pub(crate) use ddim::Ddim;
pub(crate) use dpmpp_2m::DpmPp2m;
pub(crate) use euler::Euler;
pub(crate) use euler_ancestral::EulerAncestral;

/// Returns the noise for step `i` (its argument), shaped like the latents and on their device.
///
/// The pipeline's closure draws it from the portable generator keyed by (seed, step);
/// samplers call it only on steps that add noise.
pub(crate) type StepNoise<'a> = &'a dyn Fn(u32) -> Result<Tensor>;

/// A planned denoising schedule and the update rule that walks it.
///
/// The loop calls, for each index `i` of [`Sampler::timesteps`] in order:
/// `scale_model_input(x, i)`, the UNet at `timesteps()[i]`, then `step(.., i, x, ..)`.
/// Samplers with memory (DPM-Solver++ 2M) expect consecutive indices and fall back
/// to a first-order step otherwise.
pub(crate) trait Sampler: Send {
    /// Returns the timesteps the UNet is evaluated at, in order; fractional for
    /// Euler samplers on linspace or Karras schedules.
    fn timesteps(&self) -> &[f64];

    /// Returns the standard deviation of the initial latents of a txt2img render
    /// (the unit noise is multiplied by it).
    fn init_noise_sigma(&self) -> f64;

    /// Returns the UNet input for step `i` (sigma-space samplers divide by sqrt(sigma^2 + 1)).
    ///
    /// # Errors
    ///
    /// When `i` is past the schedule or the tensor operation fails.
    fn scale_model_input(&self, x: &Tensor, i: usize) -> Result<Tensor>;

    /// Returns the latents after step `i`, from the (guided) model output at
    /// `timesteps()[i]` and the latents `x` before it. `noise(i)` is called at most
    /// once, only by steps that add fresh noise.
    ///
    /// # Errors
    ///
    /// When `i` is past the schedule, `noise` fails, or a tensor operation fails.
    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        x: &Tensor,
        noise: StepNoise<'_>,
    ) -> Result<Tensor>;

    /// Returns clean latents `original` noised to the level the loop expects before
    /// step `start` (img2img). `start == timesteps().len()` returns `original`
    /// unchanged: nothing is left to denoise.
    ///
    /// # Errors
    ///
    /// When `start` is past the end of the schedule or a tensor operation fails.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, start: usize) -> Result<Tensor>;

    /// Returns the first step of an img2img render of `strength` in `[0, 1]`, as diffusers'
    /// `get_timesteps`: `steps - min(int(steps * strength), steps)`.
    fn start_index(&self, strength: f64) -> usize {
        schedule::start_index(self.timesteps().len(), strength)
    }
}

// The render thread owns its sampler and may be moved between threads.
const _: () = {
    const fn assert_send<T: Send + ?Sized>() {}
    assert_send::<Box<dyn Sampler>>();
};

/// Plans the sampler a recipe asks for (`scheduler`, `steps`, `karras`, `eta`).
///
/// # Errors
///
/// `InvalidRecipe` naming the field: `steps` out of `1..=T`, `karras` with DDIM,
/// `eta` outside `[0, 1]` or with a sampler other than DDIM, `scheduler` when the
/// model's config asks for something that sampler cannot do.
pub(crate) fn for_recipe(
    config: &SchedulerConfig,
    recipe: &Recipe,
) -> std::result::Result<Box<dyn Sampler>, PipelineError> {
    build(
        config,
        recipe.scheduler,
        recipe.steps,
        recipe.karras,
        recipe.eta,
    )
}

/// Plans `scheduler` over `steps` steps; see [`for_recipe`].
///
/// # Errors
///
/// As [`for_recipe`].
pub(crate) fn build(
    config: &SchedulerConfig,
    scheduler: Scheduler,
    steps: u32,
    karras: bool,
    eta: f64,
) -> std::result::Result<Box<dyn Sampler>, PipelineError> {
    let invalid = |field, message: String| PipelineError::InvalidRecipe { field, message };
    if !eta.is_finite() || !(0.0..=1.0).contains(&eta) {
        return Err(invalid(
            "eta",
            format!("must be between 0 and 1, got {eta}"),
        ));
    }
    if eta != 0.0 && scheduler != Scheduler::Ddim {
        return Err(invalid(
            "eta",
            format!("only ddim takes eta, not {scheduler}"),
        ));
    }
    if karras && !scheduler.takes_karras() {
        return Err(invalid(
            "karras",
            format!("applies to euler, euler_a and dpmpp_2m, not {scheduler}"),
        ));
    }
    Ok(match scheduler {
        Scheduler::Ddim => Box::new(Ddim::new(config, steps, eta)?),
        Scheduler::Euler => Box::new(Euler::new(config, steps, karras)?),
        Scheduler::EulerA => Box::new(EulerAncestral::new(config, steps, karras)?),
        Scheduler::DpmPp2m => Box::new(DpmPp2m::new(config, steps, karras)?),
    })
}

/// Returns `values[i]`, or an error naming the schedule when `i` is past its end.
fn at(values: &[f64], i: usize, what: &str) -> Result<f64> {
    values.get(i).copied().ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "{what} index {i} is past the end of a {}-entry schedule",
            values.len()
        ))
    })
}
