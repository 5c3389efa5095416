//! `kiln bench pipeline` and `kiln bench sd15-model`: the time of one guided
//! UNet step and one VAE decode, with peak memory, on a model loaded the way a
//! worker loads it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kiln_diffusion::Pipeline;
use kiln_diffusion::bench::{self as pbench, BenchPlan, Samples, SpanProfiler, SpanTime};
use serde_json::json;

/// Time one guided UNet step and one VAE decode on the CPU (medians after a warm-up),
/// with peak memory.
#[derive(clap::Args, Debug)]
pub struct BenchPipeline {
    /// The model folder; default: the tiny SD 1.5 model, written to a temporary folder.
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Image side in pixels (a multiple of 8).
    #[arg(long, default_value_t = 64)]
    size: u32,
    /// Timed UNet steps (0 skips them).
    #[arg(long, default_value_t = 5)]
    steps: u32,
    /// Timed VAE decodes (0 skips them).
    #[arg(long, default_value_t = 3)]
    decodes: u32,
    /// Guidance scale: above 1 runs the UNet on a batch of two, as txt2img does.
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// Decode in tiles of PX pixels, as `kiln-worker --vae-tile` does.
    #[arg(long, value_name = "PX", value_parser = kiln_diffusion::VaeTile::parse)]
    vae_tile: Option<kiln_diffusion::VaeTile>,
    /// Also print where the time goes: wall time per candle tracing span.
    #[arg(long)]
    profile: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl BenchPipeline {
    /// Runs `kiln bench pipeline` off the async runtime: it blocks.
    pub async fn run(self) -> anyhow::Result<bool> {
        tokio::task::spawn_blocking(move || pipeline(&self))
            .await?
            .map(|()| true)
    }
}

/// Write an SD-1.5-shaped model with random weights (about 4.3 GB) for `bench pipeline`.
#[derive(clap::Args, Debug)]
pub struct Sd15Model {
    /// The folder to write (outside the repository: it is large).
    #[arg(long)]
    out: PathBuf,
}

impl Sd15Model {
    /// Runs `kiln bench sd15-model` off the async runtime: it blocks.
    pub async fn run(self) -> anyhow::Result<bool> {
        tokio::task::spawn_blocking(move || sd15_model(&self.out))
            .await?
            .map(|()| true)
    }
}

/// A temporary folder holding the tiny model, removed on drop.
struct TinyFolder(PathBuf);

impl Drop for TinyFolder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Returns the 1-, 5- and 15-minute load averages (`/proc/loadavg`), where known.
fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut fields = text.split_whitespace().map(|f| f.parse::<f64>().ok());
    Some([fields.next()??, fields.next()??, fields.next()??])
}

/// Formats bytes as GiB (or MiB below 1 GiB).
fn size_text(bytes: Option<u64>) -> String {
    match bytes {
        Some(b) if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / f64::from(1u32 << 30)),
        Some(b) => format!("{:.0} MiB", b as f64 / f64::from(1u32 << 20)),
        None => "unknown".into(),
    }
}

/// One measurement: its samples, the peak resident set while it ran, and the
/// span times of its timed runs when profiled.
struct Measured {
    samples: Samples,
    peak_rss: Option<u64>,
    spans: Vec<SpanTime>,
}

impl Measured {
    fn json(&self) -> serde_json::Value {
        let runs = self.samples.0.len().max(1) as f64;
        let spans: Vec<_> = self
            .spans
            .iter()
            .map(|s| {
                json!({"span": s.name, "calls_per_run": s.calls as f64 / runs,
                       "self_s_per_run": s.self_time.as_secs_f64() / runs,
                       "total_s_per_run": s.total.as_secs_f64() / runs})
            })
            .collect();
        json!({
            "median_s": self.samples.median_s(),
            "min_s": self.samples.min_s(),
            "runs_s": self.samples.0.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
            "peak_rss_bytes": self.peak_rss,
            "spans": spans,
        })
    }

    /// Prints the span table: self time per run and its share of the run.
    fn print_spans(&self) {
        if self.spans.is_empty() {
            return;
        }
        let runs = self.samples.0.len().max(1) as f64;
        let per_run: f64 = self
            .samples
            .0
            .iter()
            .map(Duration::as_secs_f64)
            .sum::<f64>()
            / runs;
        println!(
            "  {:<22} {:>9} {:>10} {:>6}",
            "span (self time)", "calls/run", "s/run", "share"
        );
        for s in &self.spans {
            let self_s = s.self_time.as_secs_f64() / runs;
            println!(
                "  {:<22} {:>9.0} {:>10.3} {:>5.1}%",
                s.name,
                s.calls as f64 / runs,
                self_s,
                100.0 * self_s / per_run
            );
        }
    }

