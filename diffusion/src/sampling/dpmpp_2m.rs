//! DPM-Solver++ 2M: Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling
//! of Diffusion Probabilistic Models" (2022, arXiv:2211.01095), Algorithm 2
//! (multistep, second order, data prediction), as diffusers'
//! `DPMSolverMultistepScheduler` (`scheduling_dpmsolver_multistep.py`) with
//! `algorithm_type = "dpmsolver++"`, `solver_order = 2`,
//! `solver_type = "midpoint"`, `lower_order_final = true`,
//! `final_sigmas_type = "zero"`: A1111's "DPM++ 2M".
//!
//! The latents are in the variance-preserving form x = alpha_t x0 + s_t eps
//! (initial noise sigma 1, unscaled model input) with alpha_t = 1 / sqrt(sigma^2 + 1),
//! s_t = sigma alpha_t and lambda = ln(alpha_t / s_t) = -ln sigma. With
//! h = lambda_next - lambda_i and D0 the data prediction at step i:
//! first order (the first step, and the last, which goes to sigma 0):
//! x' = (s_next / s_i) x - alpha_next (e^-h - 1) D0;
//! second order: r = h_prev / h, D1 = (D0 - D0_prev) / r,
//! x' = (s_next / s_i) x - alpha_next (e^-h - 1) (D0 + D1 / 2).
//! diffusers also drops to first order on the last step for fewer than 15
//! steps; with a final sigma of 0 the last step is first order anyway, and
//! becomes x' = D0.
//!
//! Timesteps: diffusers spaces `steps + 1` points and drops the last (linspace,
//! the default, and leading), and rounds Karras timesteps to integers (except
//! for the cosine schedule).

use candle_core::{Result, Tensor};

use super::config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
use super::schedule::{
    check_steps, interp, karras_sigmas, linspace, sigma_to_t, spaced_timesteps, training_sigmas,
};
use super::{Sampler, StepNoise, at};
use crate::error::PipelineError;

/// The DPM-Solver++ 2M sampler and the one data prediction it remembers.
#[derive(Clone, Debug)]
pub(crate) struct DpmPp2m {
    /// UNet timesteps, descending (whole numbers).
    timesteps: Vec<f64>,
    /// Noise level (sigma-space) before each step, then 0.
    sigmas: Vec<f64>,
    /// What the model output means.
    prediction_type: PredictionType,
    /// The step index and data prediction D0 of the previous step.
    previous: Option<(usize, Tensor)>,
}

/// Returns diffusers' DPM-Solver timesteps for `n` steps (without Karras).
fn dpm_timesteps(spacing: TimestepSpacing, t: usize, n: usize, steps_offset: usize) -> Vec<f64> {
    match spacing {
        // linspace(0, T - 1, n + 1).round()[::-1][:-1]
        TimestepSpacing::Linspace => linspace(0.0, (t - 1) as f64, n + 1)
            .into_iter()
            .skip(1)
            .rev()
            .map(f64::round_ties_even)
            .collect(),
        // (arange(n + 1) * (T // (n + 1))).round()[::-1][:-1] + steps_offset
        TimestepSpacing::Leading => (1..=n)
            .rev()
            .map(|i| (i * (t / (n + 1)) + steps_offset) as f64)
            .collect(),
        // The same as DDIM's and Euler's.
        TimestepSpacing::Trailing => spaced_timesteps(spacing, t, n, steps_offset),
    }
}

impl DpmPp2m {
    /// Plans `steps` DPM-Solver++ 2M steps, on Karras sigmas when `karras`.
    ///
    /// # Errors
    ///
    /// `InvalidRecipe` on `steps` outside `1..=T`.
    pub(crate) fn new(
        config: &SchedulerConfig,
        steps: u32,
        karras: bool,
    ) -> std::result::Result<Self, PipelineError> {
        let t = config.num_train_timesteps;
        let n = check_steps(steps, t)?;
        let train = training_sigmas(&config.alphas_cumprod());
        let (timesteps, mut sigmas) = if karras {
            // Unlike Euler, the Karras range here is the whole training range.
            let sigma_min = config.sigma_min.unwrap_or(train[0]);
            let sigma_max = config.sigma_max.unwrap_or(train[t - 1]);
            let sigmas = karras_sigmas(sigma_min, sigma_max, n);
            let log_sigmas: Vec<f64> = train.iter().map(|s| s.ln()).collect();
            let round = config.beta_schedule != BetaSchedule::SquaredCosCapV2;
            let timesteps = sigmas
                .iter()
                .map(|&s| sigma_to_t(s, &log_sigmas))
                .map(|x| if round { x.round_ties_even() } else { x })
                .collect();
            (timesteps, sigmas)
        } else {
            let spacing = config.spacing_or(TimestepSpacing::Linspace);
            let timesteps = dpm_timesteps(spacing, t, n, config.steps_offset);
            let sigmas = timesteps.iter().map(|&x| interp(x, &train)).collect();
            (timesteps, sigmas)
        };
        sigmas.push(0.0);
        Ok(Self {
            timesteps,
            sigmas,
            prediction_type: config.prediction_type,
            previous: None,
        })
    }

    /// Returns the noise levels: one per step, then 0.
    #[cfg(test)]
    pub(crate) fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }
}

/// Returns (alpha_t, s_t) of the variance-preserving form for a sigma-space level.
fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

