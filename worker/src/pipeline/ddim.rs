//! DDIM sampling with eta = 0, owned by kiln and read from `scheduler_config.json`.
//!
//! The formulas follow Song et al., "Denoising Diffusion Implicit Models"
//! (2020, arXiv:2010.02502), eq. 12 with sigma_t = 0, and diffusers'
//! `DDIMScheduler` (`scheduling_ddim.py`: `set_timesteps`, `step`) for the
//! beta schedules, timestep spacings and prediction types, so a diffusers
//! config means the same thing here. candle's own DDIM is not used: its
//! trailing and linspace spacings round differently from diffusers, and it
//! hides its schedule behind a `Box<dyn Scheduler>` that is not `Send`.
//!
//! With eta = 0 a step contains no randomness: the image is fixed by the
//! initial latents.

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;

use super::config::read_json;
use super::error::PipelineError;

/// How the training noise schedule's betas were laid out.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum BetaSchedule {
    /// `linspace(beta_start, beta_end, T)`.
    Linear,
    /// `linspace(sqrt(beta_start), sqrt(beta_end), T)^2`: Stable Diffusion's schedule.
    ScaledLinear,
    /// The cosine schedule of Nichol & Dhariwal 2021, betas capped at 0.999.
    SquaredCosCapV2,
    /// Betas listed in the config (`trained_betas`).
    Trained(Vec<f64>),
}

/// What the UNet predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PredictionType {
    /// The added noise (SD 1.x).
    Epsilon,
    /// v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0 (SD 2.x 768 px).
    VPrediction,
    /// The clean sample x0.
    Sample,
}

/// How inference timesteps are picked from the training timesteps
/// (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", table 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TimestepSpacing {
    /// `(0..steps) * (T / steps) + steps_offset`, descending: SD 1.x / 2.x.
    Leading,
    /// `round(T - k * T / steps) - 1`: starts at the last training step (SD-Turbo).
    Trailing,
    /// `round(linspace(0, T - 1, steps))`, descending.
    Linspace,
}

/// A DDIM scheduler configuration, independent of the number of steps.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct DdimConfig {
    /// Number of diffusion steps the model was trained with (T).
    pub(crate) num_train_timesteps: usize,
    /// First beta of the schedule.
    pub(crate) beta_start: f64,
    /// Last beta of the schedule.
    pub(crate) beta_end: f64,
    /// Shape of the schedule.
    pub(crate) beta_schedule: BetaSchedule,
    /// Whether the step past t = 0 lands on alpha_bar = 1 (else on alpha_bar[0]).
    pub(crate) set_alpha_to_one: bool,
    /// Added to every leading-spaced timestep.
    pub(crate) steps_offset: usize,
    /// What the model output means.
    pub(crate) prediction_type: PredictionType,
    /// Clamp the predicted x0 to `[-clip_sample_range, clip_sample_range]`.
    pub(crate) clip_sample: Option<f64>,
    /// How inference timesteps are spaced.
    pub(crate) timestep_spacing: TimestepSpacing,
}

impl DdimConfig {
    /// Stable Diffusion 1.5's DDIM settings.
    #[cfg(test)]
    pub(crate) fn sd15() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            set_alpha_to_one: false,
            steps_offset: 1,
            prediction_type: PredictionType::Epsilon,
            clip_sample: None,
            timestep_spacing: TimestepSpacing::Leading,
        }
    }

    /// Reads `scheduler/scheduler_config.json`, whatever scheduler class wrote it.
    pub(crate) fn read(path: &Path) -> Result<Self, PipelineError> {
        let raw: RawScheduler = read_json(path)?;
        raw.into_config()
            .map_err(|m| PipelineError::config(path, m))
    }

    /// Returns alpha_bar_t = prod_{s <= t} (1 - beta_s) for every training step.
    pub(crate) fn alphas_cumprod(&self) -> Vec<f64> {
        let t = self.num_train_timesteps;
        let betas: Vec<f64> = match &self.beta_schedule {
            BetaSchedule::Linear => linspace(self.beta_start, self.beta_end, t),
            BetaSchedule::ScaledLinear => linspace(self.beta_start.sqrt(), self.beta_end.sqrt(), t)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            BetaSchedule::SquaredCosCapV2 => {
                let alpha_bar = |x: f64| {
                    let c = libm::cos((x + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2);
                    c * c
                };
                (0..t)
                    .map(|i| {
                        let (t1, t2) = (i as f64 / t as f64, (i + 1) as f64 / t as f64);
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
                    })
                    .collect()
            }
            BetaSchedule::Trained(betas) => betas.clone(),
        };
        // diffusers computes this in f32; f64 here differs by ~1e-7 relative.
        betas
            .iter()
            .scan(1.0, |acc, beta| {
                *acc *= 1.0 - beta;
                Some(*acc)
            })
            .collect()
    }
}

