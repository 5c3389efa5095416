//! Pipeline benchmarks: the time of one guided UNet step and of one VAE decode.
//!
//! `kiln bench pipeline` drives these on a model loaded by the real
//! [`Pipeline::load`]. The UNet step is the one `Pipeline::txt2img` runs per
//! denoising step: the latents doubled into a batch of two (negative and
//! prompt branches) when guidance is above 1, one UNet forward, and the
//! guidance combination; the sampler's own arithmetic is left out (a few
//! element-wise operations on a 4-channel latent). The decode is
//! `Pipeline`'s own, latents to 8-bit pixels. Text encoding happens once,
//! before timing, as in a render.
//!
//! Benchmarks are commands, never timed tests: nothing here asserts a time.
//! [`write_sd15_shaped_model`] writes the SD-1.5-sized random-weight model the
//! numbers in the README are measured on.

mod profile;
mod sd15_shape;

use std::time::{Duration, Instant};

use candle_core::{IndexOp, Tensor};

pub use profile::{SpanProfiler, SpanTime};
pub use sd15_shape::write_sd15_shaped_model;

use super::noise::{self, Purpose};
use super::{Pipeline, PipelineError, RgbImage};

/// The prompt the benchmark conditions on (its length does not change the UNet's work:
/// every prompt is padded to the 77-token window).
const PROMPT: &str = "a red fox sitting on a mossy stone, watercolor";
/// The negative prompt of the guided branch.
const NEGATIVE: &str = "blurry, low quality";
/// A mid-schedule timestep; the UNet's cost does not depend on it.
const TIMESTEP: f64 = 500.0;

/// What to time and how often.
#[derive(Clone, Debug)]
pub struct BenchPlan {
    /// Image side in pixels (square images); the latents are side / 8.
    pub size: u32,
    /// Classifier-free guidance scale: above 1 runs both branches as a batch of two.
    pub guidance: f64,
    /// Timed runs of each measurement, after one untimed warm-up run.
    pub runs: u32,
    /// Reset after the warm-up, so it records the timed runs only.
    pub profiler: Option<SpanProfiler>,
}

/// The durations of the timed runs of one measurement, warm-up excluded.
#[derive(Clone, Debug, Default)]
pub struct Samples(pub Vec<Duration>);

impl Samples {
    /// Returns the median duration in seconds (the mean of the middle two for an even count).
    pub fn median_s(&self) -> f64 {
        let mut s: Vec<f64> = self.0.iter().map(Duration::as_secs_f64).collect();
        s.sort_by(f64::total_cmp);
        match s.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => s[n / 2],
            n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
        }
    }

    /// Returns the shortest duration in seconds.
    pub fn min_s(&self) -> f64 {
        self.0
            .iter()
            .map(Duration::as_secs_f64)
            .fold(f64::INFINITY, f64::min)
    }
}

/// Returns the latents `[1, c, size/8, size/8]` of seed 0, as txt2img's first step sees them.
fn latents(pipeline: &Pipeline, size: u32) -> Result<Tensor, PipelineError> {
    let side = pipeline.latent_side("size", size)?;
    let shape = (1, pipeline.latent_channels, side, side);
    let values = noise::standard_normal(0, Purpose::InitialLatents, 0, shape.1 * side * side);
    let cpu = Tensor::from_vec(values, shape, &candle_core::Device::Cpu)?;
    Ok(cpu.to_device(&pipeline.device)?)
}

/// Runs `work` once untimed, then `plan.runs` times timed, and returns the timed durations.
fn time<T>(
    plan: &BenchPlan,
    mut work: impl FnMut() -> Result<T, PipelineError>,
) -> Result<Samples, PipelineError> {
    std::hint::black_box(work()?);
    if let Some(profiler) = &plan.profiler {
        profiler.reset();
    }
    let mut samples = Vec::with_capacity(plan.runs as usize);
    for _ in 0..plan.runs {
        let start = Instant::now();
        std::hint::black_box(work()?);
        samples.push(start.elapsed());
    }
    Ok(Samples(samples))
}

