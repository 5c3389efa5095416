//! kiln's wire contract.
//!
//! [`pb`] holds the code generated from `proto/kiln/v1/*.proto` (the `Farm`
//! and `WorkerLink` services). Beside it: [`convert`] between the wire
//! messages and kiln's domain types (which live in `kiln-domain` and are
//! re-exported here, [`spec`] among them), client channels with deadlines
//! ([`connect`]), field errors as statuses ([`status`]) and gRPC beside HTTP
//! on one listener ([`side_door`]).
//!
//! This crate may import `kiln-domain`, tonic and prost; nothing of the
//! coordinator, the worker or the engine.
#![warn(missing_docs)]

pub mod connect;
pub mod convert;
pub mod side_door;
pub mod status;
pub mod telemetry;

pub use kiln_domain::{
    error, extras, ids, lora_set, model, preview, prompt, recipe, spec, webhook,
};

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
