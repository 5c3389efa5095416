//! An OTLP trace receiver for one test: the gRPC
//! `opentelemetry.proto.collector.trace.v1.TraceService/Export` method on a
//! free loopback port, keeping every span it is sent with its service name.
//! It runs on its own runtime and stops when dropped.

use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// One span as it arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedSpan {
    /// `service.name` of the resource that sent it.
    pub service: String,
    /// The span's name.
    pub name: String,
    /// Trace id, hex.
    pub trace_id: String,
    /// Span id, hex.
    pub span_id: String,
    /// Parent span id, hex; empty for a root.
    pub parent_id: String,
}

/// A running receiver; point `OTEL_EXPORTER_OTLP_ENDPOINT` at [`Receiver::endpoint`].
pub struct Receiver {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    // Dropping the runtime stops the server.
    _runtime: tokio::runtime::Runtime,
}

impl Receiver {
    /// Starts a receiver on a free loopback port.
    ///
    /// # Errors
    /// When no runtime or port can be had.
    pub fn start() -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("receiver runtime")?;
        let spans = Arc::new(Mutex::new(Vec::new()));
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .context("receiver port")?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let service = TraceServiceServer::new(Collector {
            spans: spans.clone(),
        });
        runtime.spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Ok(Self {
            endpoint,
            spans,
            _runtime: runtime,
        })
    }

    /// Returns every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        lock(&self.spans).clone()
    }
}

fn lock(spans: &Mutex<Vec<ReceivedSpan>>) -> MutexGuard<'_, Vec<ReceivedSpan>> {
    spans
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The `TraceService` that records what it is sent.
struct Collector {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    received.push(ReceivedSpan {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex::encode(span.trace_id),
                        span_id: hex::encode(span.span_id),
                        parent_id: hex::encode(span.parent_span_id),
                    });
                }
            }
        }
        lock(&self.spans).extend(received);
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}
