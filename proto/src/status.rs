//! Field errors as gRPC statuses: the one place where a [`FieldError`]
//! becomes a `tonic::Status`.
//!
//! The field travels twice: in the message, for people and for clients that
//! read no details, and as a `google.rpc.BadRequest` field violation in the
//! status details, so a client can point at the field without parsing text.

use kiln_domain::error::FieldError;
use tonic_types::{ErrorDetails, StatusExt};

/// Longest status message (and field path or description) a server sends.
/// Every quoted value is already cut by `kiln_domain::error::quote`; this
/// guards against a message that joins many. gRPC refuses response metadata
/// over 16 KiB, and then the client sees a broken call instead of the
/// refusal: the message travels percent-encoded (up to three bytes per
/// byte) and the details base64-encoded, so 2 KiB of each stays well under.
pub const MAX_MESSAGE_BYTES: usize = 2048;

/// Returns `INVALID_ARGUMENT` for a rejected field: the message reads
/// `path: message`, and the details carry one `BadRequest` field violation
/// with the path and the message.
pub fn invalid_argument(e: FieldError) -> tonic::Status {
    let path = bounded(e.path);
    let description = bounded(e.message);
    let message = bounded(format!("{path}: {description}"));
    let details = ErrorDetails::with_bad_request_violation(path, description);
    tonic::Status::with_error_details(tonic::Code::InvalidArgument, message, details)
}

/// Cuts `message` to [`MAX_MESSAGE_BYTES`] at a character boundary, marking the cut.
pub fn bounded(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        let mut cut = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push('…');
    }
    message
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
    fn long_messages_are_cut_at_a_character() {
        let status = invalid_argument(FieldError::new("spec", "é".repeat(10_000)));
        assert!(status.message().len() <= MAX_MESSAGE_BYTES + '…'.len_utf8());
        let field = field_error(&status).unwrap();
        assert_eq!(field.path, "spec");
        assert!(field.message.ends_with('…'));
        assert!(field.message.len() <= MAX_MESSAGE_BYTES + '…'.len_utf8());
        assert_eq!(bounded("short".into()), "short");
    }

    #[test]
    fn a_status_without_details_names_no_field() {
        let status = tonic::Status::invalid_argument("items[2].width: must be positive");
        assert_eq!(field_error(&status), None);
    }
}
