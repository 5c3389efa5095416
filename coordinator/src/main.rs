//! `kiln-coordinator`: serves the Farm and WorkerLink gRPC services and the
//! HTTP side door.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use kiln_coordinator::auth::Auth;
use kiln_coordinator::metrics::Metrics;
use kiln_coordinator::results::ResultStore;
use kiln_coordinator::server::{SideDoor, TlsFiles};
use kiln_coordinator::store::{MemoryStore, RedisConfig, RedisStore, Store, redacted};
use kiln_coordinator::webhook::Webhooks;
use kiln_coordinator::{CoordinatorConfig, Core, server};

/// mimalloc rather than glibc malloc: every gRPC call and store transition
/// allocates, and glibc's malloc and free were a fifth of the dispatch
/// path's CPU (ARCHITECTURE.md, "Dispatch rate").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The kiln coordinator: queues jobs, leases tasks to workers, collects results.
#[derive(Parser, Debug)]
#[command(name = "kiln-coordinator", version)]
struct Args {
    /// Address to serve gRPC on (Farm, WorkerLink and health), and the HTTP
    /// side door (/metrics, /healthz, /readyz, /api/v1/queue) unless --http is given.
    #[arg(long, env = "KILN_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Serve the HTTP side door on this address instead; --listen then serves gRPC only.
    #[arg(long, env = "KILN_HTTP", value_name = "ADDR")]
    http: Option<SocketAddr>,
    /// Where finished images and manifests go: a directory, file:///DIR, memory://, or a
    /// bucket: s3://BUCKET/PREFIX (AWS_* variables), gs://BUCKET/PREFIX, az://CONTAINER/PREFIX.
    #[arg(long, env = "KILN_RESULTS", default_value = "kiln-results")]
    results: String,
    /// Where live state is kept: `memory` (this process only, lost when it exits) or
    /// `redis://HOST:PORT/DB` (`rediss://` for TLS), shared by any number of coordinators.
    #[arg(long, env = "KILN_STORE", default_value = "memory")]
    store: String,
    /// Farm name on Redis: keys are `{NAME}:...`, so several farms can share one Redis.
    #[arg(long, env = "KILN_FARM", default_value = "kiln")]
    farm: String,
    /// How long a finished job's live keys stay in Redis (the manifest in the result store stays).
    #[arg(long, env = "KILN_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    retention: Duration,
    /// How long a lease lasts without a heartbeat (a dead worker's task runs elsewhere after this).
    #[arg(long, env = "KILN_LEASE_TTL", default_value = "15s", value_parser = humantime::parse_duration)]
    lease_ttl: Duration,
    /// How often workers heartbeat; must be well under --lease-ttl.
    #[arg(long, env = "KILN_HEARTBEAT_INTERVAL", default_value = "3s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// Attempts that may fail or expire before a task fails for good.
    #[arg(long, env = "KILN_MAX_ATTEMPTS", default_value_t = 5)]
    max_attempts: u32,
    /// How often expired leases are looked for.
    #[arg(long, env = "KILN_REAP_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    reap_interval: Duration,
    /// After start-up, how long a job naming a model no worker has announced
    /// waits for one; and how long queued tasks wait for a live worker holding
    /// their pinned model hash before they fail.
    #[arg(long, env = "KILN_MODEL_GRACE", default_value = "15s", value_parser = humantime::parse_duration)]
    model_grace: Duration,
    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "KILN_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "KILN_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Require every client (CLI and workers) to present a certificate signed
    /// by this CA (PEM): mutual TLS. Needs --tls-cert and --tls-key.
    #[arg(long, env = "KILN_TLS_CLIENT_CA", value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,
    /// Require a token on every call: a TOML file of `[[token]]` entries (name,
    /// sha256 of the token, role, projects) and `[[project]]` limits; read
    /// again on SIGHUP.
    #[arg(long, env = "KILN_AUTH", value_name = "FILE")]
    auth: Option<PathBuf>,
    /// Allow listening on a non-loopback address without --auth (anyone who
    /// can reach the port can submit, lease and cancel).
    #[arg(long)]
    insecure: bool,
    /// Export traces over OTLP/gRPC to this collector URL (e.g. http://127.0.0.1:4317);
    /// nothing is exported when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// POST a JSON summary to this http(s) URL when any job submitted here
    /// ends (repeatable; added to the batch file's `notify`).
    #[arg(long, value_name = "URL")]
    webhook: Vec<String>,
    /// Sign webhook bodies with the secret in this file (its first line):
    /// header `X-Kiln-Signature: sha256=HEX`, the HMAC-SHA256 of the body.
    #[arg(long, env = "KILN_WEBHOOK_SECRET_FILE", value_name = "FILE")]
    webhook_secret_file: Option<PathBuf>,
    /// Let webhooks reach loopback, private and link-local addresses
    /// (refused by default, so a submitter cannot probe the coordinator's network).
    #[arg(long)]
    webhook_allow_private: bool,
    /// How long after a job ends its webhook is retried before kiln gives up.
    #[arg(long, env = "KILN_WEBHOOK_DEADLINE", default_value = "1h", value_parser = humantime::parse_duration)]
    webhook_deadline: Duration,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let telemetry = match kiln_proto::telemetry::init(
        "kiln-coordinator",
        "info",
        args.otlp_endpoint.as_deref(),
    ) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("kiln-coordinator: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln-coordinator: {e:#}");
            std::process::ExitCode::FAILURE
        }
    };
    // Flushes the last spans while the runtime still runs the exporter.
    drop(telemetry);
    code
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.heartbeat_interval >= args.lease_ttl {
        bail!(
            "--heartbeat-interval {} must be shorter than --lease-ttl {}",
            humantime::format_duration(args.heartbeat_interval),
            humantime::format_duration(args.lease_ttl)
        );
    }
    if args.max_attempts == 0 {
        bail!("--max-attempts must be at least 1, got 0");
    }
    if args.auth.is_none() && !args.listen.ip().is_loopback() && !args.insecure {
        bail!(
            "refusing to listen on {} without --auth: anyone could submit, lease and cancel; give --auth FILE, or --insecure to accept that",
            args.listen
        );
    }
    let auth = match &args.auth {
        Some(file) => Auth::open(file)?,
        None => Auth::off(),
    };
    let tls = TlsFiles {
        cert: args.tls_cert.clone(),
        key: args.tls_key.clone(),
        client_ca: args.tls_client_ca.clone(),
    }
    .load()?;
    let tls_mode = match (&tls, &args.tls_client_ca) {
        (None, _) => "off",
        (Some(_), None) => "on",
        (Some(_), Some(_)) => "mutual",
    };
    let config = CoordinatorConfig {
        lease_ttl: args.lease_ttl,
        heartbeat_interval: args.heartbeat_interval,
        max_attempts: args.max_attempts,
        reap_interval: args.reap_interval,
        model_grace: args.model_grace,
        ..CoordinatorConfig::default()
    };
    let secret = match &args.webhook_secret_file {
        Some(file) => Some(Webhooks::read_secret(file)?),
        None => None,
    };
    let webhooks = Webhooks::new(
        args.webhook.clone(),
        secret,
        args.webhook_allow_private,
        args.webhook_deadline,
    )?;
    if !args.webhook.is_empty() && !webhooks.signs() {
        tracing::warn!(
            "--webhook without --webhook-secret-file: receivers cannot tell kiln's POSTs from anyone's"
        );
    }
    let results = ResultStore::open(&args.results)?;
    results
        .check()
        .await
        .with_context(|| format!("--results {}: cannot reach the result store", args.results))?;
    let store: Arc<dyn Store> = if args.store == "memory" {
        Arc::new(MemoryStore::new())
    } else if args.store.starts_with("redis://") || args.store.starts_with("rediss://") {
        let redis = RedisStore::connect(&RedisConfig {
            url: args.store.clone(),
            name: args.farm.clone(),
            retention: args.retention,
        })
        .await
        .with_context(|| format!("--store {}", redacted(&args.store)))?;
        Arc::new(redis)
    } else {
        bail!(
            "--store must be `memory` or a redis://HOST:PORT/DB (rediss:// for TLS) URL, got {:?}",
            redacted(&args.store)
        );
    };
    let mut core = Core::new(store, results, config);
    core.auth = Arc::new(auth);
    core.webhooks = Arc::new(webhooks);
    let core = Arc::new(core);
    if core.auth.is_on() {
        // Installed before serving, so an early SIGHUP reloads rather than kills.
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(hangup) => {
                tokio::spawn(reload_on_hangup(hangup, core.auth.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; restart the coordinator to read --auth again");
            }
        }
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let metrics = Arc::new(Metrics::install().context("cannot install the metrics recorder")?);
    let side_door = match args.http {
        Some(addr) => {
            let http = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--http: cannot listen on {addr}"))?;
            let at = http.local_addr()?.to_string();
            (SideDoor::Separate(http, metrics), at)
        }
        None => (SideDoor::SamePort(metrics), "the gRPC port".to_string()),
    };
    let (side_door, http_at) = side_door;
    tracing::info!(addr = %listener.local_addr()?, http = %http_at, results = %core.results.location(), store = %redacted(&args.store), farm = %args.farm, tls = tls_mode, auth = core.auth.is_on(), "coordinator listening");
    let shutdown = core.shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        shutdown.cancel();
    });
    server::serve(listener, core, tls, side_door).await?;
    Ok(())
}

/// Reads the auth file again on every SIGHUP.
async fn reload_on_hangup(mut hangup: tokio::signal::unix::Signal, auth: Arc<Auth>) {
    while hangup.recv().await.is_some() {
        auth.reload();
    }
}

/// Returns on SIGTERM or SIGINT.
async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the coordinator");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
