//! The kiln coordinator: the `Farm` and `WorkerLink` gRPC services, job
//! admission, the [`store::Store`] that holds all live state, the lease
//! reaper, the model-grace check and result intake.
//!
//! The coordinator keeps no farm state of its own: every transition goes
//! through the store, so replicas can run side by side. Start with
//! [`server::serve`] over a [`core::Core`].
#![warn(missing_docs)]

/// Validates, expands and creates submitted jobs.
pub mod admission;
/// Tokens, roles and project scoping: who is calling and what they may do.
pub mod auth;
/// The wall clock of records, in Unix milliseconds.
pub mod clock;
/// Tunables and their defaults.
pub mod config;
/// Series contact sheets.
pub mod contact_sheet;
/// The job and worker actions both front ends take, behind the caller checks.
pub mod control;
/// Record-to-wire conversions.
pub mod convert;
/// Handles shared by every request handler.
pub mod core;
/// The web dashboard on the HTTP side door.
pub mod dashboard;
/// Why a request failed, and its gRPC status.
pub mod error;
/// The client-facing `Farm` service.
pub mod farm;
/// The HTTP side door: /metrics, /healthz, /readyz, /api/v1/queue.
pub mod http;
/// Manifest lines.
pub mod manifest;
/// Prometheus metrics: names, the recorder, the recording functions.
pub mod metrics;
/// Fails queued tasks whose pinned model hash no live worker holds.
pub mod model_grace;
/// What each model name means and who holds it, as `kiln models` shows it.
pub mod models;
/// The lease reaper.
pub mod reaper;
/// The result store (object_store).
pub mod results;
/// `kiln_rpc_seconds`: a tower layer timing every gRPC call.
pub mod rpc_metrics;
/// Serving both services, health and the HTTP side door.
pub mod server;
/// Live state: the `Store` trait and its implementations.
pub mod store;
/// Verification jobs.
pub mod verify;
/// Signed webhooks when jobs end, delivered from the store's outbox.
pub mod webhook;
/// The worker-facing `WorkerLink` service and result intake.
pub mod worker_link;

pub use config::CoordinatorConfig;
pub use core::Core;
pub use error::CoordinatorError;
