//! kiln's wire contract and the pure helpers every side shares.
//!
//! [`pb`] holds the code generated from `proto/kiln/v1/*.proto` (the `Farm`
//! and `WorkerLink` services). Beside it live the domain types that the
//! coordinator, the worker and the CLI use instead of passing prost structs
//! around: id newtypes ([`ids`]), the validated [`recipe::Recipe`] and its hash,
//! job expansion ([`spec`]), the prompt-weighting parser ([`prompt`]), and
//! [`error::FieldError`], the validation error that names the field and the
//! value.
#![warn(missing_docs)]

pub mod blob;
pub mod connect;
pub mod error;
pub mod ids;
pub mod prompt;
pub mod recipe;
pub mod spec;
pub mod telemetry;

pub use prost;
pub use tonic;

/// Generated kiln.v1 messages, clients and servers.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("kiln.v1");

    /// The encoded file descriptor set of kiln.v1, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/kiln_descriptor.bin"));
}

/// Largest gRPC message kiln sends or accepts: a 2048x2048 RGB PNG of noise is
/// about 12 MiB, and a Complete carries one plus a little metadata.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
