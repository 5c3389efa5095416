//! The worker's Prometheus metrics: every name, help text, label and bucket
//! in one place, the recorder `kiln-worker --http` installs, and the
//! functions the render thread and the candle renderer call.
//!
//! Labels are bounded: model names of the worker's catalog and render
//! outcomes. Without an installed recorder (no `--http`, the embedded farm,
//! tests) every recording function is a no-op.

use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// Seconds to render one task (its whole batch), by model.
pub const RENDER_SECONDS: &str = "kiln_render_seconds";
/// Seconds between two denoising steps, by model.
pub const STEP_SECONDS: &str = "kiln_step_seconds";
/// Models loaded, by model.
pub const MODEL_LOADS: &str = "kiln_model_loads_total";
/// Seconds to load a model.
pub const MODEL_LOAD_SECONDS: &str = "kiln_model_load_seconds";
/// Bytes of weights the loaded models hold.
pub const MODELS_RESIDENT_BYTES: &str = "kiln_models_resident_bytes";
/// Renders that ended, by outcome.
pub const RENDERS: &str = "kiln_renders_total";

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
        Ok(Self { handle })
    }

    /// Returns the Prometheus text exposition.
    pub fn render(&self) -> String {
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

/// Sets the bytes the loaded models hold.
pub fn resident_bytes(bytes: u64) {
    gauge!(MODELS_RESIDENT_BYTES).set(bytes as f64);
}
