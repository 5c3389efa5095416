//! Inference schedules: which timesteps a sampler visits and at which noise levels.
//!
//! Timestep spacings follow diffusers' `set_timesteps` (`scheduling_ddim.py`,
//! `scheduling_euler_discrete.py`), with numpy's `linspace`, `interp` and
//! round-half-to-even reproduced so that the same config gives the same
//! timesteps. Noise levels are the sigmas of the variance-exploding view of a
//! discrete diffusion model, sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)
//! (Karras et al., "Elucidating the Design Space of Diffusion-Based Generative
//! Models", 2022, arXiv:2206.00364, table 1, "VP"); the Karras schedule is
//! eq. 5 of that paper with rho = 7 (diffusers' `_convert_to_karras`), and
//! sigmas are mapped back to (fractional) timesteps by interpolating log sigma
//! (diffusers' `_sigma_to_t`).

use crate::error::PipelineError;

use super::config::TimestepSpacing;

/// The exponent of the Karras schedule; 7 is the paper's choice and diffusers'.
const KARRAS_RHO: f64 = 7.0;

/// Returns `n` evenly spaced values from `start` to `end` inclusive, as `numpy.linspace`.
pub(crate) fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![start],
        _ => {
            // numpy: arange(n) * step + start, and the last value set to `end` exactly.
            let step = (end - start) / (n - 1) as f64;
            let mut values: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
            values[n - 1] = end;
            values
        }
    }
}

/// Checks a step count against the training schedule and returns it as a `usize`.
///
/// # Errors
///
/// `InvalidRecipe` on `steps` when it is 0 or more than the model's training steps.
pub(crate) fn check_steps(steps: u32, train_steps: usize) -> Result<usize, PipelineError> {
    let n = steps as usize;
    if n == 0 || n > train_steps {
        return Err(PipelineError::InvalidRecipe {
            field: "steps",
            message: format!("must be between 1 and {train_steps} for this model, got {steps}"),
        });
    }
    Ok(n)
}

/// Returns `steps` training timesteps, descending, spaced as DDIM and Euler space them.
///
/// Leading and trailing give whole numbers; linspace keeps fractions (Euler feeds
/// them to the UNet as they are, DDIM rounds them). `steps` must be in `1..=T`.
pub(crate) fn spaced_timesteps(
    spacing: TimestepSpacing,
    train_steps: usize,
    steps: usize,
    steps_offset: usize,
) -> Vec<f64> {
    let (t, n) = (train_steps, steps.max(1));
    match spacing {
        // (arange(n) * (T // n))[::-1] + steps_offset
        TimestepSpacing::Leading => (0..n)
            .rev()
            .map(|i| (i * (t / n) + steps_offset) as f64)
            .collect(),
        // round(arange(T, 0, -T / n)) - 1, numpy rounding half to even
        TimestepSpacing::Trailing => {
            let ratio = t as f64 / n as f64;
            (0..n)
                .map(|k| ((t as f64 - k as f64 * ratio).round_ties_even() - 1.0).max(0.0))
                .collect()
        }
        // linspace(0, T - 1, n)[::-1]
        TimestepSpacing::Linspace => {
            let mut values = linspace(0.0, (t - 1) as f64, n);
            values.reverse();
            values
        }
    }
}

