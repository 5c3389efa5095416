//! Reference values: the schedules the standard SD 1.5 scheduler config gives
//! for 20 steps (and the Turbo schedules), checked against the published
//! formulas written out again here, independently of the implementation, and
//! against a few exact numbers.
//!
//! The exact numbers were computed in plain Python (f64) from the same
//! formulas: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2,
//! alpha_bar_t = prod(1 - beta), sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t),
//! the spacings of diffusers' `set_timesteps`, linear interpolation of sigma at
//! fractional timesteps, Karras et al. (2022) eq. 5 with rho = 7. A numpy
//! transcription of diffusers' `set_timesteps` (which works in f32) agrees with
//! every one of them to within 2e-6 relative.

use std::io::Write;

use kiln_domain::recipe::Scheduler;

use super::*;
use crate::error::PipelineError;

/// The `scheduler_config.json` of runwayml/stable-diffusion-v1-5 (no `timestep_spacing`:
/// DDIM takes its default, leading; Euler, Euler a and DPM-Solver++ take linspace).
pub(super) const SD15_JSON: &str = r#"{"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0",
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true,
    "steps_offset": 1, "trained_betas": null, "clip_sample": false}"#;

type TestResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Reads a scheduler config through the loader's own path.
fn config(
    json: &str,
) -> std::result::Result<SchedulerConfig, Box<dyn std::error::Error + Send + Sync>> {
    let mut file = tempfile::NamedTempFile::new()?;
    file.write_all(json.as_bytes())?;
    Ok(SchedulerConfig::read(file.path())?)
}

fn sd15() -> std::result::Result<SchedulerConfig, Box<dyn std::error::Error + Send + Sync>> {
    config(SD15_JSON)
}

/// SD 1.5's config with `timestep_spacing = "trailing"`, as SD-Turbo ships it.
fn turbo() -> std::result::Result<SchedulerConfig, Box<dyn std::error::Error + Send + Sync>> {
    config(&SD15_JSON.replace(
        "\"clip_sample\"",
        "\"timestep_spacing\": \"trailing\", \"clip_sample\"",
    ))
}

fn plan(
    config: &SchedulerConfig,
    scheduler: Scheduler,
    steps: u32,
    karras: bool,
) -> std::result::Result<Box<dyn Sampler>, PipelineError> {
    build(config, scheduler, steps, karras, 0.0)
}

/// The training sigmas of SD 1.5, from the DDPM definitions (Ho et al. 2020, eq. 4):
/// beta_i = (sqrt(0.00085) + (sqrt(0.012) - sqrt(0.00085)) * i / 999)^2.
fn reference_sigmas() -> Vec<f64> {
    let (lo, hi) = (0.00085f64.sqrt(), 0.012f64.sqrt());
    let mut alpha_bar = 1.0;
    (0..1000)
        .map(|i| {
            let beta = (lo + (hi - lo) * f64::from(i) / 999.0).powi(2);
            alpha_bar *= 1.0 - beta;
            ((1.0 - alpha_bar) / alpha_bar).sqrt()
        })
        .collect()
}

/// sigma at a fractional timestep, linear between training timesteps.
fn sigma_at(sigmas: &[f64], t: f64) -> f64 {
    let j = (t.floor() as usize).min(998);
    sigmas[j] + (sigmas[j + 1] - sigmas[j]) * (t - j as f64)
}

/// Asserts |got - want| <= tol * max(1, |want|), element by element.
fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * w.abs().max(1.0),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

/// sigma_i for every step, read back through a sampler's public behaviour:
/// add_noise(0, unit noise, i) is sigma_i for Euler samplers.
fn sigmas_of(sampler: &dyn Sampler) -> anyhow::Result<Vec<f64>> {
    let zero = candle_core::Tensor::zeros(1, candle_core::DType::F64, &candle_core::Device::Cpu)?;
    let one = candle_core::Tensor::ones(1, candle_core::DType::F64, &candle_core::Device::Cpu)?;
    (0..=sampler.timesteps().len())
        .map(|i| Ok(sampler.add_noise(&zero, &one, i)?.to_vec1::<f64>()?[0]))
        .collect()
}

#[test]
fn ddim_leading_twenty_steps() -> TestResult {
    let ddim = plan(&sd15()?, Scheduler::Ddim, 20, false)?;
    // T / steps = 50; (0..20) * 50, descending, + steps_offset 1.
    let want: Vec<f64> = (0..20).rev().map(|i| f64::from(i * 50 + 1)).collect();
    assert_eq!(ddim.timesteps(), want);
    assert_eq!(ddim.timesteps()[..3], [951.0, 901.0, 851.0]);
    assert_eq!(ddim.timesteps()[17..], [101.0, 51.0, 1.0]);
    assert_eq!(ddim.init_noise_sigma(), 1.0);
    Ok(())
}

