//! The kiln worker: an [`agent::Agent`] that leases tasks from a coordinator
//! and renders them on a dedicated thread with a [`render::Renderer`]: the
//! candle diffusion [`pipeline`], or the `sim` renderer for load tests.
//!
//! [`pipeline`] owns the candle diffusion pipeline: loading a diffusers-layout
//! Stable Diffusion folder in f32 or f16, txt2img, img2img and inpainting with
//! portable noise and A1111 prompt weighting, batched renders that keep every
//! task's bytes, model content hashes, and the tiny random-weight model tests
//! render with.
//!
//! [`catalog`] keeps loaded pipelines in memory under a budget, evicting the
//! least recently used; [`pull`] chooses the files of a Hugging Face
//! repository that `kiln model pull` downloads.
#![warn(missing_docs)]

/// The agent loop: register, lease, heartbeat, report.
pub mod agent;
pub mod catalog;
/// The gRPC client to the coordinator.
pub mod link;
/// PNG encoding with metadata chunks.
pub mod output;
pub mod pipeline;
pub mod pull;
/// The renderers.
pub mod render;
/// The dedicated render thread.
pub mod render_thread;
