//! Euler: Karras et al., "Elucidating the Design Space of Diffusion-Based
//! Generative Models" (2022, arXiv:2206.00364), Algorithm 2 without churn, in
//! the sigma (variance-exploding) view of a discrete model, as diffusers'
//! `EulerDiscreteScheduler` (`scheduling_euler_discrete.py`).
//!
//! The latents live at noise level sigma: x = x0 + sigma * eps. The UNet was
//! trained on x / sqrt(sigma^2 + 1), so its input is scaled by that; the
//! denoised estimate x0 comes from its output by the prediction type, and one
//! step follows the ODE derivative d = (x - x0) / sigma from sigma_i to
//! sigma_{i+1}. The sigma schedule (shared with Euler ancestral) interpolates
//! the training sigmas at the spaced timesteps and appends 0; with Karras
//! sigmas the timesteps are recovered from the sigmas by log-sigma
//! interpolation and stay fractional.

use candle_core::{Result, Tensor};

use super::config::{Interpolation, PredictionType, SchedulerConfig, TimestepSpacing};
use super::schedule::{
    check_steps, interp, karras_sigmas, sigma_to_t, spaced_timesteps, training_sigmas,
};
use super::{Sampler, StepNoise, at};
use crate::error::PipelineError;

/// The timesteps and sigmas of an Euler-family render.
#[derive(Clone, Debug)]
pub(crate) struct SigmaSchedule {
    /// UNet timesteps, descending, possibly fractional.
    pub(crate) timesteps: Vec<f64>,
    /// Noise level before each step, then 0: one more entry than `timesteps`.
    pub(crate) sigmas: Vec<f64>,
    /// Standard deviation of the initial latents.
    pub(crate) init_noise_sigma: f64,
    /// What the model output means.
    pub(crate) prediction_type: PredictionType,
}

impl SigmaSchedule {
    /// Plans an Euler-family schedule as diffusers' `EulerDiscreteScheduler.set_timesteps`
    /// (default spacing: linspace).
    ///
    /// # Errors
    ///
    /// `InvalidRecipe` on `steps` outside `1..=T`, or on `scheduler` when the model's
    /// config asks for log-linear sigma interpolation.
    pub(crate) fn euler(
        config: &SchedulerConfig,
        steps: u32,
        karras: bool,
    ) -> std::result::Result<Self, PipelineError> {
        let t = config.num_train_timesteps;
        let n = check_steps(steps, t)?;
        if config.interpolation == Interpolation::LogLinear {
            return Err(PipelineError::InvalidRecipe {
                field: "scheduler",
                message: "the model's scheduler config sets interpolation_type = \"log_linear\", \
                          which kiln's euler samplers do not implement"
                    .into(),
            });
        }
        let spacing = config.spacing_or(TimestepSpacing::Linspace);
        let train = training_sigmas(&config.alphas_cumprod());
        let mut timesteps = spaced_timesteps(spacing, t, n, config.steps_offset);
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&x| interp(x, &train)).collect();
        if karras {
            // diffusers takes the ends from the interpolated sigmas, so with leading
            // spacing the Karras range is sigma(951)..sigma(1), not the training range.
            let sigma_min = config.sigma_min.unwrap_or(sigmas[n - 1]);
            let sigma_max = config.sigma_max.unwrap_or(sigmas[0]);
            sigmas = karras_sigmas(sigma_min, sigma_max, n);
            let log_sigmas: Vec<f64> = train.iter().map(|s| s.ln()).collect();
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
        }
        let max_sigma = sigmas.iter().copied().fold(0.0, f64::max);
        // diffusers' `init_noise_sigma`: the schedules that start at the last training
        // step (linspace, trailing) use sigma_max; leading, which starts earlier, uses
        // sqrt(sigma_max^2 + 1).
        let init_noise_sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
            TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        sigmas.push(0.0);
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma,
            prediction_type: config.prediction_type,
        })
    }

    /// Returns (sigma_i, sigma_{i+1}).
    pub(crate) fn pair(&self, i: usize) -> Result<(f64, f64)> {
        at(&self.timesteps, i, "Euler step")?;
        Ok((
            at(&self.sigmas, i, "sigma")?,
            at(&self.sigmas, i + 1, "sigma")?,
        ))
    }

    /// Returns x / sqrt(sigma_i^2 + 1), the UNet input at step `i`.
    pub(crate) fn scale_model_input(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        let (sigma, _) = self.pair(i)?;
        x / (sigma * sigma + 1.0).sqrt()
    }

    /// Returns the denoised estimate x0 from the model output at noise level `sigma`.
    ///
    /// epsilon: x - sigma * eps. v: x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v,
    /// since the UNet saw x / sqrt(sigma^2 + 1) = alpha * x0 + s * eps with
    /// alpha = 1 / sqrt(sigma^2 + 1), s = sigma * alpha, and v = alpha * eps - s * x0.
    pub(crate) fn denoised(&self, model_output: &Tensor, x: &Tensor, sigma: f64) -> Result<Tensor> {
        match self.prediction_type {
            PredictionType::Epsilon => x - (model_output * sigma)?,
            PredictionType::VPrediction => {
                let scale = sigma * sigma + 1.0;
                (model_output * (-sigma / scale.sqrt()))? + (x / scale)?
            }
            PredictionType::Sample => Ok(model_output.clone()),
        }
    }

    /// Returns x0 + sigma_start * noise: a clean sample at the noise level of step `start`.
    pub(crate) fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        start: usize,
    ) -> Result<Tensor> {
        let sigma = at(&self.sigmas, start, "img2img start")?;
        original + (noise * sigma)?
    }
}

