//! kiln's own types and the pure rules every side shares, without the network
//! stack.
//!
//! The coordinator, the worker, the CLI and the diffusion engine all speak
//! these types: id newtypes ([`ids`]), the validated [`recipe::Recipe`], its
//! hash and batch key, the job spec and its one validation ([`spec`]), the
//! batch-file format that becomes a job spec ([`batch`]), the
//! A1111 prompt syntax ([`prompt`]), image checks for init images and masks
//! ([`image`]), the key of a recipe's LoRA set ([`lora_set`]), what a model
//! name means on a farm ([`model`]), a rendered
//! PNG's `parameters` and `kiln` text chunks ([`png_text`]), the shape of live
//! previews ([`preview`]), and
//! [`error::FieldError`], the validation error that names the field and the
//! value.
//!
//! This crate may import serialisation (serde, TOML), hashing and image
//! decoding only. It never depends on tonic, prost, tokio or redis:
//! `kiln-diffusion` builds on it, and any Rust program can embed that without
//! a network stack. The wire
//! types and their conversions to and from these live in `kiln-proto`.
#![warn(missing_docs)]

pub mod batch;
pub mod error;
pub mod extras;
pub mod ids;
pub mod image;
pub mod lora_set;
pub mod model;
pub mod png_text;
pub mod preview;
pub mod prompt;
pub mod recipe;
pub mod spec;
pub mod webhook;