/// Returns `n` evenly spaced values from `start` to `end` inclusive.
fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![start],
        _ => {
            let delta = (end - start) / (n - 1) as f64;
            (0..n).map(|i| start + i as f64 * delta).collect()
        }
    }
}

/// `scheduler_config.json` as diffusers writes it; absent keys take `DDIMScheduler`'s defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawScheduler {
    num_train_timesteps: Option<usize>,
    beta_start: Option<f64>,
    beta_end: Option<f64>,
    beta_schedule: Option<String>,
    trained_betas: Option<Vec<f64>>,
    clip_sample: Option<bool>,
    clip_sample_range: Option<f64>,
    set_alpha_to_one: Option<bool>,
    steps_offset: Option<usize>,
    prediction_type: Option<String>,
    thresholding: Option<bool>,
    timestep_spacing: Option<String>,
    rescale_betas_zero_snr: Option<bool>,
}

impl RawScheduler {
    /// Validates the keys; the error names the offending key.
    fn into_config(self) -> Result<DdimConfig, String> {
        let num_train_timesteps = self.num_train_timesteps.unwrap_or(1000);
        if num_train_timesteps == 0 {
            return Err("num_train_timesteps must be positive".into());
        }
        let beta_schedule = match (self.trained_betas, self.beta_schedule.as_deref()) {
            (Some(betas), _) if betas.len() != num_train_timesteps => {
                return Err(format!(
                    "trained_betas has {} entries, expected num_train_timesteps = {num_train_timesteps}",
                    betas.len()
                ));
            }
            (Some(betas), _) => BetaSchedule::Trained(betas),
            (None, None | Some("linear")) => BetaSchedule::Linear,
            (None, Some("scaled_linear")) => BetaSchedule::ScaledLinear,
            (None, Some("squaredcos_cap_v2")) => BetaSchedule::SquaredCosCapV2,
            (None, Some(other)) => {
                return Err(format!(
                    "beta_schedule = {other:?}: expected linear, scaled_linear or squaredcos_cap_v2"
                ));
            }
        };
        let prediction_type = match self.prediction_type.as_deref().unwrap_or("epsilon") {
            "epsilon" => PredictionType::Epsilon,
            "v_prediction" => PredictionType::VPrediction,
            "sample" => PredictionType::Sample,
            other => {
                return Err(format!(
                    "prediction_type = {other:?}: expected epsilon, v_prediction or sample"
                ));
            }
        };
        let timestep_spacing = match self.timestep_spacing.as_deref().unwrap_or("leading") {
            "leading" => TimestepSpacing::Leading,
            "trailing" => TimestepSpacing::Trailing,
            "linspace" => TimestepSpacing::Linspace,
            other => {
                return Err(format!(
                    "timestep_spacing = {other:?}: expected leading, trailing or linspace"
                ));
            }
        };
        if self.thresholding == Some(true) {
            return Err("thresholding = true (dynamic thresholding) is not supported".into());
        }
        if self.rescale_betas_zero_snr == Some(true) {
            return Err("rescale_betas_zero_snr = true is not supported".into());
        }
        let clip_sample = self
            .clip_sample
            .unwrap_or(true)
            .then(|| self.clip_sample_range.unwrap_or(1.0));
        Ok(DdimConfig {
            num_train_timesteps,
            beta_start: self.beta_start.unwrap_or(0.0001),
            beta_end: self.beta_end.unwrap_or(0.02),
            beta_schedule,
            set_alpha_to_one: self.set_alpha_to_one.unwrap_or(true),
            steps_offset: self.steps_offset.unwrap_or(0),
            prediction_type,
            clip_sample,
            timestep_spacing,
        })
    }
}

