//! Serving: both services (behind the [`Authenticate`] interceptor), the gRPC
//! health service, the reaper and the model-grace check on one listener, in
//! the clear or over TLS (with client certificates for mutual TLS), timed by
//! [`RpcMetricsLayer`]; the HTTP side door ([`crate::http`]) on the same port
//! (requests that are not gRPC, told by their content type: [`one_port`]) or
//! on its own.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kiln_proto::MAX_MESSAGE_BYTES;
use kiln_proto::connect::{CERT_FLAG, KEY_FLAG, error_chain, read_certificates, read_identity};
use kiln_proto::error::FieldError;
use kiln_proto::pb::farm_server::FarmServer;
use kiln_proto::pb::worker_link_server::WorkerLinkServer;
use kiln_proto::side_door::one_port;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::ServerTlsConfig;

use crate::auth::{Authenticate, Service};
use crate::core::Core;
use crate::farm::FarmService;
use crate::http;
use crate::metrics::Metrics;
use crate::rpc_metrics::RpcMetricsLayer;
use crate::worker_link::WorkerLinkService;
use crate::{model_grace, reaper, webhook};

/// The flag (and its environment variable) that names the CA of client certificates.
pub const CLIENT_CA_FLAG: &str = "--tls-client-ca (KILN_TLS_CLIENT_CA)";

/// The coordinator's TLS files (PEM), as given on its command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain (`--tls-cert`).
    pub cert: Option<PathBuf>,
    /// The certificate's private key (`--tls-key`).
    pub key: Option<PathBuf>,
    /// The CA that must have signed every client's certificate (`--tls-client-ca`).
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// Reads and checks the files: `None` serves in the clear.
    ///
    /// # Errors
    /// When a certificate is given without its key or the other way round,
    /// a client CA without a server certificate, or when a file cannot be
    /// read or is not valid PEM (the error names the flag and the file), or
    /// when rustls refuses the pair (a key that is not the certificate's).
    pub fn load(&self) -> Result<Option<ServerTlsConfig>, FieldError> {
        let (cert, key) = match (&self.cert, &self.key) {
            (None, None) => {
                return match self.client_ca {
                    Some(_) => Err(FieldError::new(
                        CERT_FLAG,
                        "is missing: --tls-client-ca needs TLS, which needs --tls-cert and --tls-key",
                    )),
                    None => Ok(None),
                };
            }
            (Some(_), None) => {
                return Err(FieldError::new(
                    KEY_FLAG,
                    "is missing: --tls-cert needs its private key",
                ));
            }
            (None, Some(_)) => {
                return Err(FieldError::new(
                    CERT_FLAG,
                    "is missing: --tls-key needs its certificate",
                ));
            }
            (Some(cert), Some(key)) => (cert, key),
        };
        // rustls needs one process-wide crypto provider; a second install is a no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut config =
            ServerTlsConfig::new().identity(read_identity(CERT_FLAG, cert, KEY_FLAG, key)?);
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(read_certificates(CLIENT_CA_FLAG, ca)?);
        }
        // Builds the rustls configuration once now, so a key that does not
        // match its certificate stops the start instead of every handshake.
        tonic::transport::Server::builder()
            .tls_config(config.clone())
            .map_err(|e| {
                FieldError::new(
                    format!("{CERT_FLAG} and {KEY_FLAG}"),
                    format!(
                        "{} and {} are not a usable pair: {}",
                        cert.display(),
                        key.display(),
                        std::error::Error::source(&e).map_or_else(|| e.to_string(), error_chain)
                    ),
                )
            })?;
        Ok(Some(config))
    }
}

/// Where the HTTP side door ([`crate::http`]) is served.
pub enum SideDoor {
    /// Nowhere: gRPC only (the embedded farm of `kiln render`).
    Off,
    /// On the gRPC listener: requests that are not gRPC go to HTTP.
    SamePort(Arc<Metrics>),
    /// On its own listener (`--http`); the gRPC listener stays gRPC-only.
    Separate(TcpListener, Arc<Metrics>),
}