#[test]
fn training_sigma_range_is_sd15s() {
    let s = reference_sigmas();
    assert!((s[0] - 0.029_167_158_151_720_367).abs() < 1e-12);
    assert!((s[999] - 14.614_641_229_333_646).abs() < 1e-9);
    // The well-known k-diffusion values for SD.
    assert!((s[0] - 0.0292).abs() < 1e-4 && (s[999] - 14.6146).abs() < 1e-4);
}

#[test]
fn euler_and_euler_a_linspace_twenty_steps() -> TestResult {
    let train = reference_sigmas();
    // linspace(0, 999, 20), descending: t_k = 999 - k * 999 / 19.
    let ts: Vec<f64> = (0..20)
        .map(|k| 999.0 - f64::from(k) * 999.0 / 19.0)
        .collect();
    let mut sigmas: Vec<f64> = ts.iter().map(|&t| sigma_at(&train, t)).collect();
    sigmas.push(0.0);
    for scheduler in [Scheduler::Euler, Scheduler::EulerA] {
        let sampler = plan(&sd15()?, scheduler, 20, false)?;
        assert_close(sampler.timesteps(), &ts, 1e-12, "timesteps");
        assert_close(&sigmas_of(sampler.as_ref())?, &sigmas, 1e-9, "sigmas");
        // Exact values: the first and last steps, and t_1 = 999 * 18 / 19.
        assert_close(
            &sampler.timesteps()[..2],
            &[999.0, 946.421_052_631_578_9],
            1e-12,
            "first timesteps",
        );
        assert_eq!(sampler.timesteps()[19], 0.0);
        let got = sigmas_of(sampler.as_ref())?;
        assert_close(
            &got[..3],
            &[
                14.614_641_229_333_646,
                10.746_843_988_817_078,
                8.081_534_032_962_217,
            ],
            1e-9,
            "first sigmas",
        );
        assert_close(
            &got[17..],
            &[
                0.355_546_356_454_899_7,
                0.232_167_630_664_212_7,
                0.029_167_158_151_720_367,
                0.0,
            ],
            1e-9,
            "last sigmas",
        );
        // Linspace starts at the last training step: init sigma = sigma_max.
        assert!((sampler.init_noise_sigma() - 14.614_641_229_333_646).abs() < 1e-9);
    }
    Ok(())
}

#[test]
fn karras_twenty_steps_for_euler_samplers() -> TestResult {
    let train = reference_sigmas();
    let (min, max) = (train[0], train[999]);
    let inv = |s: f64| s.powf(1.0 / 7.0);
    let mut karras: Vec<f64> = (0..20)
        .map(|k| (inv(max) + f64::from(k) / 19.0 * (inv(min) - inv(max))).powi(7))
        .collect();
    karras.push(0.0);
    for scheduler in [Scheduler::Euler, Scheduler::EulerA] {
        let sampler = plan(&sd15()?, scheduler, 20, true)?;
        let got = sigmas_of(sampler.as_ref())?;
        assert_close(&got, &karras, 1e-9, "karras sigmas");
        assert_close(
            &got[..3],
            &[
                14.614_641_229_333_643,
                11.725_364_849_528_342,
                9.340_202_751_787_535,
            ],
            1e-9,
            "first karras sigmas",
        );
        assert_close(
            &got[17..20],
            &[
                0.077_860_029_485_762_72,
                0.048_481_361_923_495_316,
                0.029_167_158_151_720_38,
            ],
            1e-9,
            "last karras sigmas",
        );
        // Each timestep is where log sigma, interpolated linearly between training
        // timesteps, equals the Karras sigma.
        for (k, &t) in sampler.timesteps().iter().enumerate() {
            let j = (t.floor() as usize).min(998);
            let w = t - j as f64;
            let log_sigma = (1.0 - w) * train[j].ln() + w * train[j + 1].ln();
            assert!(
                (log_sigma - karras[k].ln()).abs() < 1e-9,
                "timestep {k} = {t}: sigma {} vs {}",
                log_sigma.exp(),
                karras[k]
            );
        }
        assert_close(
            sampler.timesteps(),
            &[
                999.0,
                961.732_738_605_025_7,
                921.041_933_627_933_8,
                876.313_566_174_458_4,
                826.790_310_780_646_2,
                771.551_609_641_779_8,
                709.529_253_153_797,
                639.614_091_467_012,
                560.974_556_998_442_2,
                473.747_945_965_696_9,
                380.130_583_854_859_7,
                285.316_328_646_217_5,
                197.079_444_174_808_46,
                123.394_282_090_854_97,
                69.256_300_911_708_05,
                34.697_019_603_373_64,
                15.481_342_874_290_075,
                5.991_717_489_207_481,
                1.782_902_303_808_011_6,
                0.0,
            ],
            1e-9,
            "karras timesteps",
        );
    }
    Ok(())
}

