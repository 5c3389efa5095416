//! gRPC and HTTP on one listener: requests whose `content-type` starts with
//! `application/grpc` go to the gRPC services, every other request to the
//! HTTP side door (`/metrics`, `/healthz`, ...). The coordinator serves both
//! on its `--listen` port; a worker serves the gRPC health service beside its
//! HTTP endpoints on `--http`.

use std::convert::Infallible;
use std::task::{Context, Poll};

use axum::Router;
use axum::extract::Request;
use axum::routing::future::RouteFuture;
use tonic::service::Routes;

/// The content type of the Prometheus text format, which every `/metrics` answers.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Returns true when `request` is a gRPC call (by its `content-type`).
pub fn is_grpc<B>(request: &http::Request<B>) -> bool {
    request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Returns one set of routes that sends gRPC calls to `grpc` and everything
/// else to `http`, for `tonic::transport::Server::add_routes` (which must
/// `accept_http1` for plain HTTP clients).
pub fn one_port(grpc: Router, http: Router) -> Routes {
    Routes::from(Router::new().fallback_service(Multiplex { grpc, http }))
}

/// The content-type switch of [`one_port`].
#[derive(Clone)]
struct Multiplex {
    grpc: Router,
    http: Router,
}

impl tower_service::Service<Request> for Multiplex {
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = RouteFuture<Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Both routers are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if is_grpc(&request) {
            self.grpc.call(request)
        } else {
            self.http.call(request)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(content_type: Option<&str>) -> http::Request<()> {
        let mut r = http::Request::builder().uri("/kiln.v1.Farm/GetJob");
        if let Some(ct) = content_type {
            r = r.header("content-type", ct);
        }
        r.body(()).unwrap()
    }

    #[test]
    fn grpc_is_told_by_its_content_type() {
        assert!(is_grpc(&request(Some("application/grpc"))));
        assert!(is_grpc(&request(Some("application/grpc+proto"))));
        assert!(!is_grpc(&request(Some("application/json"))));
        assert!(!is_grpc(&request(None)));
    }
}