/// A DDIM schedule for a fixed number of inference steps.
#[derive(Clone, Debug)]
pub(crate) struct Ddim {
    /// Training timesteps visited, descending.
    timesteps: Vec<usize>,
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
}

impl Ddim {
    /// Plans `steps` inference steps; fails when steps is 0 or exceeds the training steps.
    pub(crate) fn new(config: &DdimConfig, steps: u32) -> Result<Self, String> {
        let t = config.num_train_timesteps;
        let n = steps as usize;
        if n == 0 || n > t {
            return Err(format!(
                "must be between 1 and {t} for this model, got {steps}"
            ));
        }
        let step_ratio = t / n;
        let timesteps: Vec<usize> = match config.timestep_spacing {
            TimestepSpacing::Leading => (0..n)
                .rev()
                .map(|i| i * step_ratio + config.steps_offset)
                .collect(),
            TimestepSpacing::Trailing => {
                // numpy: round(arange(T, 0, -T / steps)) - 1; np.round rounds half to even.
                let ratio = t as f64 / n as f64;
                (0..n)
                    .map(|k| {
                        ((t as f64 - k as f64 * ratio).round_ties_even() as usize).saturating_sub(1)
                    })
                    .collect()
            }
            TimestepSpacing::Linspace => linspace(0.0, (t - 1) as f64, n)
                .into_iter()
                .rev()
                .map(|x| x.round_ties_even() as usize)
                .collect(),
        };
        let alphas_cumprod = config.alphas_cumprod();
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Self {
            timesteps,
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio,
            prediction_type: config.prediction_type,
            clip_sample: config.clip_sample,
        })
    }

    /// Returns the training timesteps to visit, in order (descending).
    pub(crate) fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// Returns the standard deviation of the initial noise: 1 for DDIM.
    pub(crate) fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// Returns alpha_bar at training timestep `t`.
    fn alpha_bar(&self, t: usize) -> f64 {
        // Leading spacing with steps_offset can name T itself when steps == T; diffusers
        // would index past the end there, candle clamps: so does kiln.
        self.alphas_cumprod[t.min(self.alphas_cumprod.len() - 1)]
    }

    /// Returns x_{t-1} from x_t (`sample`) and the model's output at timestep `t`.
    ///
    /// Song et al. 2020, eq. 12 with sigma_t = 0:
    /// x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps, where x0 and eps are
    /// recovered from the model output according to the prediction type.
    pub(crate) fn step(
        &self,
        model_output: &Tensor,
        t: usize,
        sample: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let a_t = self.alpha_bar(t);
        let a_prev = match t.checked_sub(self.step_ratio) {
            Some(prev) => self.alpha_bar(prev),
            None => self.final_alpha_cumprod,
        };
        let (sqrt_a, sqrt_b) = (a_t.sqrt(), (1.0 - a_t).sqrt());
        let (x0, eps) = match self.prediction_type {
            PredictionType::Epsilon => {
                let x0 = ((sample - (model_output * sqrt_b)?)? / sqrt_a)?;
                (x0, model_output.clone())
            }
            PredictionType::VPrediction => {
                let x0 = ((sample * sqrt_a)? - (model_output * sqrt_b)?)?;
                let eps = ((model_output * sqrt_a)? + (sample * sqrt_b)?)?;
                (x0, eps)
            }
            PredictionType::Sample => {
                let eps = ((sample - (model_output * sqrt_a)?)? / sqrt_b)?;
                (model_output.clone(), eps)
            }
        };
        let x0 = match self.clip_sample {
            Some(range) => x0.clamp(-range, range)?,
            None => x0,
        };
        (x0 * a_prev.sqrt())? + (eps * (1.0 - a_prev).sqrt())?
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn sd15_twenty_leading_steps() -> Result<(), String> {
        let ddim = Ddim::new(&DdimConfig::sd15(), 20)?;
        // step_ratio = 1000 / 20 = 50; (0..20) * 50 reversed, + steps_offset 1.
        let expected: Vec<usize> = (0..20).rev().map(|i| i * 50 + 1).collect();
        assert_eq!(ddim.timesteps(), expected);
        assert_eq!(ddim.timesteps()[..3], [951, 901, 851]);
        assert_eq!(ddim.timesteps()[17..], [101, 51, 1]);
        Ok(())
    }

    #[test]
    fn trailing_and_linspace_spacings_match_diffusers() -> Result<(), String> {
        let mut cfg = DdimConfig::sd15();
        cfg.timestep_spacing = TimestepSpacing::Trailing;
        assert_eq!(Ddim::new(&cfg, 1)?.timesteps(), [999]);
        assert_eq!(Ddim::new(&cfg, 4)?.timesteps(), [999, 749, 499, 249]);
        // 1000 / 3 = 333.33: round(1000, 666.67, 333.33) - 1.
        assert_eq!(Ddim::new(&cfg, 3)?.timesteps(), [999, 666, 332]);
        cfg.timestep_spacing = TimestepSpacing::Linspace;
        assert_eq!(Ddim::new(&cfg, 4)?.timesteps(), [999, 666, 333, 0]);
        assert!(Ddim::new(&cfg, 0).is_err());
        assert!(Ddim::new(&cfg, 1001).is_err());
        Ok(())
    }

    #[test]
    fn sd15_alphas_cumprod_reference_values() {
        let ac = DdimConfig::sd15().alphas_cumprod();
        assert_eq!(ac.len(), 1000);
        // beta_0 = beta_start, so alpha_bar_0 = 1 - 0.00085.
        assert!((ac[0] - 0.99915).abs() < 1e-12);
        // beta_1 = (sqrt(0.00085) + (sqrt(0.012) - sqrt(0.00085)) / 999)^2.
        let b1 = (0.00085f64.sqrt() + (0.012f64.sqrt() - 0.00085f64.sqrt()) / 999.0).powi(2);
        assert!((ac[1] - 0.99915 * (1.0 - b1)).abs() < 1e-12);
        // Computed another way: exp(sum(ln(1 - beta))).
        let log_sum: f64 = (0..1000)
            .map(|i| {
                let s =
                    0.00085f64.sqrt() + (0.012f64.sqrt() - 0.00085f64.sqrt()) * i as f64 / 999.0;
                (1.0 - s * s).ln()
            })
            .sum();
        assert!((ac[999] - log_sum.exp()).abs() < 1e-12);
        // The well-known SD sigma range (k-diffusion): sigma = sqrt((1 - a) / a).
        let sigma = |a: f64| ((1.0 - a) / a).sqrt();
        assert!(
            (sigma(ac[999]) - 14.6146).abs() < 1e-3,
            "{}",
            sigma(ac[999])
        );
        assert!((sigma(ac[0]) - 0.0292).abs() < 1e-4, "{}", sigma(ac[0]));
    }

    #[test]
    fn step_with_exact_noise_follows_the_forward_process() -> candle_core::Result<()> {
        // If the model predicts the true noise, DDIM (eta = 0) moves x_t to
        // sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps exactly.
        let ddim = Ddim::new(&DdimConfig::sd15(), 20).map_err(candle_core::Error::msg)?;
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[0.5f32, -1.0, 2.0, 0.0], &dev)?;
        let eps = Tensor::new(&[1.0f32, 0.3, -0.7, -2.0], &dev)?;
        let ac = DdimConfig::sd15().alphas_cumprod();
        let noised = |a: f64| -> candle_core::Result<Tensor> {
            (&x0 * a.sqrt())? + (&eps * (1.0 - a).sqrt())?
        };
        let next = ddim.step(&eps, 951, &noised(ac[951])?)?;
        let want = noised(ac[901])?;
        let diff = (next - want)?.abs()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max error {diff}");
        // The last step lands on alpha_bar[0] (set_alpha_to_one = false).
        let last = ddim.step(&eps, 1, &noised(ac[1])?)?;
        let diff = (last - noised(ac[0])?)?.abs()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max error {diff}");
        Ok(())
    }

    #[test]
    fn missing_keys_take_ddim_defaults() -> Result<(), String> {
        // SD 1.5 ships a PNDMScheduler config; DDIM reads the keys it shares.
        let raw: RawScheduler = serde_json::from_str(
            r#"{"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": false,
                "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null, "clip_sample": false}"#,
        )
        .map_err(|e| e.to_string())?;
        assert_eq!(raw.into_config()?, DdimConfig::sd15());
        let defaults = RawScheduler::default().into_config()?;
        assert_eq!(defaults.beta_schedule, BetaSchedule::Linear);
        assert_eq!(defaults.clip_sample, Some(1.0));
        assert!(defaults.set_alpha_to_one);
        Ok(())
    }
}
