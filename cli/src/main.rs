//! `kiln`: submit batches to a kiln render farm, follow them, bring the
//! images back, or run the whole farm in this process with `kiln render`.
//!
//! Exit codes: 0 success; 1 error (bad input, unreachable coordinator, ...);
//! 2 usage error; 3 the job ended but not every item produced an image.

mod client;
mod commands;
mod embedded;
mod format;
mod hub;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kiln_proto::connect::{TlsOptions, read_token};

use crate::client::Farm;
use crate::commands::{
    bench, control, embedding, fetch, inspect, list, lora, model, preprocess, prompt, queue,
    render, submit, token, usage, verify, watch,
};

/// The job ended with items that produced no image.
const EXIT_INCOMPLETE: u8 = 3;

/// kiln: a render farm for diffusion image generation.
#[derive(Parser, Debug)]
#[command(name = "kiln", version, propagate_version = true)]
struct Cli {
    /// The coordinator's URL.
    #[arg(
        long,
        global = true,
        env = "KILN_COORDINATOR",
        default_value = "http://127.0.0.1:7070"
    )]
    coordinator: String,
    /// A CA certificate (PEM) to trust for an https:// coordinator, besides the system's roots.
    #[arg(long, global = true, env = "KILN_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    /// A client certificate (PEM) to present to an https:// coordinator that requires one (mutual TLS).
    #[arg(long, global = true, env = "KILN_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, global = true, env = "KILN_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Read the token to send from the first line of FILE (else from the
    /// KILN_TOKEN environment variable); needed by a coordinator with --auth.
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Export traces over OTLP/gRPC to this collector URL (e.g. http://127.0.0.1:4317);
    /// nothing is exported when unset.
    #[arg(
        long,
        global = true,
        env = "OTEL_EXPORTER_OTLP_ENDPOINT",
        value_name = "URL"
    )]
    otlp_endpoint: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// Every subcommand owns its arguments and its `run`, in `commands/`.
#[derive(Subcommand, Debug)]
enum Command {
    Render(render::Render),
    Submit(submit::Submit),
    Watch(watch::Watch),
    Fetch(fetch::Fetch),
    Jobs(list::Jobs),
    Verify(verify::Verify),
    Tasks(list::Tasks),
    Workers(list::Workers),
    Models(list::Models),
    Cancel(control::Cancel),
    Retry(queue::Retry),
    Pause(queue::Pause),
    Resume(queue::Resume),
    Priority(queue::Priority),
    Usage(usage::Usage),
    Drain(control::Drain),
    Prompt(prompt::Prompt),
    Inspect(inspect::Inspect),
    Model(model::Model),
    Lora(lora::Lora),
    Embedding(embedding::Embedding),
    Preprocess(preprocess::Preprocess),
    Bench(bench::Bench),
    Token(token::Token),
}

/// Small blocks (gRPC, the store, strings) from mimalloc, a render's
/// activations from the C heap that `tune_for_rendering` sets up.
#[global_allocator]
static GLOBAL: kiln_diffusion::allocator::SplitAllocator =
    kiln_diffusion::allocator::SplitAllocator;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before the runtime's threads start: the CLI renders locally and benches the engine.
    let refused = kiln_diffusion::allocator::tune_for_rendering();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kiln: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Declared after the runtime, so dropped (and flushed) before it: the
    // exporter sends through it.
    let _telemetry = {
        let _in_runtime = runtime.enter();
        match kiln_proto::telemetry::init("kiln", "warn", cli.otlp_endpoint.as_deref()) {
            Ok(telemetry) => telemetry,
            Err(e) => {
                eprintln!("kiln: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    kiln_diffusion::allocator::log_refused(&refused);
    match runtime.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_INCOMPLETE),
        Err(e) => {
            if is_broken_pipe(&e) {
                return ExitCode::SUCCESS;
            }
            // The message may carry a hint on a second line, printed as written.
            eprintln!("kiln: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Runs one command; Ok(false) means the job ended with items missing.
async fn run(cli: Cli) -> anyhow::Result<bool> {
    // Only the commands that talk to a coordinator build a client.
    let tls = TlsOptions {
        ca: cli.ca,
        cert: cli.tls_cert,
        key: cli.tls_key,
    };
    let farm = || -> anyhow::Result<Farm> {
        let token = read_token(cli.token_file.as_deref())?;
        Farm::new(&cli.coordinator, &tls, token)
    };
    match cli.command {
        Command::Render(c) => c.run().await,
        Command::Submit(c) => c.run(&farm()?).await,
        Command::Watch(c) => c.run(&farm()?).await,
        Command::Fetch(c) => c.run(&farm()?).await,
        Command::Jobs(c) => c.run(&farm()?).await,
        Command::Verify(c) => c.run(&farm()?).await,
        Command::Tasks(c) => c.run(&farm()?).await,
        Command::Workers(c) => c.run(&farm()?).await,
        Command::Models(c) => c.run(&farm()?).await,
        Command::Cancel(c) => c.run(&farm()?).await,
        Command::Retry(c) => c.run(&farm()?).await,
        Command::Pause(c) => c.run(&farm()?).await,
        Command::Resume(c) => c.run(&farm()?).await,
        Command::Priority(c) => c.run(&farm()?).await,
        Command::Usage(c) => c.run(&farm()?).await,
        Command::Drain(c) => c.run(&farm()?).await,
        Command::Prompt(c) => c.run(),
        Command::Inspect(c) => c.run(),
        Command::Model(c) => c.run().await,
        Command::Lora(c) => c.run(),
        Command::Embedding(c) => c.run(),
        Command::Preprocess(c) => c.run(),
        Command::Bench(c) => c.run().await,
        Command::Token(c) => c.run(),
    }
}
