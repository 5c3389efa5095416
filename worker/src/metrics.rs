//! The worker's Prometheus metrics: every name, help text, label and bucket
//! in one place, the recorder `kiln-worker --http` installs, and the
//! functions the render thread and the candle renderer call.
//!
//! Labels are bounded: model names of the worker's catalog, render
//! outcomes, and the one device of a GPU build. Without an installed
//! recorder (no `--http`, the embedded farm, tests) every recording function
//! is a no-op.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

use crate::device_memory::DeviceMemoryProbe;

/// Seconds to render one task (its whole batch), by model.
pub const RENDER_SECONDS: &str = "kiln_render_seconds";
/// Seconds between two denoising steps, by model.
pub const STEP_SECONDS: &str = "kiln_step_seconds";
/// Models loaded, by model.
pub const MODEL_LOADS: &str = "kiln_model_loads_total";
/// Seconds to load a model.
pub const MODEL_LOAD_SECONDS: &str = "kiln_model_load_seconds";
/// Bytes of weights resident: the loaded models and the merged LoRA variants
/// and ControlNets their pipelines hold (what `--memory-budget` bounds).
pub const MODELS_RESIDENT_BYTES: &str = "kiln_models_resident_bytes";
/// Renders that ended, by outcome.
pub const RENDERS: &str = "kiln_renders_total";
/// Bytes of the GPU's memory, by device and kind ([`DEVICE_MEMORY_KINDS`]);
/// read at each scrape, exported by GPU builds rendering on a GPU only.
pub const DEVICE_MEMORY_BYTES: &str = "kiln_device_memory_bytes";
/// The `kind` labels of [`DEVICE_MEMORY_BYTES`]: bytes in use, bytes the device has.
pub const DEVICE_MEMORY_KINDS: [&str; 2] = ["used", "total"];

/// Buckets of the duration histograms, in seconds: a tiny model's step on a
/// GPU (a few ms) to an SD-XL load from a slow disk (minutes).
const SECONDS_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// How a render ended, as [`RENDERS`] labels it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenderOutcome {
    /// An image.
    Ok,
    /// An error (bad input, model, device, panic).
    Failed,
    /// Stopped on request (the job was cancelled, or the worker aborts).
    Cancelled,
}

impl RenderOutcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// The installed recorder.
pub struct Metrics {
    handle: PrometheusHandle,
    device: OnceLock<Arc<dyn DeviceMemoryProbe>>,
}

impl Metrics {
    /// Installs the process-wide recorder and describes every metric.
    ///
    /// # Errors
    /// When a recorder is already installed.
    pub fn install() -> Result<Self, BuildError> {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
            .install_recorder()?;
        describe_histogram!(
            RENDER_SECONDS,
            "Seconds to render one task (denoise and decode of its whole batch), by model."
        );
        describe_histogram!(
            STEP_SECONDS,
            "Seconds between two denoising steps of a batch, by model."
        );
        describe_counter!(MODEL_LOADS, "Models loaded onto the device, by model.");
        describe_histogram!(MODEL_LOAD_SECONDS, "Seconds to load a model.");
        describe_gauge!(
            MODELS_RESIDENT_BYTES,
            "Bytes of weights the loaded models hold."
        );
        describe_counter!(
            RENDERS,
            "Renders that ended, by outcome (ok, failed, cancelled)."
        );
        for outcome in [
            RenderOutcome::Ok,
            RenderOutcome::Failed,
            RenderOutcome::Cancelled,
        ] {
            counter!(RENDERS, "outcome" => outcome.as_str()).increment(0);
        }
        Ok(Self {
            handle,
            device: OnceLock::new(),
        })
    }

    /// Exports [`DEVICE_MEMORY_BYTES`] of `probe`'s device from now on, read
    /// at each scrape. A worker renders on one device: a second probe is
    /// ignored.
    pub fn watch_device_memory(&self, probe: Arc<dyn DeviceMemoryProbe>) {
        describe_gauge!(
            DEVICE_MEMORY_BYTES,
            "Bytes of the GPU's memory the worker renders on, by device and kind (used: by every process, total)."
        );
        if self.device.set(probe).is_err() {
            tracing::warn!("a second device memory probe is ignored");
        }
    }

    /// Returns the Prometheus text exposition.
    pub fn render(&self) -> String {
        if let Some(probe) = self.device.get() {
            record_device_memory(probe.as_ref());
        }
        self.handle.run_upkeep();
        self.handle.render()
    }
}

/// Records one task's render.
pub fn render(model: &str, took: Duration, outcome: RenderOutcome) {
    if outcome == RenderOutcome::Ok {
        histogram!(RENDER_SECONDS, "model" => model.to_string()).record(took.as_secs_f64());
    }
    counter!(RENDERS, "outcome" => outcome.as_str()).increment(1);
}

/// Counts a render that ended before it started (cancelled while queued).
pub fn render_skipped() {
    counter!(RENDERS, "outcome" => RenderOutcome::Cancelled.as_str()).increment(1);
}

