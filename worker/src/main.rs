//! `kiln-worker`: leases tasks from a coordinator and renders them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use kiln_diffusion::{ParsePrecisionError, Precision};
use kiln_proto::connect::TlsOptions;
use kiln_proto::ids::WorkerId;
use kiln_worker::agent::{Agent, AgentConfig, Shutdown};
use kiln_worker::catalog::parse_size;
use kiln_worker::device_memory;
use kiln_worker::link::Link;
use kiln_worker::metrics::Metrics;
use kiln_worker::model_cache;
use kiln_worker::readiness::Readiness;
use kiln_worker::render::{
    Assets, CandleRenderer, Renderer, SimOptions, SimRenderer, open_device, parse_controlnet_args,
    parse_model_args, parse_ready_set,
};
use tokio_util::sync::CancellationToken;

/// Small blocks (gRPC, the store, strings) from mimalloc, a render's
/// activations from the C heap that `tune_for_rendering` sets up.
#[global_allocator]
static GLOBAL: kiln_diffusion::allocator::SplitAllocator =
    kiln_diffusion::allocator::SplitAllocator;

/// A kiln worker: keeps its models resident and renders what the coordinator leases to it.
#[derive(Parser, Debug)]
#[command(name = "kiln-worker", version)]
struct Args {
    /// The coordinator's URL.
    #[arg(
        long,
        env = "KILN_COORDINATOR",
        default_value = "http://127.0.0.1:7070"
    )]
    coordinator: String,
    /// A CA certificate (PEM) to trust for an https:// coordinator, besides the system's roots.
    #[arg(long, env = "KILN_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    /// A client certificate (PEM) to present to an https:// coordinator that requires one (mutual TLS).
    #[arg(long, env = "KILN_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "KILN_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Read the worker's token from the first line of FILE (else from the
    /// KILN_TOKEN environment variable); needed by a coordinator with --auth.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// A model to hold, as NAME=DIR (a diffusers-layout folder) or
    /// NAME=s3://BUCKET/models/NAME (pushed by `kiln model push`; needs
    /// --model-cache); repeat for more. The sim renderer takes NAME alone.
    #[arg(long = "model", value_name = "NAME=DIR|URL", required = true)]
    models: Vec<String>,
    /// A folder of LoRAs (`NAME.safetensors`, named by file stem); repeat for more.
    /// Announced with their content hashes: tasks naming a LoRA are routed to
    /// workers that hold it.
    #[arg(
        long = "lora-dir",
        env = "KILN_LORA_DIRS",
        value_delimiter = ',',
        value_name = "DIR"
    )]
    lora_dirs: Vec<PathBuf>,
    /// A folder of textual-inversion embeddings (`NAME.safetensors`); repeat for more.
    #[arg(
        long = "embedding-dir",
        env = "KILN_EMBEDDING_DIRS",
        value_delimiter = ',',
        value_name = "DIR"
    )]
    embedding_dirs: Vec<PathBuf>,
    /// A ControlNet to hold, as NAME=PATH (a diffusers folder or one
    /// .safetensors file); repeat for more.
    #[arg(
        long = "controlnet",
        env = "KILN_CONTROLNETS",
        value_delimiter = ',',
        value_name = "NAME=PATH"
    )]
    controlnets: Vec<String>,
    /// Where models from buckets are downloaded to (one folder per content
    /// hash) and found again on the next start.
    #[arg(long, env = "KILN_MODEL_CACHE", value_name = "DIR")]
    model_cache: Option<PathBuf>,
    /// How images are made: `candle` runs the diffusion pipeline; `sim` is for
    /// load tests only (sleeps --sim-step per step, draws a pattern from the seed).
    #[arg(long, value_enum, default_value_t = RendererKind::Candle)]
    renderer: RendererKind,
    /// Tasks rendered at once (the largest batch).
    #[arg(long, env = "KILN_SLOTS", default_value_t = 1)]
    slots: u32,
    /// Tasks held beyond --slots, waiting behind the renders: a finished
    /// task's report and the next lease then happen while the device renders
    /// instead of between renders. 0 leases only as tasks end.
    #[arg(long, env = "KILN_PREFETCH", default_value_t = kiln_worker::agent::DEFAULT_PREFETCH)]
    prefetch: u32,
    /// This worker's id; defaults to the host name and a random suffix.
    #[arg(long, env = "KILN_WORKER_ID")]
    id: Option<String>,
    /// A label shown by `kiln workers`, as KEY=VALUE; repeat for more.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Where the candle pipeline runs: cpu, cuda, cuda:N (needs the `cuda`
    /// build feature) or metal (needs the `metal` build feature).
    #[arg(long, env = "KILN_DEVICE", default_value = "cpu")]
    device: String,
    /// Most memory the loaded models, their merged LoRA variants and their
    /// ControlNets may hold together, e.g. 8GiB; the least recently used are
    /// evicted to load another. Default: no limit (every model is loaded at
    /// start). Counts weights only: leave room for activations.
    #[arg(long, env = "KILN_MEMORY_BUDGET", value_name = "SIZE", value_parser = parse_budget)]
    memory_budget: Option<u64>,
    /// The dtype of the candle pipeline's weights and arithmetic: f32, or f16 (half
    /// the memory; fast on GPUs, about 2.5x slower on CPUs). Part of the
    /// determinism class: f16 workers render other bytes than f32 ones.
    #[arg(long, env = "KILN_DTYPE", default_value = "f32", value_parser = parse_precision)]
    dtype: Precision,
    /// Decode images larger than PX pixels a side in overlapping tiles of PX
    /// (a multiple of 64), blended over the overlaps as diffusers'
    /// `enable_vae_tiling` does: the decoder's memory stays that of one tile.
    /// Tiled images larger than a tile differ from untiled ones, so the tile
    /// size is part of the determinism class. Default: untiled.
    #[arg(long, env = "KILN_VAE_TILE", value_name = "PX", value_parser = kiln_diffusion::VaeTile::parse)]
    vae_tile: Option<kiln_diffusion::VaeTile>,
    /// After SIGTERM (or Ctrl-C), how long the worker may spend finishing the
    /// tasks in hand before it hands the rest back to the queue and exits. A
    /// second signal hands them back at once.
    #[arg(long, env = "KILN_DRAIN_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Send a live preview of each task (its latents projected to RGB, 64 px
    /// wide) every N denoising steps with the heartbeat; 0 sends none.
    #[arg(long, env = "KILN_PREVIEW_EVERY", value_name = "N", default_value_t = kiln_domain::preview::DEFAULT_EVERY)]
    preview_every: u32,
    /// Sim renderer only: time per denoising step.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    sim_step: Duration,
    /// Sim renderer only: models held at once (default: all); others load on use.
    #[arg(long)]
    sim_resident: Option<usize>,
    /// Sim renderer only: time to load a model that is not resident.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    sim_load: Duration,
    /// Sim renderer only: fail every render (a broken worker, for tests).
    #[arg(long)]
    sim_fail: bool,
    /// Sim renderer only: a LoRA set held ready from the start, as prompt tags
    /// (e.g. `<lora:inkwash:0.7><lora:mira>`) naming LoRAs of --lora-dir;
    /// repeat for more sets.
    #[arg(long, value_name = "TAGS")]
    sim_ready_lora: Vec<String>,
    /// Sim renderer only: LoRA sets held ready at once; a render with another
    /// set makes it ready and drops the least recently used.
    #[arg(long, value_name = "N", default_value_t = kiln_worker::render::DEFAULT_LORA_SLOTS)]
    sim_lora_slots: usize,
    /// Serve /metrics, /healthz, /readyz and the gRPC health service on this
    /// address (off by default: one host runs one worker per GPU).
    #[arg(long, env = "KILN_WORKER_HTTP", value_name = "ADDR")]
    http: Option<SocketAddr>,
    /// Export traces over OTLP/gRPC to this collector URL (e.g. http://127.0.0.1:4317);
    /// nothing is exported when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum RendererKind {
    /// The candle diffusion pipeline.
    Candle,
    /// Simulated renders, for load tests only.
    Sim,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let refused = kiln_diffusion::allocator::tune_for_rendering();
    let telemetry =
        match kiln_proto::telemetry::init("kiln-worker", "info", args.otlp_endpoint.as_deref()) {
            Ok(telemetry) => telemetry,
            Err(e) => {
                eprintln!("kiln-worker: {e}");
                return std::process::ExitCode::FAILURE;
            }
        };
    kiln_diffusion::allocator::log_refused(&refused);
    let code = match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln-worker: {e:#}");
            std::process::ExitCode::FAILURE
        }
    };
    // Flushes the last spans while the runtime still runs the exporter.
    drop(telemetry);
    code
}

