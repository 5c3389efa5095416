//! A tower layer in front of the gRPC services that records every call in
//! `kiln_rpc_seconds{method,code}`: from the request to the end of the
//! response body, so a stream counts until it ends, with the gRPC code of its
//! trailers (or of a trailers-only answer's headers).
//!
//! The method label is the request path (`/kiln.v1.Farm/SubmitJob`) for
//! every answer but `UNIMPLEMENTED`, which is labelled `unknown`: paths no
//! service serves are not a bounded set.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use tonic::Code;
use tower::{Layer, Service};

use crate::metrics;

/// The layer; see the module docs.
#[derive(Clone, Copy, Debug, Default)]
pub struct RpcMetricsLayer;

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics { inner }
    }
}

/// The service [`RpcMetricsLayer`] wraps around the gRPC routes.
#[derive(Clone, Debug)]
pub struct RpcMetrics<S> {
    inner: S,
}

impl<S, ReqB, ResB> Service<http::Request<ReqB>> for RpcMetrics<S>
where
    S: Service<http::Request<ReqB>, Response = http::Response<ResB>>,
    S::Future: Send + 'static,
    ResB: Body,
{
    type Response = http::Response<TimedBody<ResB>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqB>) -> Self::Future {
        let method = request.uri().path().to_string();
        let started = Instant::now();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            let mut call = Some(Call { method, started });
            // A trailers-only answer (every error tonic sends) carries its
            // code in the headers: the call is over.
            if let Some(code) = grpc_code(response.headers())
                && let Some(c) = call.take()
            {
                c.record(code);
            }
            Ok(response.map(|inner| TimedBody { inner, call }))
        })
    }
}

/// A call whose end is not recorded yet.
struct Call {
    method: String,
    started: Instant,
}

impl Call {
    fn record(self, code: Code) {
        let method = if code == Code::Unimplemented {
            "unknown"
        } else {
            self.method.as_str()
        };
        metrics::rpc(method, code_name(code), self.started.elapsed());
    }
}

/// A response body that records its call when its trailers pass (or, for a
/// body dropped before them, as `CANCELLED`: the client went away).
pub struct TimedBody<B> {
    inner: B,
    call: Option<Call>,
}

impl<B> Drop for TimedBody<B> {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            call.record(Code::Cancelled);
        }
    }
}

impl<B: Body + Unpin> Body for TimedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_code)
                    && let Some(call) = this.call.take()
                {
                    call.record(code);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(call) = this.call.take() {
                    call.record(Code::Internal);
                }
            }
            Poll::Ready(None) => {
                // Ended without a code: gRPC's rule reads that as OK only
                // with trailers; count it as unknown.
                if let Some(call) = this.call.take() {
                    call.record(Code::Unknown);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Reads the `grpc-status` of headers or trailers.
fn grpc_code(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    value.parse::<i32>().ok().map(Code::from_i32)
}

/// Returns the canonical name of a gRPC code (`NOT_FOUND`), the label value.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