/// Times one denoising step's UNet work at `plan.size`: batch 2 with guidance, else batch 1.
///
/// # Errors
///
/// `InvalidRecipe` when the size is not a multiple of the VAE's downscale,
/// `Tokenizer` or `Candle` when encoding or the UNet fails.
pub fn time_unet_step(pipeline: &Pipeline, plan: &BenchPlan) -> Result<Samples, PipelineError> {
    let latents = latents(pipeline, plan.size)?;
    let (_, _, h, w) = latents.dims4()?;
    let guided = plan.guidance > 1.0;
    let context = pipeline.conditioning(PROMPT, guided.then_some(NEGATIVE), h, w)?;
    time(plan, || {
        // As `Pipeline::txt2img` runs a step, less the sampler's update.
        let input = if guided {
            Tensor::cat(&[&latents, &latents], 0)?
        } else {
            latents.clone()
        };
        let prediction = pipeline
            .unet
            .forward_tasks(&input, TIMESTEP, &context, input.dim(0)?)?;
        let prediction = if guided {
            let uncond = prediction.i(0..1)?;
            let cond = prediction.i(1..2)?;
            (&uncond + ((cond - &uncond)? * plan.guidance)?)?
        } else {
            prediction
        };
        // Make sure lazy backends have finished the work.
        pipeline.device.synchronize()?;
        Ok(prediction)
    })
}

/// Times one VAE decode (latents to 8-bit RGB) at `plan.size`.
///
/// # Errors
///
/// `InvalidRecipe` when the size is not a multiple of the VAE's downscale,
/// `Candle` when decoding fails.
pub fn time_vae_decode(pipeline: &Pipeline, plan: &BenchPlan) -> Result<Samples, PipelineError> {
    let latents = latents(pipeline, plan.size)?;
    time(plan, || -> Result<RgbImage, PipelineError> {
        pipeline.decode(&latents)
    })
}

/// Returns the process's peak resident set (`VmHWM` of `/proc/self/status`) in
/// bytes, or `None` where the file does not exist or lacks the line (not Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    status_kib("VmHWM:").map(|kib| kib * 1024)
}

/// Returns the process's current resident set (`VmRSS`) in bytes, where known.
pub fn rss_bytes() -> Option<u64> {
    status_kib("VmRSS:").map(|kib| kib * 1024)
}

/// Resets the peak resident set to the current one (Linux: writes 5 to
/// `/proc/self/clear_refs`), so the next [`peak_rss_bytes`] covers what follows.
/// Returns whether the reset took effect.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Reads a `kB` field of `/proc/self/status`.
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        let s = |ms: &[u64]| Samples(ms.iter().map(|&m| Duration::from_millis(m)).collect());
        assert_eq!(s(&[30, 10, 20]).median_s(), 0.02);
        assert_eq!(s(&[40, 10, 20, 30]).median_s(), 0.025);
        assert_eq!(s(&[40, 10, 20, 30]).min_s(), 0.01);
        assert!(s(&[]).median_s().is_nan());
    }

    #[test]
    fn the_tiny_model_benchmarks() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        super::super::write_tiny_model(dir.path())?;
        let pipeline = Pipeline::load(dir.path(), &candle_core::Device::Cpu)?;
        let plan = BenchPlan {
            size: 64,
            guidance: 7.5,
            runs: 2,
            profiler: None,
        };
        assert_eq!(time_unet_step(&pipeline, &plan)?.0.len(), 2);
        assert_eq!(time_vae_decode(&pipeline, &plan)?.0.len(), 2);
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes().is_some_and(|p| p > 0));
            assert!(rss_bytes().is_some_and(|r| r <= peak_rss_bytes().unwrap_or(0)));
        }
        let odd = BenchPlan { size: 60, ..plan };
        assert!(matches!(
            time_unet_step(&pipeline, &odd),
            Err(PipelineError::InvalidRecipe { .. })
        ));
        Ok(())
    }
}