#[test]
fn dpmpp_2m_linspace_and_karras_twenty_steps() -> TestResult {
    let train = reference_sigmas();
    let dpm = plan(&sd15()?, Scheduler::DpmPp2m, 20, false)?;
    // round(linspace(0, 999, 21))[::-1][:-1]: 999 * k / 20 for k = 20..1, rounded
    // half to even (499.5 -> 500).
    let want: Vec<f64> = (1..=20)
        .rev()
        .map(|k| (999.0 * f64::from(k) / 20.0).round_ties_even())
        .collect();
    assert_eq!(dpm.timesteps(), want);
    assert_eq!(
        dpm.timesteps(),
        [
            999.0, 949.0, 899.0, 849.0, 799.0, 749.0, 699.0, 649.0, 599.0, 549.0, 500.0, 450.0,
            400.0, 350.0, 300.0, 250.0, 200.0, 150.0, 100.0, 50.0
        ]
    );
    assert_eq!(dpm.init_noise_sigma(), 1.0);
    // DPM-Solver++ works in variance-preserving form: add_noise(0, 1, i) = s_i =
    // sigma_i / sqrt(sigma_i^2 + 1), the training sigma at the integer timestep.
    let vp = |s: f64| s / (s * s + 1.0).sqrt();
    let mut sigmas: Vec<f64> = want.iter().map(|&t| vp(train[t as usize])).collect();
    sigmas.push(0.0);
    assert_close(&sigmas_of(dpm.as_ref())?, &sigmas, 1e-9, "dpm sigmas");
    assert!((train[949] - 10.904_235_383_317_129).abs() < 1e-9);
    assert!((train[50] - 0.225_581_944_517_449_78).abs() < 1e-9);

    // Karras: the whole training range, timesteps rounded to whole numbers.
    let karras = plan(&sd15()?, Scheduler::DpmPp2m, 20, true)?;
    assert_eq!(
        karras.timesteps(),
        [
            999.0, 962.0, 921.0, 876.0, 827.0, 772.0, 710.0, 640.0, 561.0, 474.0, 380.0, 285.0,
            197.0, 123.0, 69.0, 35.0, 15.0, 6.0, 2.0, 0.0
        ]
    );
    let euler_karras = sigmas_of(plan(&sd15()?, Scheduler::Euler, 20, true)?.as_ref())?;
    let vp_karras: Vec<f64> = euler_karras.iter().map(|&s| vp(s)).collect();
    assert_close(
        &sigmas_of(karras.as_ref())?,
        &vp_karras,
        1e-9,
        "dpm karras sigmas",
    );
    Ok(())
}

#[test]
fn leading_spacing_for_euler_uses_diffusers_init_sigma() -> TestResult {
    // SDXL-style config: leading spacing with steps_offset 1 gives 951..1, and the
    // initial noise is sqrt(sigma_max^2 + 1) (diffusers' `init_noise_sigma`).
    let leading = config(&SD15_JSON.replace(
        "\"clip_sample\"",
        "\"timestep_spacing\": \"leading\", \"clip_sample\"",
    ))?;
    let euler = plan(&leading, Scheduler::Euler, 20, false)?;
    assert_eq!(euler.timesteps()[..2], [951.0, 901.0]);
    assert_eq!(euler.timesteps()[19], 1.0);
    let sigma_951 = reference_sigmas()[951];
    assert!((sigma_951 - 11.028_331_164_775_226).abs() < 1e-9);
    assert!((euler.init_noise_sigma() - (sigma_951 * sigma_951 + 1.0).sqrt()).abs() < 1e-9);
    assert!((euler.init_noise_sigma() - 11.073_576_128_782_99).abs() < 1e-9);
    // Karras over the interpolated range sigma(951)..sigma(1), as diffusers' Euler.
    let karras = sigmas_of(plan(&leading, Scheduler::Euler, 20, true)?.as_ref())?;
    assert!((karras[0] - sigma_951).abs() < 1e-9);
    assert!((karras[19] - 0.041_314_411_996_783_09).abs() < 1e-9);
    // DPM-Solver++ leading spaces 21 points: T // 21 = 47, so 941, 894, ..., 48.
    let dpm = plan(&leading, Scheduler::DpmPp2m, 20, false)?;
    let want: Vec<f64> = (1..=20).rev().map(|i| f64::from(i * 47 + 1)).collect();
    assert_eq!(dpm.timesteps(), want);
    Ok(())
}