impl Sampler for DpmPp2m {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        at(&self.timesteps, i, "DPM-Solver++ step")?;
        Ok(x.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        x: &Tensor,
        _noise: StepNoise<'_>,
    ) -> Result<Tensor> {
        at(&self.timesteps, i, "DPM-Solver++ step")?;
        let (sigma, next) = (
            at(&self.sigmas, i, "sigma")?,
            at(&self.sigmas, i + 1, "sigma")?,
        );
        let (alpha_s, s_s) = alpha_sigma(sigma);
        // diffusers' `convert_model_output` for dpmsolver++: the data prediction x0.
        let d0 = match self.prediction_type {
            PredictionType::Epsilon => ((x - (model_output * s_s)?)? / alpha_s)?,
            PredictionType::VPrediction => ((x * alpha_s)? - (model_output * s_s)?)?,
            PredictionType::Sample => model_output.clone(),
        };
        let previous = self.previous.replace((i, d0.clone()));
        if next == 0.0 {
            // First order to sigma 0: s_next = 0, alpha_next = 1, e^-h = 0.
            return Ok(d0);
        }
        let (alpha_t, s_t) = alpha_sigma(next);
        let h = sigma.ln() - next.ln();
        let coefficient = -alpha_t * ((-h).exp() - 1.0);
        // Second order needs the previous step's prediction and a proper step ratio
        // (repeated sigmas, as a degenerate spacing can give, fall back to first order).
        let second = match previous {
            Some((j, d_prev)) if j + 1 == i => {
                let r = (at(&self.sigmas, j, "sigma")?.ln() - sigma.ln()) / h;
                (r.is_finite() && r > 0.0).then_some((r, d_prev))
            }
            _ => None,
        };
        let data = match second {
            // D0 + D1 / 2 with D1 = (D0 - D_prev) / r.
            Some((r, d_prev)) => (&d0 + ((&d0 - d_prev)? * (0.5 / r))?)?,
            None => d0,
        };
        (x * (s_t / s_s))? + (data * coefficient)?
    }

    /// The forward process in variance-preserving form: alpha * x0 + s * noise at sigma_start.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, start: usize) -> Result<Tensor> {
        let (alpha, s) = alpha_sigma(at(&self.sigmas, start, "img2img start")?);
        (original * alpha)? + (noise * s)?
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn no_noise(_: u32) -> Result<Tensor> {
        Err(candle_core::Error::Msg(
            "DPM-Solver++ must not draw noise".into(),
        ))
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    #[test]
    fn exact_prediction_follows_the_forward_process() -> anyhow::Result<()> {
        // With the true noise the data prediction is constant, so D1 = 0 and both
        // orders land on alpha_next x0 + s_next eps (Lu et al. 2022, eq. 9 is exact).
        for karras in [false, true] {
            let mut dpm = DpmPp2m::new(&SchedulerConfig::sd15(), 8, karras)?;
            let dev = Device::Cpu;
            let x0 = Tensor::new(&[0.5f32, -1.0, 2.0, 0.0], &dev)?;
            let eps = Tensor::new(&[1.0f32, 0.3, -0.7, -2.0], &dev)?;
            let sigmas = dpm.sigmas().to_vec();
            let mut x = dpm.add_noise(&x0, &eps, 0)?;
            for i in 0..8 {
                x = dpm.step(&eps, i, &x, &no_noise)?;
                let (alpha, s) = alpha_sigma(sigmas[i + 1]);
                let want = ((&x0 * alpha)? + (&eps * s)?)?;
                assert!(max_diff(&x, &want)? < 1e-5, "karras {karras}, step {i}");
            }
        }
        Ok(())
    }

    #[test]
    fn second_order_step_matches_the_midpoint_formula() -> anyhow::Result<()> {
        // Two steps with different data predictions, checked against the formula
        // written out in scalars.
        let mut dpm = DpmPp2m::new(&SchedulerConfig::sd15(), 20, false)?;
        let s = dpm.sigmas().to_vec();
        let dev = Device::Cpu;
        let x = Tensor::new(&[1.5f32], &dev)?;
        let (e0, e1) = (0.8f64, -0.3f64);
        let x1 = dpm.step(&Tensor::new(&[e0 as f32], &dev)?, 0, &x, &no_noise)?;
        let x2 = dpm.step(&Tensor::new(&[e1 as f32], &dev)?, 1, &x1, &no_noise)?;

        let (a0, s0) = alpha_sigma(s[0]);
        let (a1, s1) = alpha_sigma(s[1]);
        let (a2, s2) = alpha_sigma(s[2]);
        let lambda = |a: f64, s: f64| (a / s).ln();
        let d_first = (1.5 - s0 * e0) / a0;
        let h1 = lambda(a1, s1) - lambda(a0, s0);
        let want1 = s1 / s0 * 1.5 - a1 * ((-h1).exp() - 1.0) * d_first;
        let got1 = f64::from(x1.to_vec1::<f32>()?[0]);
        assert!((got1 - want1).abs() < 1e-5, "{got1} vs {want1}");
        let d_second = (want1 - s1 * e1) / a1;
        let h2 = lambda(a2, s2) - lambda(a1, s1);
        let d1 = (d_second - d_first) / (h1 / h2);
        let want2 = s2 / s1 * want1
            - a2 * ((-h2).exp() - 1.0) * d_second
            - 0.5 * a2 * ((-h2).exp() - 1.0) * d1;
        let got2 = f64::from(x2.to_vec1::<f32>()?[0]);
        assert!((got2 - want2).abs() < 1e-4, "{got2} vs {want2}");
        Ok(())
    }
}
