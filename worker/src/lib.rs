//! The kiln worker: renders the images a kiln coordinator leases to it.
//!
//! [`pipeline`] owns the candle diffusion pipeline: loading a diffusers-layout
//! Stable Diffusion folder, txt2img with portable noise, model content hashes,
//! and the tiny random-weight model tests render with.
#![warn(missing_docs)]

pub mod pipeline;
