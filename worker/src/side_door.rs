//! The worker's HTTP side door on `--http ADDR` (off by default: one host
//! runs one worker per GPU, and a fixed port would clash):
//!
//! - `GET /healthz`: 200 while the process runs;
//! - `GET /readyz`: 200 once registered with its models loaded, else 503
//!   with the [`Readiness`] reason on one line;
//! - `GET /metrics`: the Prometheus text exposition ([`Metrics`]);
//! - the standard gRPC health service (`grpc.health.v1.Health`) on the same
//!   port, `SERVING` exactly when `/readyz` answers 200.
//!
//! It is open, without tokens: it is meant for the pod or host network
//! (kubelet probes, Prometheus) and tells nothing a render could be
//! reconstructed from.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use kiln_proto::side_door::{METRICS_CONTENT_TYPE, one_port};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic_health::ServingStatus;

use crate::metrics::Metrics;
use crate::readiness::Readiness;

/// What the handlers share.
#[derive(Clone)]
struct Shared {
    readiness: Readiness,
    metrics: Arc<Metrics>,
}

/// Returns the HTTP routes; anything else answers 404.
pub fn router(readiness: Readiness, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(scrape))
        .with_state(Shared { readiness, metrics })
}

async fn readyz(State(s): State<Shared>) -> Response {
    match s.readiness.check() {
        Ok(()) => "ready\n".into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

async fn scrape(State(s): State<Shared>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(METRICS_CONTENT_TYPE),
        )],
        s.metrics.render(),
    )
        .into_response()
}

/// Serves the side door and gRPC health on `listener` until `stop`.
///
/// # Errors
/// When the transport fails.
pub async fn serve(
    listener: TcpListener,
    readiness: Readiness,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let mut changes = readiness.subscribe();
    // The overall service ("") follows readiness.
    let follow = tokio::spawn(async move {
        loop {
            let status = match changes.borrow_and_update().is_none() {
                true => ServingStatus::Serving,
                false => ServingStatus::NotServing,
            };
            reporter.set_service_status("", status).await;
            if changes.changed().await.is_err() {
                return;
            }
        }
    });
    let grpc = Routes::new(health).prepare().into_axum_router();
    let result = tonic::transport::Server::builder()
        .accept_http1(true)
        .add_routes(one_port(grpc, router(readiness, metrics)))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop.cancelled_owned())
        .await;
    follow.abort();
    result
}