/// The Euler sampler: deterministic, first order.
#[derive(Clone, Debug)]
pub(crate) struct Euler {
    /// Timesteps and sigmas.
    schedule: SigmaSchedule,
}

impl Euler {
    /// Plans `steps` Euler steps, on Karras sigmas when `karras`.
    ///
    /// # Errors
    ///
    /// As [`SigmaSchedule::euler`].
    pub(crate) fn new(
        config: &SchedulerConfig,
        steps: u32,
        karras: bool,
    ) -> std::result::Result<Self, PipelineError> {
        Ok(Self {
            schedule: SigmaSchedule::euler(config, steps, karras)?,
        })
    }

    /// Returns the noise levels: one per step, then 0.
    #[cfg(test)]
    pub(crate) fn sigmas(&self) -> &[f64] {
        &self.schedule.sigmas
    }
}

impl Sampler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma
    }

    fn scale_model_input(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        self.schedule.scale_model_input(x, i)
    }

    /// x_{i+1} = x + (x - x0) / sigma_i * (sigma_{i+1} - sigma_i).
    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        x: &Tensor,
        _noise: StepNoise<'_>,
    ) -> Result<Tensor> {
        let (sigma, next) = self.schedule.pair(i)?;
        let x0 = self.schedule.denoised(model_output, x, sigma)?;
        let derivative = ((x - x0)? / sigma)?;
        x + (derivative * (next - sigma))?
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, start: usize) -> Result<Tensor> {
        self.schedule.add_noise(original, noise, start)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    fn no_noise(_: u32) -> Result<Tensor> {
        Err(candle_core::Error::Msg("euler must not draw noise".into()))
    }

    #[test]
    fn step_with_exact_noise_moves_to_the_next_sigma() -> anyhow::Result<()> {
        // x = x0 + sigma * eps and a model that predicts eps: the ODE is a straight
        // line, so one Euler step lands exactly on x0 + sigma_next * eps.
        for karras in [false, true] {
            let mut euler = Euler::new(&SchedulerConfig::sd15(), 10, karras)?;
            let dev = Device::Cpu;
            let x0 = Tensor::new(&[0.5f32, -1.0, 2.0, 0.0], &dev)?;
            let eps = Tensor::new(&[1.0f32, 0.3, -0.7, -2.0], &dev)?;
            let sigmas = euler.sigmas().to_vec();
            let mut x = euler.add_noise(&x0, &eps, 0)?;
            for i in 0..10 {
                x = euler.step(&eps, i, &x, &no_noise)?;
                let want = (&x0 + (&eps * sigmas[i + 1])?)?;
                assert!(max_diff(&x, &want)? < 1e-4, "karras {karras}, step {i}");
            }
            assert!(max_diff(&x, &x0)? < 1e-5);
        }
        Ok(())
    }

    #[test]
    fn v_prediction_recovers_x0() -> anyhow::Result<()> {
        let mut config = SchedulerConfig::sd15();
        config.prediction_type = PredictionType::VPrediction;
        let euler = Euler::new(&config, 4, false)?;
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[0.5f32, -1.0, 2.0, 0.0], &dev)?;
        let eps = Tensor::new(&[1.0f32, 0.3, -0.7, -2.0], &dev)?;
        let sigma = 3.0f64;
        let (alpha, s) = (
            1.0 / (sigma * sigma + 1.0).sqrt(),
            sigma / (sigma * sigma + 1.0).sqrt(),
        );
        let v = ((&eps * alpha)? - (&x0 * s)?)?;
        let x = (&x0 + (&eps * sigma)?)?;
        let got = euler.schedule.denoised(&v, &x, sigma)?;
        assert!(max_diff(&got, &x0)? < 1e-5);
        Ok(())
    }
}