/// Records the time between two denoising steps.
pub fn step(model: &str, took: Duration) {
    histogram!(STEP_SECONDS, "model" => model.to_string()).record(took.as_secs_f64());
}

/// Records a model load.
pub fn model_loaded(model: &str, took: Duration) {
    counter!(MODEL_LOADS, "model" => model.to_string()).increment(1);
    histogram!(MODEL_LOAD_SECONDS).record(took.as_secs_f64());
}

/// Sets [`DEVICE_MEMORY_BYTES`] from a reading of `probe`; when the driver
/// cannot tell, says so and leaves the last reading (none before the first).
fn record_device_memory(probe: &dyn DeviceMemoryProbe) {
    match probe.read() {
        Ok(m) => {
            for (kind, bytes) in DEVICE_MEMORY_KINDS.into_iter().zip([m.used, m.total]) {
                gauge!(DEVICE_MEMORY_BYTES, "device" => probe.device().to_string(), "kind" => kind)
                    .set(bytes as f64);
            }
        }
        Err(e) => tracing::warn!(error = %e, "device memory not exported in this scrape"),
    }
}

/// Sets the bytes resident: models, merged LoRA variants and ControlNets.
pub fn resident_bytes(bytes: u64) {
    gauge!(MODELS_RESIDENT_BYTES).set(bytes as f64);
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::process::{Command, Stdio};
    use std::sync::Mutex;

    use super::*;
    use crate::device_memory::{DeviceMemory, DeviceMemoryError};

    /// A device whose reading the test sets; `None` fails like a lost driver.
    struct FakeDevice(Mutex<Option<DeviceMemory>>);

    impl FakeDevice {
        fn set(&self, reading: Option<DeviceMemory>) {
            *self.0.lock().unwrap() = reading;
        }
    }

    impl DeviceMemoryProbe for FakeDevice {
        fn device(&self) -> &str {
            "cuda:0"
        }

        fn read(&self) -> Result<DeviceMemory, DeviceMemoryError> {
            (*self.0.lock().unwrap()).ok_or_else(|| DeviceMemoryError {
                device: "cuda:0".into(),
                reason: "CUDA_ERROR_UNKNOWN".into(),
            })
        }
    }

    /// The lines of `text` about [`DEVICE_MEMORY_BYTES`].
    fn device_lines(text: &str) -> Vec<&str> {
        text.lines()
            .filter(|l| l.contains(DEVICE_MEMORY_BYTES))
            .collect()
    }

    /// `promtool check metrics` on `text`: `None` when promtool is not installed.
    fn promtool(text: &str) -> Option<(bool, String)> {
        let mut child = match Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => panic!("cannot run promtool: {e}"),
        };
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(text.as_bytes()).unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        let said = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        Some((out.status.success(), said))
    }

    // The only test of this crate that installs the process-wide recorder.
    #[test]
    fn device_memory_is_read_at_each_scrape_once_a_device_is_watched() {
        let metrics = Metrics::install().unwrap();
        assert_eq!(device_lines(&metrics.render()), Vec::<&str>::new());

        let device = Arc::new(FakeDevice(Mutex::new(None)));
        metrics.watch_device_memory(device.clone());
        // The driver cannot tell yet: nothing to export.
        assert_eq!(device_lines(&metrics.render()), Vec::<&str>::new());

        const GIB: u64 = 1 << 30;
        device.set(Some(DeviceMemory {
            used: 3 * GIB,
            total: 80 * GIB,
        }));
        let text = metrics.render();
        let lines = device_lines(&text);
        assert!(
            lines.contains(&"# TYPE kiln_device_memory_bytes gauge"),
            "{text}"
        );
        assert!(
            lines.contains(&"kiln_device_memory_bytes{device=\"cuda:0\",kind=\"used\"} 3221225472"),
            "{text}"
        );
        assert!(
            lines.contains(
                &"kiln_device_memory_bytes{device=\"cuda:0\",kind=\"total\"} 85899345920"
            ),
            "{text}"
        );
        match promtool(&text) {
            None => eprintln!("SKIPPED promtool check: promtool is not installed"),
            Some((ok, said)) => {
                assert!(ok, "promtool rejects the worker's metrics: {said}\n{text}");
                assert!(said.trim().is_empty(), "promtool warns: {said}\n{text}");
            }
        }

        // Each scrape reads again; a failed reading leaves the last one.
        device.set(Some(DeviceMemory {
            used: 5 * GIB,
            total: 80 * GIB,
        }));
        let text = metrics.render();
        assert!(
            text.contains("kiln_device_memory_bytes{device=\"cuda:0\",kind=\"used\"} 5368709120"),
            "{text}"
        );
        device.set(None);
        let text = metrics.render();
        assert!(
            text.contains("kiln_device_memory_bytes{device=\"cuda:0\",kind=\"used\"} 5368709120"),
            "{text}"
        );
    }
}