/// Serves the coordinator on `listener` until `core.shutdown` is cancelled,
/// over TLS when `tls` is given, with the HTTP side door where `side_door`
/// says (over the same TLS when it shares the port).
///
/// # Errors
/// When the TLS configuration is refused or the transport fails.
pub async fn serve(
    listener: TcpListener,
    core: Arc<Core>,
    tls: Option<ServerTlsConfig>,
    side_door: SideDoor,
) -> Result<(), tonic::transport::Error> {
    let mut builder = tonic::transport::Server::builder();
    // The dashboard's cookies are `Secure` where it is served over TLS.
    let over_tls = tls.is_some();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<FarmServer<FarmService>>().await;
    reporter
        .set_serving::<WorkerLinkServer<WorkerLinkService>>()
        .await;
    // Every call of both services passes the one interceptor that turns its
    // token into a caller; health stays open.
    let farm = InterceptedService::new(
        FarmServer::new(FarmService::new(core.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        Authenticate::new(core.auth.clone(), Service::Farm),
    );
    let link = InterceptedService::new(
        WorkerLinkServer::new(WorkerLinkService::new(core.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        Authenticate::new(core.auth.clone(), Service::WorkerLink),
    );
    // Every gRPC call is timed into kiln_rpc_seconds (a no-op without a recorder).
    let grpc = Routes::new(health)
        .add_service(farm)
        .add_service(link)
        .prepare()
        .into_axum_router()
        .layer(RpcMetricsLayer);
    let (routes, accept_http1, separate) = match side_door {
        SideDoor::Off => (Routes::from(grpc), false, None),
        SideDoor::SamePort(metrics) => (
            one_port(grpc, http::router(core.clone(), metrics, over_tls)),
            true,
            None,
        ),
        SideDoor::Separate(http_listener, metrics) => (
            Routes::from(grpc),
            false,
            Some(tokio::spawn(serve_http(
                http_listener,
                http::router(core.clone(), metrics, false),
                core.shutdown.clone(),
            ))),
        ),
    };
    let reaper = tokio::spawn(reaper::run(core.clone()));
    let model_grace = tokio::spawn(model_grace::run(core.clone()));
    let webhooks = tokio::spawn(webhook::run(core.clone()));
    let shutdown = core.shutdown.clone();
    let result = builder
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        // Plain HTTP/1.1 clients (probes, curl) reach the side door; gRPC
        // needs HTTP/2 and gets it.
        .accept_http1(accept_http1)
        .add_routes(routes)
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
    if let Some(http) = separate {
        let _ = http.await;
    }
    let _ = model_grace.await;
    let _ = webhooks.await;
    result
}

/// Serves the side door alone on `listener` (`--http`) until `shutdown`.
async fn serve_http(listener: TcpListener, router: axum::Router, shutdown: CancellationToken) {
    let result = axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "the HTTP side door stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(cert: Option<&str>, key: Option<&str>, client_ca: Option<&str>) -> TlsFiles {
        TlsFiles {
            cert: cert.map(PathBuf::from),
            key: key.map(PathBuf::from),
            client_ca: client_ca.map(PathBuf::from),
        }
    }

    fn refusal(files: &TlsFiles) -> String {
        files.load().unwrap_err().to_string()
    }

    #[test]
    fn no_files_serve_in_the_clear() {
        assert!(files(None, None, None).load().unwrap().is_none());
    }

    #[test]
    fn a_certificate_without_its_key_or_a_key_without_its_certificate_is_refused() {
        let text = refusal(&files(Some("server.pem"), None, None));
        assert!(
            text.starts_with("--tls-key (KILN_TLS_KEY): is missing"),
            "{text}"
        );
        let text = refusal(&files(None, Some("server-key.pem"), None));
        assert!(
            text.starts_with("--tls-cert (KILN_TLS_CERT): is missing"),
            "{text}"
        );
        let text = refusal(&files(None, None, Some("ca.pem")));
        assert!(
            text.starts_with("--tls-cert (KILN_TLS_CERT): is missing"),
            "{text}"
        );
        for text in [
            refusal(&files(Some("server.pem"), None, None)),
            refusal(&files(None, None, Some("ca.pem"))),
        ] {
            assert!(!text.contains('\n'), "one line: {text}");
        }
    }

    #[test]
    fn unreadable_and_invalid_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let (missing, garbage) = (missing.to_str().unwrap(), garbage.to_str().unwrap());

        let text = refusal(&files(Some(missing), Some(garbage), None));
        assert!(
            text.starts_with("--tls-cert (KILN_TLS_CERT): cannot read"),
            "{text}"
        );
        assert!(text.contains(missing), "{text}");

        let text = refusal(&files(Some(garbage), Some(missing), None));
        assert!(text.starts_with("--tls-cert (KILN_TLS_CERT):"), "{text}");
        assert!(
            text.contains(garbage) && text.contains("no certificate"),
            "{text}"
        );
        assert!(!text.contains('\n'), "one line: {text}");
    }
}
