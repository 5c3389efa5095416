//! The kiln worker: an [`agent::Agent`] that leases tasks from a coordinator
//! and renders them on a dedicated thread with a [`render::Renderer`]: the
//! candle renderer on top of `kiln-diffusion`, or the `sim` renderer for load
//! tests.
//!
//! [`catalog`] keeps loaded pipelines in memory under a budget, evicting the
//! least recently used. [`model_cache`] fetches models kept in a bucket into
//! a local cache before they are loaded.
//!
//! This crate may import `kiln-proto` (the WorkerLink client), `kiln-domain`,
//! `kiln-diffusion`, `kiln-storage` (buckets), tonic and tokio; never the coordinator, never redis.
#![warn(missing_docs)]

/// The agent loop: register, lease, heartbeat, report.
pub mod agent;
pub mod catalog;
/// Conversions between the worker's types and the wire messages.
pub mod convert;
pub mod device_memory;
/// The gRPC client to the coordinator.
pub mod link;
/// Prometheus metrics of the worker: names, the recorder, the recording functions.
pub mod metrics;
pub mod model_cache;
/// Whether the worker can take work now.
pub mod readiness;
/// The renderers.
pub mod render;
/// The dedicated render thread.
pub mod render_thread;
/// The `--http` side door: /metrics, /healthz, /readyz and gRPC health.
pub mod side_door;