    fn line(&self, what: &str) -> String {
        format!(
            "{what}: median {:.3} s (min {:.3} s, {} runs), peak RSS {}",
            self.samples.median_s(),
            self.samples.min_s(),
            self.samples.0.len(),
            size_text(self.peak_rss)
        )
    }
}

/// Runs `measure` with the peak resident set reset first (where the OS allows).
fn measured(
    plan: &BenchPlan,
    measure: impl FnOnce(&BenchPlan) -> Result<Samples, kiln_diffusion::PipelineError>,
) -> anyhow::Result<Option<Measured>> {
    if plan.runs == 0 {
        return Ok(None);
    }
    pbench::reset_peak_rss();
    let samples = measure(plan)?;
    Ok(Some(Measured {
        samples,
        peak_rss: pbench::peak_rss_bytes(),
        spans: plan
            .profiler
            .as_ref()
            .map(SpanProfiler::times)
            .unwrap_or_default(),
    }))
}

/// Times one guided UNet step and one VAE decode of a model loaded by `Pipeline::load`
/// on the CPU; prints medians, minima and the peak resident set of each.
///
/// Blocking: call it off the async runtime.
fn pipeline(options: &BenchPipeline) -> anyhow::Result<()> {
    if options.steps == 0 && options.decodes == 0 {
        bail!("--steps and --decodes are both 0: nothing to measure");
    }
    let load_before = load_average();
    let (_tiny, dir) = match &options.model {
        Some(dir) => (None, dir.clone()),
        None => {
            let dir = std::env::temp_dir().join(format!("kiln-bench-tiny-{}", std::process::id()));
            let guard = TinyFolder(dir.clone());
            kiln_diffusion::write_tiny_model(&dir)
                .with_context(|| format!("writing the tiny model to {}", dir.display()))?;
            (Some(guard), dir)
        }
    };
    let device = candle_core::Device::Cpu;
    let started = Instant::now();
    // candle's modules create their spans when built: load under the profiler.
    let profiler = options.profile.then(SpanProfiler::new);
    let load = || Pipeline::load(&dir, &device);
    let pipeline = match &profiler {
        Some(p) => p.install(load),
        None => load(),
    }
    .with_context(|| format!("loading the model in {}", dir.display()))?;
    pipeline.set_vae_tile(options.vae_tile);
    let load_s = started.elapsed().as_secs_f64();
    let loaded_rss = pbench::rss_bytes();
    let plan = BenchPlan {
        size: options.size,
        guidance: options.guidance,
        runs: options.steps,
        profiler,
    };
    let unet = measured(&plan, |p| pbench::time_unet_step(&pipeline, p))?;
    let decode_plan = BenchPlan {
        runs: options.decodes,
        ..plan
    };
    let vae = measured(&decode_plan, |p| pbench::time_vae_decode(&pipeline, p))?;
    let load_after = load_average();
    let threads = candle_core::utils::get_num_threads();
    let batch = if options.guidance > 1.0 { 2 } else { 1 };
    if options.json {
        println!(
            "{}",
            json!({
                "model": dir.display().to_string(),
                "model_hash": pipeline.model_hash(),
                "size": options.size,
                "vae_tile": options.vae_tile.map(kiln_diffusion::VaeTile::pixels),
                "guidance": options.guidance,
                "unet_batch": batch,
                "threads": threads,
                "load_s": load_s,
                "rss_after_load_bytes": loaded_rss,
                "unet_step": unet.as_ref().map(Measured::json),
                "vae_decode": vae.as_ref().map(Measured::json),
                "load_average_before": load_before,
                "load_average_after": load_after,
            })
        );
    } else {
        let load = |l: Option<[f64; 3]>| {
            l.map_or("unknown".into(), |[a, b, c]| {
                format!("{a:.2} {b:.2} {c:.2}")
            })
        };
        let hash = pipeline.model_hash();
        println!(
            "model {} (hash {})",
            dir.display(),
            &hash[..hash.len().min(12)]
        );
        println!(
            "{size}x{size} px, guidance {g}, {threads} threads; loaded in {load_s:.1} s, RSS {rss}; load average {before} -> {after}",
            size = options.size,
            g = options.guidance,
            rss = size_text(loaded_rss),
            before = load(load_before),
            after = load(load_after),
        );
        if let Some(u) = &unet {
            println!("{}", u.line(&format!("UNet step (batch {batch})")));
            u.print_spans();
        }
        if let Some(v) = &vae {
            println!("{}", v.line("VAE decode"));
            v.print_spans();
        }
    }
    Ok(())
}

/// Writes the SD-1.5-shaped random-weight model to `out`.
///
/// Blocking: call it off the async runtime.
fn sd15_model(out: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    pbench::write_sd15_shaped_model(out)
        .with_context(|| format!("writing the SD-1.5-shaped model to {}", out.display()))?;
    println!(
        "wrote an SD-1.5-shaped random-weight model to {} in {:.0} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
