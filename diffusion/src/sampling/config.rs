//! The model's `scheduler/scheduler_config.json`: its training noise schedule.
//!
//! One config serves every sampler, as in diffusers, where any scheduler class
//! can be built `from_config` of another: keys a sampler does not use are
//! ignored, and a key the file leaves out takes the default of the diffusers
//! class that reads it (`DDIMScheduler`, `EulerDiscreteScheduler`,
//! `EulerAncestralDiscreteScheduler`, `DPMSolverMultistepScheduler`). Only
//! `timestep_spacing` differs between those classes (DDIM: `leading`, the
//! others: `linspace`), so it stays optional here. The betas follow diffusers'
//! `__init__` (`scheduling_ddim.py`); the cosine schedule is Nichol & Dhariwal,
//! "Improved Denoising Diffusion Probabilistic Models" (2021, arXiv:2102.09672), eq. 17.
//!
//! Keys that only choose a diffusers sampler variant (`use_karras_sigmas`,
//! `algorithm_type`, `solver_order`, `final_sigmas_type`, ...) are ignored:
//! in kiln the recipe's scheduler and `karras` flag choose the sampler.

use std::path::Path;

use serde::Deserialize;

use super::schedule::linspace;
use crate::config::read_json;
use crate::error::PipelineError;

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
    /// The added noise (SD 1.x, SDXL, the Turbo models).
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
    /// `linspace(0, T - 1, steps)`, descending.
    Linspace,
}

/// How Euler samplers interpolate sigmas between training timesteps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Interpolation {
    /// Linear in sigma over the timestep (`np.interp`): every model kiln knows.
    Linear,
    /// diffusers' `log_linear`, which kiln does not implement.
    LogLinear,
}

/// A scheduler configuration, independent of the sampler and the number of steps.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SchedulerConfig {
    /// Number of diffusion steps the model was trained with (T).
    pub(crate) num_train_timesteps: usize,
    /// First beta of the schedule.
    pub(crate) beta_start: f64,
    /// Last beta of the schedule.
    pub(crate) beta_end: f64,
    /// Shape of the schedule.
    pub(crate) beta_schedule: BetaSchedule,
    /// DDIM: whether the step past t = 0 lands on alpha_bar = 1 (else on alpha_bar[0]).
    pub(crate) set_alpha_to_one: bool,
    /// Added to every leading-spaced timestep.
    pub(crate) steps_offset: usize,
    /// What the model output means.
    pub(crate) prediction_type: PredictionType,
    /// DDIM: clamp the predicted x0 to `[-clip_sample_range, clip_sample_range]`.
    pub(crate) clip_sample: Option<f64>,
    /// How inference timesteps are spaced; `None` takes each sampler's diffusers default.
    pub(crate) timestep_spacing: Option<TimestepSpacing>,
    /// Euler samplers: how sigmas are interpolated between training timesteps.
    pub(crate) interpolation: Interpolation,
    /// Karras schedules: lowest sigma, when the config overrides it.
    pub(crate) sigma_min: Option<f64>,
    /// Karras schedules: highest sigma, when the config overrides it.
    pub(crate) sigma_max: Option<f64>,
}

impl SchedulerConfig {
    /// Stable Diffusion 1.5's scheduler config (a `PNDMScheduler` file without `timestep_spacing`).
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
            timestep_spacing: None,
            interpolation: Interpolation::Linear,
            sigma_min: None,
            sigma_max: None,
        }
    }

    /// Reads `scheduler/scheduler_config.json`, whatever scheduler class wrote it.
    ///
    /// # Errors
    ///
    /// `Io` when the file cannot be read, `Config` (naming the key) when it is
    /// malformed or asks for something kiln does not implement.
    pub(crate) fn read(path: &Path) -> std::result::Result<Self, PipelineError> {
        let raw: RawScheduler = read_json(path)?;
        raw.into_config()
            .map_err(|m| PipelineError::config(path, m))
    }

    /// Returns the timestep spacing, or `default` (the sampler's diffusers default) when unset.
    pub(crate) fn spacing_or(&self, default: TimestepSpacing) -> TimestepSpacing {
        self.timestep_spacing.unwrap_or(default)
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
        // diffusers computes this in f32; f64 here differs by ~1e-6 relative.
        betas
            .iter()
            .scan(1.0, |acc, beta| {
                *acc *= 1.0 - beta;
                Some(*acc)
            })
            .collect()
    }
}

/// `scheduler_config.json` as diffusers writes it; unknown keys are ignored.
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
    interpolation_type: Option<String>,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
}