/// Returns sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for every training timestep (ascending).
pub(crate) fn training_sigmas(alphas_cumprod: &[f64]) -> Vec<f64> {
    alphas_cumprod
        .iter()
        .map(|a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// Returns `values` linearly interpolated at fractional index `x`, as
/// `np.interp(x, arange(len), values)`: clamped to the end values outside the range.
pub(crate) fn interp(x: f64, values: &[f64]) -> f64 {
    let (Some(&first), Some(&last)) = (values.first(), values.last()) else {
        return f64::NAN;
    };
    if x.is_nan() || x <= 0.0 {
        return first;
    }
    let i = x.floor() as usize;
    match (values.get(i), values.get(i + 1)) {
        (Some(&lo), Some(&hi)) => (hi - lo) * (x - i as f64) + lo,
        _ => last,
    }
}

/// Returns the fractional training timestep whose sigma is `sigma`, interpolating in log sigma
/// between the two neighbouring training timesteps (diffusers' `_sigma_to_t`).
///
/// `log_sigmas` are the logs of [`training_sigmas`], ascending; a sigma outside their
/// range maps to the nearest end.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let len = log_sigmas.len();
    if len < 2 {
        return 0.0;
    }
    // The last index whose log sigma is <= log_sigma (0 if none), at most len - 2.
    let below = log_sigmas.partition_point(|&l| l <= log_sigma);
    let low = below.saturating_sub(1).min(len - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// Returns `n` sigmas from `sigma_max` down to `sigma_min` on the Karras et al. (2022)
/// schedule, eq. 5: (max^(1/rho) + k/(n-1) * (min^(1/rho) - max^(1/rho)))^rho.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let (min_inv, max_inv) = (
        sigma_min.powf(1.0 / KARRAS_RHO),
        sigma_max.powf(1.0 / KARRAS_RHO),
    );
    linspace(0.0, 1.0, n)
        .into_iter()
        .map(|ramp| (max_inv + ramp * (min_inv - max_inv)).powf(KARRAS_RHO))
        .collect()
}

/// Returns the first step of an img2img render of the given strength, as diffusers'
/// img2img `get_timesteps` (every kiln sampler has order 1 there):
/// `steps - min(int(steps * strength), steps)`. Strength 1 starts at 0; strength 0
/// returns `steps` (nothing to denoise).
pub(crate) fn start_index(steps: usize, strength: f64) -> usize {
    let strength = if strength.is_nan() {
        0.0
    } else {
        strength.clamp(0.0, 1.0)
    };
    // `as` truncates toward zero like Python's int(), and saturates.
    let init = ((steps as f64 * strength) as usize).min(steps);
    steps - init
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_numpy() {
        assert_eq!(linspace(0.0, 1.0, 5), [0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(linspace(3.0, 9.0, 1), [3.0]);
        assert!(linspace(0.0, 1.0, 0).is_empty());
        // The end point is exact even where arange * step would round past it.
        assert_eq!(linspace(0.0, 999.0, 21)[20], 999.0);
    }

    #[test]
    fn interp_clamps_and_interpolates() {
        let ys = [1.0, 3.0, 7.0];
        assert_eq!(interp(-1.0, &ys), 1.0);
        assert_eq!(interp(0.5, &ys), 2.0);
        assert_eq!(interp(1.25, &ys), 4.0);
        assert_eq!(interp(2.0, &ys), 7.0);
        assert_eq!(interp(9.0, &ys), 7.0);
    }

    #[test]
    fn sigma_to_t_inverts_interpolation_in_log_space() {
        let sigmas = [0.1f64, 1.0, 10.0, 100.0];
        let logs: Vec<f64> = sigmas.iter().map(|s| s.ln()).collect();
        assert!((sigma_to_t(1.0, &logs) - 1.0).abs() < 1e-12);
        // sqrt(10) is halfway between 1 and 10 in log space.
        assert!((sigma_to_t(10f64.sqrt(), &logs) - 1.5).abs() < 1e-12);
        assert_eq!(sigma_to_t(100.0, &logs), 3.0);
        assert_eq!(sigma_to_t(1e6, &logs), 3.0);
        assert_eq!(sigma_to_t(0.01, &logs), 0.0);
        assert_eq!(sigma_to_t(0.0, &logs), 0.0);
    }

    #[test]
    fn karras_ends_at_both_sigmas() {
        let s = karras_sigmas(0.1, 10.0, 5);
        assert_eq!(s.len(), 5);
        assert!((s[0] - 10.0).abs() < 1e-12 && (s[4] - 0.1).abs() < 1e-12);
        assert!(s.windows(2).all(|w| w[0] > w[1]));
        assert_eq!(karras_sigmas(0.1, 10.0, 1).len(), 1);
    }

    #[test]
    fn start_index_follows_diffusers_get_timesteps() {
        assert_eq!(start_index(20, 1.0), 0);
        assert_eq!(start_index(20, 0.0), 20);
        assert_eq!(start_index(20, 0.75), 5);
        // int(50 * 0.3) = int(15.000000000000002) = 15; int(100 * 0.29) = 28.
        assert_eq!(start_index(50, 0.3), 35);
        assert_eq!(start_index(100, 0.29), 72);
        assert_eq!(start_index(4, 0.5), 2);
        assert_eq!(start_index(4, f64::NAN), 4);
        assert_eq!(start_index(4, 7.0), 0);
    }

    #[test]
    fn steps_are_checked_against_the_training_schedule() {
        assert!(matches!(check_steps(20, 1000), Ok(20)));
        for bad in [0, 1001] {
            let err = check_steps(bad, 1000).err();
            assert!(
                matches!(&err, Some(PipelineError::InvalidRecipe { field: "steps", message }) if message.contains(&bad.to_string())),
                "{err:?}"
            );
        }
    }
}
