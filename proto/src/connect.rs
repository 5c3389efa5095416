//! Client channels to a coordinator, configured the same way everywhere:
//! `http://` URLs in the clear, `https://` URLs over TLS with the system's
//! roots plus an optional extra CA, and a client certificate when one is given.
//! Every client built here sends the caller's token the same way: the
//! [`Bearer`] interceptor adds `authorization: Bearer TOKEN` to each call, and
//! [`read_token`] reads the token from `--token-file` or `KILN_TOKEN`; beside
//! it, [`Outgoing`] adds the caller's W3C `traceparent` when spans are exported.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::MAX_MESSAGE_BYTES;
use crate::error::FieldError;
use crate::pb::farm_client::FarmClient;
use crate::pb::worker_link_client::WorkerLinkClient;

/// How long establishing a connection may take (TCP, then the TLS handshake).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The flag (and its environment variable) that names an extra CA.
pub const CA_FLAG: &str = "--ca (KILN_CA)";
/// The flag (and its environment variable) that names a client certificate.
pub const CERT_FLAG: &str = "--tls-cert (KILN_TLS_CERT)";
/// The flag (and its environment variable) that names a client key.
pub const KEY_FLAG: &str = "--tls-key (KILN_TLS_KEY)";

/// A client's TLS material: PEM files, read when a channel to an `https://`
/// URL is made and ignored for `http://` ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// A CA to trust besides the system's roots (`--ca`, `KILN_CA`).
    pub ca: Option<PathBuf>,
    /// The client certificate chain for mutual TLS (`--tls-cert`, `KILN_TLS_CERT`).
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (`--tls-key`, `KILN_TLS_KEY`).
    pub key: Option<PathBuf>,
}

impl TlsOptions {
    /// Returns the rustls configuration for a connection to `host`.
    ///
    /// # Errors
    /// When a certificate is given without its key or the other way round,
    /// when a file cannot be read or holds no valid PEM (the error names the
    /// flag and the file), or when there is no CA to trust at all.
    pub fn client_config(&self, host: &str) -> Result<ClientTlsConfig, FieldError> {
        let mut config = ClientTlsConfig::new()
            .domain_name(host)
            .timeout(CONNECT_TIMEOUT);
        if rustls_native_certs::load_native_certs().certs.is_empty() {
            if self.ca.is_none() {
                return Err(FieldError::new(
                    CA_FLAG,
                    "this system has no root certificates: name the CA that signed the coordinator's certificate",
                ));
            }
        } else {
            config = config.with_native_roots();
        }
        if let Some(ca) = &self.ca {
            config = config.ca_certificate(read_certificates(CA_FLAG, ca)?);
        }
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                config = config.identity(read_identity(CERT_FLAG, cert, KEY_FLAG, key)?);
            }
            (Some(_), None) => {
                return Err(FieldError::new(
                    KEY_FLAG,
                    "is missing: a client certificate needs its key",
                ));
            }
            (None, Some(_)) => {
                return Err(FieldError::new(
                    CERT_FLAG,
                    "is missing: a client key needs its certificate",
                ));
            }
            (None, None) => {}
        }
        Ok(config)
    }
}

/// Reads a PEM file of one or more certificates.
///
/// # Errors
/// When the file cannot be read or holds no valid certificate; the error
/// names `flag` and the file.
pub fn read_certificates(flag: &str, path: &Path) -> Result<Certificate, FieldError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    let pem = read(flag, path)?;
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        // The parser's own errors quote bytes as numbers: say it in words.
        cert.map_err(|_| {
            FieldError::new(
                flag,
                format!(
                    "{} is not valid PEM: expected -----BEGIN CERTIFICATE----- blocks of base64, each closed by -----END CERTIFICATE-----",
                    path.display()
                ),
            )
        })?;
        count += 1;
    }
    if count == 0 {
        return Err(FieldError::new(
            flag,
            format!(
                "{} holds no certificate (expected -----BEGIN CERTIFICATE-----)",
                path.display()
            ),
        ));
    }
    Ok(Certificate::from_pem(pem))
}