async fn run(args: Args) -> anyhow::Result<()> {
    let token = kiln_proto::connect::read_token(args.token_file.as_deref())?;
    if args.slots == 0 {
        bail!("--slots must be at least 1, got 0");
    }
    let worker_id = match &args.id {
        Some(id) => WorkerId::parse_field("--id", id)?,
        None => WorkerId(default_id()),
    };
    let mut labels = BTreeMap::new();
    for l in &args.labels {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("--label must be KEY=VALUE, got {l:?}"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    let readiness = Readiness::default();
    let shutdown = Shutdown::default();
    let stop_http = CancellationToken::new();
    // Listening before the models load, so probes see a live process that
    // is not ready yet.
    let metrics = match args.http {
        Some(_) => Some(Arc::new(
            Metrics::install().context("cannot install the metrics recorder")?,
        )),
        None => None,
    };
    let side_door = match (args.http, &metrics) {
        (Some(addr), Some(metrics)) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--http: cannot listen on {addr}"))?;
            tracing::info!(addr = %listener.local_addr()?, "HTTP side door listening");
            Some(tokio::spawn(kiln_worker::side_door::serve(
                listener,
                readiness.clone(),
                metrics.clone(),
                stop_http.clone(),
            )))
        }
        _ => None,
    };
    let controlnets = parse_controlnet_args(&args.controlnets)?;
    let (lora_dirs, embedding_dirs) = (args.lora_dirs.clone(), args.embedding_dirs.clone());
    let assets = tokio::task::spawn_blocking(move || {
        Assets::scan(&lora_dirs, &embedding_dirs, &controlnets)
    })
    .await
    .context("asset scanning stopped")?
    .context("--lora-dir, --embedding-dir or --controlnet")?;
    let assets = Arc::new(assets);
    if !assets.is_empty() {
        tracing::info!(
            loras = ?assets.loras.keys().collect::<Vec<_>>(),
            embeddings = ?assets.embeddings.keys().collect::<Vec<_>>(),
            controlnets = ?assets.controlnets.keys().collect::<Vec<_>>(),
            "assets found"
        );
    }
    let renderer: Arc<dyn Renderer> = match args.renderer {
        RendererKind::Sim => {
            let names: Vec<String> = args
                .models
                .iter()
                .map(|m| m.split_once('=').map_or(m.as_str(), |(n, _)| n).to_string())
                .collect();
            let ready_sets = args
                .sim_ready_lora
                .iter()
                .map(|tags| parse_ready_set("--sim-ready-lora", tags, &assets))
                .collect::<Result<Vec<_>, _>>()?;
            Arc::new(SimRenderer::with_options(
                &names,
                args.sim_step,
                SimOptions {
                    resident_slots: args.sim_resident,
                    load_time: args.sim_load,
                    fail: args.sim_fail,
                    assets,
                    ready_sets,
                    lora_slots: args.sim_lora_slots,
                },
            ))
        }
        RendererKind::Candle => {
            let models = model_cache::resolve(&args.models, args.model_cache.as_deref()).await?;
            let models = parse_model_args(&models)?;
            let device = open_device(&args.device)?;
            if let (Some(metrics), Some(probe)) = (&metrics, device_memory::probe(&device)) {
                metrics.watch_device_memory(probe);
            }
            let (budget, precision, tile) = (args.memory_budget, args.dtype, args.vae_tile);
            let mut renderer = tokio::task::spawn_blocking(move || {
                CandleRenderer::open_with(&models, &device, precision, budget, assets)
            })
            .await
            .context("model loading stopped")??;
            renderer.set_vae_tile(tile);
            Arc::new(renderer)
        }
    };
    let tls = TlsOptions {
        ca: args.ca.clone(),
        cert: args.tls_cert.clone(),
        key: args.tls_key.clone(),
    };
    let link = Link::new(&args.coordinator, &tls, token)?;
    let agent = Agent::new(
        link,
        renderer,
        AgentConfig {
            worker_id: worker_id.clone(),
            slots: args.slots,
            prefetch: args.prefetch,
            labels,
            lease_observer: None,
            readiness: readiness.clone(),
            preview_every: args.preview_every,
        },
    )?;
    readiness.not_ready("models loaded; registering with the coordinator");
    tokio::spawn(signals(shutdown.clone(), args.drain_timeout));
    tracing::info!(worker = %worker_id, coordinator = %args.coordinator, renderer = ?args.renderer, "worker starting");
    let result = agent.run(shutdown.clone()).await;
    if let Some(side_door) = side_door {
        // The side door answers until the agent is done; then it stops too.
        stop_http.cancel();
        if let Ok(Err(e)) = side_door.await {
            tracing::warn!(error = %e, "the HTTP side door failed");
        }
    }
    result?;
    Ok(())
}

/// Parses `--dtype` for clap.
fn parse_precision(text: &str) -> Result<Precision, String> {
    text.parse().map_err(|e: ParsePrecisionError| e.to_string())
}

/// Parses `--memory-budget` for clap.
fn parse_budget(text: &str) -> Result<u64, String> {
    parse_size(text).map_err(|e| e.to_string())
}

/// Returns `<host>-<4 hex digits>`: unique per process, readable in `kiln workers`.
fn default_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".to_string());
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..4];
    format!("{host}-{suffix}")
}

/// First SIGTERM or Ctrl-C drains (stop leasing, finish the tasks in hand);
/// a second one, or `drain_timeout` after the first, aborts (hand the tasks
/// in hand back to the queue now, then exit).
async fn signals(shutdown: Shutdown, drain_timeout: Duration) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        tracing::warn!("cannot listen for SIGTERM");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!(
        drain_timeout = %humantime::format_duration(drain_timeout),
        "draining: finishing the tasks in hand (signal again to hand them back now)"
    );
    shutdown.drain.cancel();
    tokio::select! {
        _ = term.recv() => {
            tracing::warn!("second signal: handing the tasks in hand back");
        }
        _ = tokio::signal::ctrl_c() => {
            tracing::warn!("second signal: handing the tasks in hand back");
        }
        _ = tokio::time::sleep(drain_timeout) => {
            tracing::warn!("drain timeout: handing the tasks still in hand back");
        }
    }
    shutdown.abort.cancel();
}
