//! Euler ancestral: an Euler step down to sigma_down, then fresh noise up to
//! sigma_{i+1}, as diffusers' `EulerAncestralDiscreteScheduler`
//! (`scheduling_euler_ancestral_discrete.py`) and k-diffusion's
//! `sample_euler_ancestral` / `get_ancestral_step` (Crowson; the ancestral
//! split follows the DDPM posterior of Ho et al. 2020, arXiv:2006.11239):
//! sigma_up = sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2),
//! sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2).
//!
//! The sigma schedule is Euler's ([`SigmaSchedule::euler`]). diffusers has no
//! Karras option for this sampler; kiln builds the Karras variant the way
//! diffusers' Euler does. The fresh noise comes from the loop's portable
//! generator keyed by the step index, so a render is reproducible. This is
//! also the Turbo models' sampler: trailing spacing, 1 to 4 steps, the first
//! at timestep 999 (T - 1).

use candle_core::{Result, Tensor};

use super::config::SchedulerConfig;
use super::euler::SigmaSchedule;
use super::{Sampler, StepNoise};
use crate::error::PipelineError;

/// The Euler ancestral sampler.
#[derive(Clone, Debug)]
pub(crate) struct EulerAncestral {
    /// Timesteps and sigmas, as Euler's.
    schedule: SigmaSchedule,
}

impl EulerAncestral {
    /// Plans `steps` Euler ancestral steps, on Karras sigmas when `karras`.
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

/// Returns (sigma_up, sigma_down) for a step from `from` to `to`.
pub(crate) fn ancestral_split(from: f64, to: f64) -> (f64, f64) {
    let up = (to * to * (from * from - to * to) / (from * from))
        .max(0.0)
        .sqrt();
    let down = (to * to - up * up).max(0.0).sqrt();
    (up, down)
}

impl Sampler for EulerAncestral {
    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma
    }

    fn scale_model_input(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        self.schedule.scale_model_input(x, i)
    }

    /// x' = x + (x - x0) / sigma_i * (sigma_down - sigma_i) + sigma_up * noise(i).
    /// The last step (sigma_{i+1} = 0) has sigma_up = 0 and draws no noise.
    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        x: &Tensor,
        noise: StepNoise<'_>,
    ) -> Result<Tensor> {
        let (sigma, next) = self.schedule.pair(i)?;
        let x0 = self.schedule.denoised(model_output, x, sigma)?;
        let (up, down) = ancestral_split(sigma, next);
        let derivative = ((x - x0)? / sigma)?;
        let prev = (x + (derivative * (down - sigma))?)?;
        if up > 0.0 {
            prev + (noise(i as u32)? * up)?
        } else {
            Ok(prev)
        }
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, start: usize) -> Result<Tensor> {
        self.schedule.add_noise(original, noise, start)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn split_keeps_the_variance_of_the_next_level() {
        let (up, down) = ancestral_split(10.0, 4.0);
        assert!((up * up + down * down - 16.0).abs() < 1e-12);
        // sigma_up^2 = 16 * (100 - 16) / 100.
        assert!((up * up - 13.44).abs() < 1e-12);
        assert_eq!(ancestral_split(10.0, 0.0), (0.0, 0.0));
    }

    #[test]
    fn step_adds_sigma_up_times_the_noise_of_its_index() -> anyhow::Result<()> {
        let mut sampler = EulerAncestral::new(&SchedulerConfig::sd15(), 4, false)?;
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[0.5f32, -1.0, 2.0, 0.0], &dev)?;
        let eps = Tensor::new(&[1.0f32, 0.3, -0.7, -2.0], &dev)?;
        let z = Tensor::new(&[-0.4f32, 1.1, 0.2, 0.9], &dev)?;
        let sigmas = sampler.sigmas().to_vec();
        let x = sampler.add_noise(&x0, &eps, 1)?;
        let asked = std::cell::Cell::new(None);
        let noise = |step: u32| {
            asked.set(Some(step));
            Ok(z.clone())
        };
        let got = sampler.step(&eps, 1, &x, &noise)?;
        // With the exact eps, the deterministic part lands on x0 + sigma_down * eps.
        let (up, down) = ancestral_split(sigmas[1], sigmas[2]);
        let want = ((&x0 + (&eps * down)?)? + (&z * up)?)?;
        let diff = (got - want)?.abs()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max error {diff}");
        assert_eq!(asked.get(), Some(1));
        // The last step goes to sigma 0: x0 exactly, and no noise drawn.
        asked.set(None);
        let last = sampler.add_noise(&x0, &eps, 3)?;
        let done = sampler.step(&eps, 3, &last, &noise)?;
        let diff = (done - &x0)?.abs()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-5 && asked.get().is_none());
        Ok(())
    }
}