#[test]
fn turbo_trailing_schedules_start_at_999() -> TestResult {
    let turbo = turbo()?;
    let sigma = reference_sigmas();
    for scheduler in [Scheduler::EulerA, Scheduler::Euler] {
        let one = plan(&turbo, scheduler, 1, false)?;
        assert_eq!(one.timesteps(), [999.0]);
        assert_close(
            &sigmas_of(one.as_ref())?,
            &[sigma[999], 0.0],
            1e-9,
            "1 step",
        );
        assert!((one.init_noise_sigma() - sigma[999]).abs() < 1e-9);
        let two = plan(&turbo, scheduler, 2, false)?;
        assert_eq!(two.timesteps(), [999.0, 499.0]);
        assert_close(
            &sigmas_of(two.as_ref())?,
            &[sigma[999], 1.612_886_194_303_876, 0.0],
            1e-9,
            "2 steps",
        );
        let four = plan(&turbo, scheduler, 4, false)?;
        assert_eq!(four.timesteps(), [999.0, 749.0, 499.0, 249.0]);
        assert_close(
            &sigmas_of(four.as_ref())?,
            &[
                sigma[999],
                4.081_729_363_724_309,
                sigma[499],
                0.693_204_899_638_688_5,
                0.0,
            ],
            1e-9,
            "4 steps",
        );
    }
    for scheduler in [Scheduler::Ddim, Scheduler::DpmPp2m] {
        assert_eq!(plan(&turbo, scheduler, 1, false)?.timesteps(), [999.0]);
        assert_eq!(
            plan(&turbo, scheduler, 2, false)?.timesteps(),
            [999.0, 499.0]
        );
    }
    Ok(())
}

#[test]
fn recipe_fields_are_checked_by_name() -> TestResult {
    let config = sd15()?;
    let field = |r: std::result::Result<Box<dyn Sampler>, PipelineError>| match r {
        Err(PipelineError::InvalidRecipe { field, .. }) => field,
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => "accepted",
    };
    assert_eq!(
        field(build(&config, Scheduler::Ddim, 20, true, 0.0)),
        "karras"
    );
    assert_eq!(
        field(build(&config, Scheduler::Euler, 20, false, 0.5)),
        "eta"
    );
    assert_eq!(
        field(build(&config, Scheduler::Ddim, 20, false, 1.5)),
        "eta"
    );
    assert_eq!(
        field(build(&config, Scheduler::Ddim, 20, false, f64::NAN)),
        "eta"
    );
    assert_eq!(
        field(build(&config, Scheduler::DpmPp2m, 0, false, 0.0)),
        "steps"
    );
    assert_eq!(
        field(build(&config, Scheduler::EulerA, 1001, true, 0.0)),
        "steps"
    );
    assert_eq!(
        field(build(&config, Scheduler::Ddim, 1000, false, 1.0)),
        "accepted"
    );
    let mut log_linear = config.clone();
    log_linear.interpolation = config::Interpolation::LogLinear;
    assert_eq!(
        field(build(&log_linear, Scheduler::Euler, 20, false, 0.0)),
        "scheduler"
    );
    Ok(())
}

#[test]
fn every_sampler_plans_every_step_count_without_panicking() -> TestResult {
    let config = sd15()?;
    for &scheduler in Scheduler::ALL {
        for karras in [false, scheduler.takes_karras()] {
            for steps in [1, 2, 3, 14, 15, 61, 500, 999, 1000] {
                let sampler = plan(&config, scheduler, steps, karras)?;
                assert_eq!(sampler.timesteps().len(), steps as usize);
                assert!(
                    sampler
                        .timesteps()
                        .iter()
                        .all(|t| (0.0..=1000.0).contains(t))
                );
                assert_eq!(sampler.start_index(1.0), 0);
                assert_eq!(sampler.start_index(0.0), steps as usize);
            }
        }
    }
    Ok(())
}