/// Reads a certificate chain and its private key, both PEM.
///
/// # Errors
/// When either file cannot be read or is not valid PEM; the error names the
/// flag and the file, never the key's content.
pub fn read_identity(
    cert_flag: &str,
    cert: &Path,
    key_flag: &str,
    key: &Path,
) -> Result<Identity, FieldError> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;

    let cert_pem = read_certificates(cert_flag, cert)?;
    let key_pem = read(key_flag, key)?;
    // The parser's own error may quote the file; the file is a secret.
    if PrivateKeyDer::from_pem_slice(&key_pem).is_err() {
        return Err(FieldError::new(
            key_flag,
            format!(
                "{} holds no valid PEM private key (PKCS#8, PKCS#1 or SEC1)",
                key.display()
            ),
        ));
    }
    Ok(Identity::from_pem(cert_pem, key_pem))
}

fn read(flag: &str, path: &Path) -> Result<Vec<u8>, FieldError> {
    std::fs::read(path)
        .map_err(|e| FieldError::new(flag, format!("cannot read {}: {e}", path.display())))
}

/// Returns a channel to `url` that connects on first use and reconnects by
/// itself; every call still needs its own deadline. An `https://` URL is
/// served over TLS configured from `tls`; an `http://` one ignores `tls`.
///
/// # Errors
/// When `url` is not a valid http(s) URL (the error names `field`), or, for
/// an `https://` URL, when the TLS material in `tls` is incomplete or invalid.
pub fn channel(field: &str, url: &str, tls: &TlsOptions) -> Result<Channel, FieldError> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(FieldError::new(
            field,
            format!("must be an http:// or https:// URL, got {url:?}"),
        ));
    }
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| FieldError::new(field, format!("invalid URL {url:?}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    if url.starts_with("https://") {
        let host = endpoint
            .uri()
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string())
            .ok_or_else(|| FieldError::new(field, format!("no host in {url:?}")))?;
        endpoint = endpoint
            .tls_config(tls.client_config(&host)?)
            .map_err(|e| FieldError::new(field, format!("TLS: {}", error_chain(&e))))?;
    }
    Ok(endpoint.connect_lazy())
}

/// Returns the messages of `error` and of its sources, joined by `": "`;
/// a source whose message is already in the text is left out.
pub fn error_chain(error: &(dyn Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        let message = e.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        next = e.source();
    }
    text
}

/// Returns true when `error` or one of its sources is a TLS failure: a
/// certificate that was not trusted, an alert from the peer, a handshake
/// that went wrong.
pub fn is_tls_failure(error: &(dyn Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.is::<rustls::Error>() {
            return true;
        }
        // rustls' errors reach the caller inside an io::Error, whose
        // `source` skips the error it wraps.
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// The flag (and its environment variable) that give the caller's token.
pub const TOKEN_FLAG: &str = "--token-file (KILN_TOKEN)";

/// The environment variable that holds the caller's token.
pub const TOKEN_ENV: &str = "KILN_TOKEN";

/// The interceptor of every kiln client: adds `authorization: Bearer TOKEN`
/// to each call when a token was given. Its `Debug` never shows the token.
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Some(_) => "Bearer(***)",
            None => "Bearer(none)",
        })
    }
}

impl Bearer {
    /// No token: calls go out without an `authorization` header.
    pub fn none() -> Self {
        Self(None)
    }

    /// Sends `token` with every call.
    ///
    /// # Errors
    /// When the token is empty or holds characters a header cannot carry
    /// (the error never quotes the token).
    pub fn new(token: &str) -> Result<Self, FieldError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(FieldError::new(TOKEN_FLAG, "the token is empty"));
        }
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}").parse().map_err(|_| {
            FieldError::new(
                TOKEN_FLAG,
                "the token holds characters a header cannot carry (use the token `kiln token new` printed)",
            )
        })?;
        value.set_sensitive(true);
        Ok(Self(Some(value)))
    }

    /// Returns true when a token is sent.
    pub fn is_some(&self) -> bool {
        self.0.is_some()
    }
}

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Reads the caller's token: the first line of `file` (`--token-file`) when
/// given, else the `KILN_TOKEN` environment variable, else none.
///
/// # Errors
/// When the file cannot be read or the token is empty or not header-safe.
pub fn read_token(file: Option<&Path>) -> Result<Bearer, FieldError> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            FieldError::new(TOKEN_FLAG, format!("cannot read {}: {e}", path.display()))
        })?;
        return Bearer::new(text.lines().next().unwrap_or_default());
    }
    match std::env::var(TOKEN_ENV) {
        Ok(token) => Bearer::new(&token),
        Err(_) => Ok(Bearer::none()),
    }
}

