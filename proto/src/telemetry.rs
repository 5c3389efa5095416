//! Logging and tracing set-up shared by the three binaries, and the W3C
//! `traceparent` that carries a trace across processes.
//!
//! [`init`] sends `tracing` output to stderr and, when an OTLP endpoint is
//! given (`--otlp-endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT`), exports spans
//! at INFO and above over OTLP/gRPC under the binary's service name. Without
//! an endpoint no exporter is built and nothing leaves the process. The
//! [`Telemetry`] guard it returns flushes the spans still queued when it is
//! dropped, so even the short-lived CLI delivers its spans.
//!
//! A trace context crosses gRPC as `traceparent` metadata ([`inject`] on the
//! client side, [`adopt`] on the server side) and is kept with a job as the
//! same string ([`traceparent`], [`adopt_traceparent`]).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

/// The environment variable that names the OTLP endpoint when no flag does.
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// How long one export may take, and how long the exit flush waits.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Set once an exporter runs in this process.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Why the OTLP exporter could not be built.
#[derive(Debug, thiserror::Error)]
#[error("--otlp-endpoint {endpoint}: {message}")]
pub struct TelemetryError {
    /// The endpoint as given.
    endpoint: String,
    /// What the exporter said.
    message: String,
}

/// Flushes and stops the span exporter when dropped (nothing to do without one).
///
/// Drop it before the tokio runtime it was made in: the exporter sends
/// through that runtime.
#[must_use = "spans still queued are lost unless the guard lives until exit"]
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Returns true when spans are exported.
    pub fn is_exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            EXPORTING.store(false, Ordering::Relaxed);
            // Shutting down flushes the queue; bounded so an absent receiver
            // cannot hold the exit.
            if let Err(e) = provider.shutdown_with_timeout(EXPORT_TIMEOUT) {
                tracing::warn!(error = %e, "could not flush the last spans");
            }
        }
    }
}

/// Sends `tracing` output to stderr, filtered by `RUST_LOG` (default
/// `default_filter`), with colours only when stderr is a terminal; and, when
/// `otlp_endpoint` is given, exports spans (INFO and above, whatever
/// `RUST_LOG` says) over OTLP/gRPC as `service`.
///
/// With an endpoint it must run inside a tokio runtime (the gRPC exporter
/// spawns its connection there).
///
/// # Errors
/// When the endpoint is not a URL the exporter accepts.
pub fn init(
    service: &'static str,
    default_filter: &str,
    otlp_endpoint: Option<&str>,
) -> Result<Telemetry, TelemetryError> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let logs = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(filter);
    let endpoint = otlp_endpoint.map(str::trim).filter(|e| !e.is_empty());
    let Some(endpoint) = endpoint else {
        // A second init (tests, the embedded farm) keeps the first subscriber.
        let _ = tracing_subscriber::registry().with(logs).try_init();
        return Ok(Telemetry { provider: None });
    };
    let failed = |message: String| TelemetryError {
        endpoint: kiln_domain::error::quote(endpoint),
        // The exporter's words repeat the URL, which is quoted (cut) above.
        message: message.replace(endpoint, "the URL"),
    };
    if !endpoint.starts_with("http://") {
        return Err(failed(
            "must be an http:// URL of an OTLP/gRPC collector, e.g. http://127.0.0.1:4317".into(),
        ));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| failed(e.to_string()))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service).build())
        .build();
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(service))
        .with_filter(LevelFilter::INFO);
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    if tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init()
        .is_err()
    {
        // Another subscriber is in place: its spans would never reach this exporter.
        return Ok(Telemetry { provider: None });
    }
    EXPORTING.store(true, Ordering::Relaxed);
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// Returns true while this process exports spans.
pub fn is_exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Writes the current span's trace context into outgoing gRPC metadata
/// (nothing when no span is being exported).
pub fn inject(metadata: &mut MetadataMap) {
    if !is_exporting() {
        return;
    }
    let cx = Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(metadata));
}

/// Makes the trace context of incoming gRPC metadata the parent of `span`
/// (nothing when the caller sent none).
pub fn adopt(span: &Span, metadata: &MetadataMap) {
    if !is_exporting() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&MetadataExtractor(metadata));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Returns `span`'s trace context as a W3C `traceparent` value, or None when
/// it is not exported.
pub fn traceparent(span: &Span) -> Option<String> {
    if !is_exporting() {
        return None;
    }
    let mut fields = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut fields);
    fields.remove("traceparent")
}

/// Makes a `traceparent` value (as [`traceparent`] wrote it) the parent of
/// `span`; an empty or malformed value changes nothing.
pub fn adopt_traceparent(span: &Span, value: &str) {
    if !is_exporting() || value.is_empty() {
        return;
    }
    let fields = HashMap::from([("traceparent".to_string(), value.to_string())]);
    let cx = TraceContextPropagator::new().extract(&fields);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Gives the propagator write access to gRPC metadata.
struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Gives the propagator read access to gRPC metadata.
struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_that_is_not_an_http_url_is_refused_in_one_line() {
        for endpoint in ["not a url", "collector:4317", "https://collector:4317"] {
            let e = init("kiln-test", "warn", Some(endpoint))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("--otlp-endpoint \""), "{e}");
            assert!(e.contains("must be an http:// URL"), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
        assert!(!is_exporting());
    }

    #[test]
    fn without_an_endpoint_no_exporter_runs() {
        for endpoint in [None, Some(""), Some("  ")] {
            let guard = init("kiln-test", "warn", endpoint).unwrap();
            assert!(!guard.is_exporting());
            assert!(!is_exporting());
        }
    }

    #[test]
    fn without_an_exporter_nothing_is_written_or_adopted() {
        let mut metadata = MetadataMap::new();
        inject(&mut metadata);
        assert!(metadata.get("traceparent").is_none());
        assert_eq!(traceparent(&Span::none()), None);
    }

    #[test]
    fn metadata_carries_a_traceparent_both_ways() {
        let value = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let fields = HashMap::from([("traceparent".to_string(), value.to_string())]);
        let cx = TraceContextPropagator::new().extract(&fields);
        let mut metadata = MetadataMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(&mut metadata));
        assert_eq!(
            metadata.get("traceparent").and_then(|v| v.to_str().ok()),
            Some(value)
        );
        let back = TraceContextPropagator::new().extract(&MetadataExtractor(&metadata));
        assert_eq!(
            back.span().span_context().trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
    }
}