impl RawScheduler {
    /// Validates the keys; the error names the offending key.
    fn into_config(self) -> Result<SchedulerConfig, String> {
        let num_train_timesteps = self.num_train_timesteps.unwrap_or(1000);
        if num_train_timesteps < 2 {
            return Err(format!(
                "num_train_timesteps = {num_train_timesteps}: must be at least 2"
            ));
        }
        let beta_schedule = match (self.trained_betas, self.beta_schedule.as_deref()) {
            (Some(betas), _) if betas.len() != num_train_timesteps => {
                return Err(format!(
                    "trained_betas has {} entries, expected num_train_timesteps = {num_train_timesteps}",
                    betas.len()
                ));
            }
            (Some(betas), _) if !betas.iter().all(|b| (0.0..1.0).contains(b)) => {
                return Err("trained_betas: every beta must lie in [0, 1)".into());
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
        let beta_start = self.beta_start.unwrap_or(0.0001);
        let beta_end = self.beta_end.unwrap_or(0.02);
        for (key, beta) in [("beta_start", beta_start), ("beta_end", beta_end)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(format!("{key} = {beta}: must lie in [0, 1)"));
            }
        }
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
        let timestep_spacing = match self.timestep_spacing.as_deref() {
            None => None,
            Some("leading") => Some(TimestepSpacing::Leading),
            Some("trailing") => Some(TimestepSpacing::Trailing),
            Some("linspace") => Some(TimestepSpacing::Linspace),
            Some(other) => {
                return Err(format!(
                    "timestep_spacing = {other:?}: expected leading, trailing or linspace"
                ));
            }
        };
        let interpolation = match self.interpolation_type.as_deref().unwrap_or("linear") {
            "linear" => Interpolation::Linear,
            "log_linear" => Interpolation::LogLinear,
            other => {
                return Err(format!(
                    "interpolation_type = {other:?}: expected linear or log_linear"
                ));
            }
        };
        for (key, sigma) in [("sigma_min", self.sigma_min), ("sigma_max", self.sigma_max)] {
            if sigma.is_some_and(|s| !(s.is_finite() && s > 0.0)) {
                return Err(format!("{key} must be a positive number"));
            }
        }
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
        Ok(SchedulerConfig {
            num_train_timesteps,
            beta_start,
            beta_end,
            beta_schedule,
            set_alpha_to_one: self.set_alpha_to_one.unwrap_or(true),
            steps_offset: self.steps_offset.unwrap_or(0),
            prediction_type,
            clip_sample,
            timestep_spacing,
            interpolation,
            sigma_min: self.sigma_min,
            sigma_max: self.sigma_max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::tests::SD15_JSON;

    fn parse(json: &str) -> Result<SchedulerConfig, String> {
        let raw: RawScheduler = serde_json::from_str(json).map_err(|e| e.to_string())?;
        raw.into_config()
    }

    #[test]
    fn sd15_config_parses_with_per_sampler_spacing_left_open() -> Result<(), String> {
        let config = parse(SD15_JSON)?;
        assert_eq!(config, SchedulerConfig::sd15());
        assert_eq!(
            config.spacing_or(TimestepSpacing::Linspace),
            TimestepSpacing::Linspace
        );
        Ok(())
    }

    #[test]
    fn missing_keys_take_diffusers_defaults() -> Result<(), String> {
        let defaults = RawScheduler::default().into_config()?;
        assert_eq!(defaults.beta_schedule, BetaSchedule::Linear);
        assert_eq!(defaults.clip_sample, Some(1.0));
        assert!(defaults.set_alpha_to_one);
        assert_eq!(defaults.steps_offset, 0);
        assert_eq!(defaults.timestep_spacing, None);
        assert_eq!(defaults.interpolation, Interpolation::Linear);
        Ok(())
    }

    #[test]
    fn turbo_config_parses() -> Result<(), String> {
        // stabilityai/sd-turbo's scheduler config.
        let config = parse(
            r#"{"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                "interpolation_type": "linear", "num_train_timesteps": 1000,
                "prediction_type": "epsilon", "set_alpha_to_one": false, "skip_prk_steps": true,
                "steps_offset": 1, "timestep_spacing": "trailing", "trained_betas": null,
                "use_karras_sigmas": false}"#,
        )?;
        assert_eq!(config.timestep_spacing, Some(TimestepSpacing::Trailing));
        assert_eq!(config.sigma_min, None);
        Ok(())
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            (r#"{"beta_schedule": "cosine"}"#, "beta_schedule"),
            (r#"{"prediction_type": "flow"}"#, "prediction_type"),
            (r#"{"timestep_spacing": "even"}"#, "timestep_spacing"),
            (r#"{"interpolation_type": "cubic"}"#, "interpolation_type"),
            (r#"{"sigma_min": -1.0}"#, "sigma_min"),
            (r#"{"beta_end": 1.5}"#, "beta_end"),
            (r#"{"num_train_timesteps": 1}"#, "num_train_timesteps"),
            (r#"{"trained_betas": [0.1, 0.2]}"#, "trained_betas"),
            (r#"{"thresholding": true}"#, "thresholding"),
        ];
        for (json, key) in cases {
            match parse(json) {
                Err(message) => assert!(message.contains(key), "{json}: {message}"),
                Ok(config) => panic!("{json} parsed: {config:?}"),
            }
        }
    }
}
