//! DDIM with eta, on the model's own training schedule.
//!
//! Song et al., "Denoising Diffusion Implicit Models" (2020, arXiv:2010.02502),
//! eq. 12 and eq. 16: with a_t = alpha_bar_t,
//! x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev - sigma_t^2) * eps + sigma_t * z,
//! sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev),
//! as diffusers' `DDIMScheduler` (`scheduling_ddim.py`: `set_timesteps`,
//! `_get_variance`, `step`), including its quirk that the previous timestep is
//! always `t - T / steps` (integer division), whatever the spacing. eta = 0 is
//! deterministic given the initial latents; eta > 0 takes z from the loop's
//! portable noise for the step.

use candle_core::{Result, Tensor};

use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::schedule::{check_steps, spaced_timesteps};
use super::{Sampler, StepNoise, at};
use crate::error::PipelineError;

/// A DDIM schedule for a fixed number of inference steps.
#[derive(Clone, Debug)]
pub(crate) struct Ddim {
    /// Training timesteps visited, descending.
    timesteps: Vec<usize>,
    /// The same, as the UNet gets them.
    timesteps_f64: Vec<f64>,
    /// alpha_bar for every training timestep.
    alphas_cumprod: Vec<f64>,
    /// alpha_bar used after the last step.
    final_alpha_cumprod: f64,
    /// Distance to the previous timestep: T / steps (integer division, as diffusers).
    step_ratio: usize,
    /// What the model output means.
    prediction_type: PredictionType,
    /// Clamp range for the predicted x0.
    clip_sample: Option<f64>,
    /// Share of the posterior noise re-injected each step (0: DDIM, 1: DDPM-like).
    eta: f64,
}

impl Ddim {
    /// Plans `steps` DDIM steps with the given eta (diffusers' default spacing: leading).
    ///
    /// # Errors
    ///
    /// `InvalidRecipe` on `steps` outside `1..=T` or `eta` outside `[0, 1]`.
    pub(crate) fn new(
        config: &SchedulerConfig,
        steps: u32,
        eta: f64,
    ) -> std::result::Result<Self, PipelineError> {
        let t = config.num_train_timesteps;
        let n = check_steps(steps, t)?;
        if !(0.0..=1.0).contains(&eta) {
            return Err(PipelineError::InvalidRecipe {
                field: "eta",
                message: format!("must be between 0 and 1, got {eta}"),
            });
        }
        let spacing = config.spacing_or(TimestepSpacing::Leading);
        let timesteps: Vec<usize> = spaced_timesteps(spacing, t, n, config.steps_offset)
            .into_iter()
            // Linspace gives fractions; diffusers rounds them (half to even).
            .map(|x| x.round_ties_even() as usize)
            .collect();
        let alphas_cumprod = config.alphas_cumprod();
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Self {
            timesteps_f64: timesteps.iter().map(|&x| x as f64).collect(),
            timesteps,
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: t / n,
            prediction_type: config.prediction_type,
            clip_sample: config.clip_sample,
            eta,
        })
    }

    /// Returns alpha_bar at training timestep `t`.
    fn alpha_bar(&self, t: usize) -> f64 {
        // Leading spacing with steps_offset can name T itself when steps == T; diffusers
        // would index past the end there, candle clamps: so does kiln.
        self.alphas_cumprod[t.min(self.alphas_cumprod.len() - 1)]
    }

    /// Returns the training timestep at step `i`.
    fn timestep(&self, i: usize) -> Result<usize> {
        at(&self.timesteps_f64, i, "DDIM step")?;
        Ok(self.timesteps[i])
    }
}

