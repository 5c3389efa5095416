//! Client channels to a coordinator, configured the same way everywhere.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::MAX_MESSAGE_BYTES;
use crate::error::FieldError;
use crate::pb::farm_client::FarmClient;
use crate::pb::worker_link_client::WorkerLinkClient;

/// How long establishing a connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Returns a channel to `url` that connects on first use and reconnects by
/// itself; every call still needs its own deadline.
///
/// # Errors
/// When `url` is not a valid http(s) URL; the error names `field`.
pub fn channel(field: &str, url: &str) -> Result<Channel, FieldError> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(FieldError::new(
            field,
            format!("must be an http:// or https:// URL, got {url:?}"),
        ));
    }
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| FieldError::new(field, format!("invalid URL {url:?}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    Ok(endpoint.connect_lazy())
}

/// Returns a Farm client with kiln's message size limits.
pub fn farm_client(channel: Channel) -> FarmClient<Channel> {
    FarmClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Returns a WorkerLink client with kiln's message size limits.
pub fn worker_link_client(channel: Channel) -> WorkerLinkClient<Channel> {
    WorkerLinkClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Attaches a deadline to a request: sent to the server as `grpc-timeout`.
pub fn with_deadline<T>(message: T, deadline: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(deadline);
    request
}

/// Returns true for gRPC codes after which the same call may succeed.
pub fn is_transient(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Cancelled
    )
}
