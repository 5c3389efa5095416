//! Field errors as gRPC statuses.

use kiln_domain::error::FieldError;

/// Returns `INVALID_ARGUMENT` for a rejected field, its message naming the field.
pub fn invalid_argument(e: FieldError) -> tonic::Status {
    tonic::Status::invalid_argument(e.to_string())
}

/// Turns a domain error into the gRPC status a handler returns.
pub trait IntoStatus {
    /// Returns the status for this error.
    fn into_status(self) -> tonic::Status;
}

impl IntoStatus for FieldError {
    fn into_status(self) -> tonic::Status {
        invalid_argument(self)
    }
}
