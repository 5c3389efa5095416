//! Field errors as gRPC statuses: the one place where a [`FieldError`]
//! becomes a `tonic::Status`.
//!
//! The field travels twice: in the message, for people and for clients that
//! read no details, and as a `google.rpc.BadRequest` field violation in the
//! status details, so a client can point at the field without parsing text.

use kiln_domain::error::FieldError;
use tonic_types::{ErrorDetails, StatusExt};

/// Returns `INVALID_ARGUMENT` for a rejected field: the message reads
/// `path: message`, and the details carry one `BadRequest` field violation
/// with the path and the message.
pub fn invalid_argument(e: FieldError) -> tonic::Status {
    let details = ErrorDetails::with_bad_request_violation(e.path.clone(), e.message.clone());
    tonic::Status::with_error_details(tonic::Code::InvalidArgument, e.to_string(), details)
}

/// Returns the first field violation of a status's `BadRequest` details as
/// a [`FieldError`]; None when the status carries none (or cannot be decoded).
pub fn field_error(status: &tonic::Status) -> Option<FieldError> {
    let violation = status
        .get_details_bad_request()?
        .field_violations
        .into_iter()
        .next()?;
    Some(FieldError::new(violation.field, violation.description))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_field_travels_in_the_details() {
        let status = invalid_argument(FieldError::new("items[2].width", "must be positive"));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "items[2].width: must be positive");
        assert_eq!(
            field_error(&status),
            Some(FieldError::new("items[2].width", "must be positive"))
        );
    }

    #[test]
    fn a_status_without_details_names_no_field() {
        let status = tonic::Status::invalid_argument("items[2].width: must be positive");
        assert_eq!(field_error(&status), None);
    }
}