impl Sampler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps_f64
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        self.timestep(i)?;
        Ok(x.clone())
    }

    /// Song et al. 2020, eq. 12; x0 and eps are recovered from the model output
    /// according to the prediction type, x0 clamped when the config says so.
    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        x: &Tensor,
        noise: StepNoise<'_>,
    ) -> Result<Tensor> {
        let t = self.timestep(i)?;
        let a_t = self.alpha_bar(t);
        let a_prev = match t.checked_sub(self.step_ratio) {
            Some(prev) => self.alpha_bar(prev),
            None => self.final_alpha_cumprod,
        };
        let (sqrt_a, sqrt_b) = (a_t.sqrt(), (1.0 - a_t).sqrt());
        let (x0, eps) = match self.prediction_type {
            PredictionType::Epsilon => {
                let x0 = ((x - (model_output * sqrt_b)?)? / sqrt_a)?;
                (x0, model_output.clone())
            }
            PredictionType::VPrediction => {
                let x0 = ((x * sqrt_a)? - (model_output * sqrt_b)?)?;
                let eps = ((model_output * sqrt_a)? + (x * sqrt_b)?)?;
                (x0, eps)
            }
            PredictionType::Sample => {
                let eps = ((x - (model_output * sqrt_a)?)? / sqrt_b)?;
                (model_output.clone(), eps)
            }
        };
        let x0 = match self.clip_sample {
            Some(range) => x0.clamp(-range, range)?,
            None => x0,
        };
        let variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev);
        let std_dev = self.eta * variance.max(0.0).sqrt();
        let direction = (1.0 - a_prev - std_dev * std_dev).max(0.0).sqrt();
        let prev = ((x0 * a_prev.sqrt())? + (eps * direction)?)?;
        if std_dev > 0.0 {
            prev + (noise(i as u32)? * std_dev)?
        } else {
            Ok(prev)
        }
    }

    /// The forward process q(x_t | x0): sqrt(a_t) * x0 + sqrt(1 - a_t) * noise.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, start: usize) -> Result<Tensor> {
        if start == self.timesteps.len() {
            return Ok(original.clone());
        }
        let a = self.alpha_bar(self.timestep(start)?);
        (original * a.sqrt())? + (noise * (1.0 - a).sqrt())?
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn ddim(
        steps: u32,
        spacing: Option<TimestepSpacing>,
        eta: f64,
    ) -> std::result::Result<Ddim, PipelineError> {
        let mut config = SchedulerConfig::sd15();
        config.timestep_spacing = spacing;
        Ddim::new(&config, steps, eta)
    }

    #[test]
    fn trailing_and_linspace_spacings_match_diffusers() -> std::result::Result<(), PipelineError> {
        let trailing = Some(TimestepSpacing::Trailing);
        assert_eq!(ddim(1, trailing, 0.0)?.timesteps, [999]);
        assert_eq!(ddim(4, trailing, 0.0)?.timesteps, [999, 749, 499, 249]);
        // 1000 / 3 = 333.33: round(1000, 666.67, 333.33) - 1.
        assert_eq!(ddim(3, trailing, 0.0)?.timesteps, [999, 666, 332]);
        let linspace = Some(TimestepSpacing::Linspace);
        assert_eq!(ddim(4, linspace, 0.0)?.timesteps, [999, 666, 333, 0]);
        assert!(ddim(0, linspace, 0.0).is_err());
        assert!(ddim(1001, linspace, 0.0).is_err());
        assert!(ddim(20, linspace, 1.5).is_err());
        Ok(())
    }

    /// Returns the largest absolute difference between two tensors.
    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    fn no_noise(_: u32) -> Result<Tensor> {
        Err(candle_core::Error::Msg(
            "eta = 0 must not draw noise".into(),
        ))
    }

    #[test]
    fn step_with_exact_noise_follows_the_forward_process() -> anyhow::Result<()> {
        // If the model predicts the true noise, DDIM (eta = 0) moves x_t to
        // sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps exactly.
        let mut sampler = ddim(20, None, 0.0)?;
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[0.5f32, -1.0, 2.0, 0.0], &dev)?;
        let eps = Tensor::new(&[1.0f32, 0.3, -0.7, -2.0], &dev)?;
        let ac = SchedulerConfig::sd15().alphas_cumprod();
        let noised = |a: f64| -> Result<Tensor> { (&x0 * a.sqrt())? + (&eps * (1.0 - a).sqrt())? };
        assert_eq!(sampler.timesteps()[0], 951.0);
        let start = sampler.add_noise(&x0, &eps, 0)?;
        assert!(max_diff(&start, &noised(ac[951])?)? < 1e-6);
        let next = sampler.step(&eps, 0, &start, &no_noise)?;
        assert!(max_diff(&next, &noised(ac[901])?)? < 1e-5);
        // The last step lands on alpha_bar[0] (set_alpha_to_one = false).
        let last = sampler.step(&eps, 19, &noised(ac[1])?, &no_noise)?;
        assert!(max_diff(&last, &noised(ac[0])?)? < 1e-5);
        assert!(sampler.step(&eps, 20, &last, &no_noise).is_err());
        Ok(())
    }

    #[test]
    fn eta_adds_the_posterior_std_times_the_given_noise() -> anyhow::Result<()> {
        // Song et al. eq. 16 at t = 951 -> 901, eta = 1:
        // sigma = sqrt((1 - a901) / (1 - a951)) * sqrt(1 - a951 / a901).
        let mut sampler = ddim(20, None, 1.0)?;
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[0.5f32, -1.0, 2.0, 0.0], &dev)?;
        let eps = Tensor::new(&[1.0f32, 0.3, -0.7, -2.0], &dev)?;
        let z = Tensor::new(&[-0.4f32, 1.1, 0.2, 0.9], &dev)?;
        let ac = SchedulerConfig::sd15().alphas_cumprod();
        let (a_t, a_prev) = (ac[951], ac[901]);
        let sigma = ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)).sqrt();
        let x_t = ((&x0 * a_t.sqrt())? + (&eps * (1.0 - a_t).sqrt())?)?;
        let asked = std::cell::Cell::new(None);
        let noise = |step: u32| {
            asked.set(Some(step));
            Ok(z.clone())
        };
        let got = sampler.step(&eps, 0, &x_t, &noise)?;
        let want = (((&x0 * a_prev.sqrt())? + (&eps * (1.0 - a_prev - sigma * sigma).sqrt())?)?
            + (&z * sigma)?)?;
        assert!(max_diff(&got, &want)? < 1e-5);
        assert_eq!(asked.get(), Some(0));
        Ok(())
    }
}