/// The interceptor of every kiln client: the [`Bearer`] token, then the
/// trace context of the calling span (`traceparent`, see
/// [`telemetry::inject`](crate::telemetry::inject)).
#[derive(Clone, Debug, Default)]
pub struct Outgoing(Bearer);

impl Interceptor for Outgoing {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let mut request = self.0.call(request)?;
        crate::telemetry::inject(request.metadata_mut());
        Ok(request)
    }
}

/// A channel whose calls carry the caller's token and trace context.
pub type AuthChannel = InterceptedService<Channel, Outgoing>;

/// Returns a Farm client with kiln's message size limits, sending `token`.
pub fn farm_client(channel: Channel, token: Bearer) -> FarmClient<AuthChannel> {
    FarmClient::with_interceptor(channel, Outgoing(token))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Returns a WorkerLink client with kiln's message size limits, sending `token`.
pub fn worker_link_client(channel: Channel, token: Bearer) -> WorkerLinkClient<AuthChannel> {
    WorkerLinkClient::with_interceptor(channel, Outgoing(token))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn options(ca: Option<&str>, cert: Option<&str>, key: Option<&str>) -> TlsOptions {
        TlsOptions {
            ca: ca.map(PathBuf::from),
            cert: cert.map(PathBuf::from),
            key: key.map(PathBuf::from),
        }
    }

    #[tokio::test]
    async fn http_urls_ignore_tls_options() {
        let broken = options(
            Some("/nonexistent/ca.pem"),
            Some("/nonexistent/c.pem"),
            None,
        );
        assert!(channel("--coordinator", "http://127.0.0.1:1", &broken).is_ok());
    }

    #[tokio::test]
    async fn https_urls_check_the_tls_files() {
        let url = "https://localhost:7070";
        let text = channel("--coordinator", url, &options(None, Some("c.pem"), None))
            .unwrap_err()
            .to_string();
        assert!(
            text.starts_with("--tls-key (KILN_TLS_KEY): is missing"),
            "{text}"
        );
        let text = channel("--coordinator", url, &options(None, None, Some("k.pem")))
            .unwrap_err()
            .to_string();
        assert!(
            text.starts_with("--tls-cert (KILN_TLS_CERT): is missing"),
            "{text}"
        );
        let text = channel(
            "--coordinator",
            url,
            &options(Some("/nonexistent/ca.pem"), None, None),
        )
        .unwrap_err()
        .to_string();
        assert!(
            text.starts_with("--ca (KILN_CA): cannot read /nonexistent/ca.pem"),
            "{text}"
        );
    }

    #[test]
    fn error_chains_say_each_cause_once() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "transport error")
            }
        }
        impl Error for Outer {
            fn source(&self) -> Option<&(dyn Error + 'static)> {
                Some(&self.0)
            }
        }
        let tls = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired),
        );
        let outer = Outer(tls);
        assert_eq!(
            error_chain(&outer),
            "transport error: received fatal alert: CertificateRequired"
        );
        assert!(is_tls_failure(&outer));
        let refused = Outer(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(!is_tls_failure(&refused));
    }
}

#[cfg(test)]
mod token_tests {
    use super::*;

    #[test]
    fn the_header_carries_the_token_and_debug_hides_it() {
        let mut bearer = Bearer::new("  secret-token\n").unwrap();
        assert_eq!(format!("{bearer:?}"), "Bearer(***)");
        let request = bearer.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer secret-token"
        );
        let request = Bearer::none().call(tonic::Request::new(())).unwrap();
        assert!(request.metadata().get("authorization").is_none());
    }

    #[test]
    fn empty_and_unsendable_tokens_are_refused_without_quoting_them() {
        assert!(Bearer::new(" ").is_err());
        let e = Bearer::new("zq\u{7}xv").unwrap_err().to_string();
        assert!(!e.contains("zq"), "{e}");
    }

    #[test]
    fn a_token_file_gives_its_first_line() {
        let dir = std::env::temp_dir().join(format!("kiln-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "abc123 \nsecond line\n").unwrap();
        let mut bearer = read_token(Some(&file)).unwrap();
        let request = bearer.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer abc123"
        );
        assert!(read_token(Some(&dir.join("missing"))).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
