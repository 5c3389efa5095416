//! Serving: both services, the gRPC health service and the reaper on one listener.

use std::sync::Arc;
use std::time::Duration;

use kiln_proto::MAX_MESSAGE_BYTES;
use kiln_proto::pb::farm_server::FarmServer;
use kiln_proto::pb::worker_link_server::WorkerLinkServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::core::Core;
use crate::farm::FarmService;
use crate::reaper;
use crate::worker_link::WorkerLinkService;

/// Serves the coordinator on `listener` until `core.shutdown` is cancelled.
///
/// # Errors
/// When the transport fails.
pub async fn serve(listener: TcpListener, core: Arc<Core>) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<FarmServer<FarmService>>().await;
    reporter
        .set_serving::<WorkerLinkServer<WorkerLinkService>>()
        .await;
    let farm = FarmServer::new(FarmService::new(core.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let link = WorkerLinkServer::new(WorkerLinkService::new(core.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let reaper = tokio::spawn(reaper::run(core.clone()));
    let shutdown = core.shutdown.clone();
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(health)
        .add_service(farm)
        .add_service(link)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            shutdown.cancelled().await;
            reporter.set_not_serving::<FarmServer<FarmService>>().await;
            reporter
                .set_not_serving::<WorkerLinkServer<WorkerLinkService>>()
                .await;
        })
        .await;
    core.shutdown.cancel();
    let _ = reaper.await;
    result
}
