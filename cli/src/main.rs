//! `kiln`: submit batches to a kiln render farm, follow them, bring the
//! images back, or run the whole farm in this process with `kiln render`.
//!
//! Exit codes: 0 success; 1 error (bad input, unreachable coordinator, ...);
//! 2 usage error; 3 the job ended but not every item produced an image.

mod batch;
mod client;
mod commands;
mod embedded;
mod format;
mod hub;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kiln_diffusion::TinyKind;

use crate::client::Farm;
use crate::commands::{
    bench, bench_pipeline, control, fetch, inspect, list, model, prompt, pull, render, submit,
    verify, watch,
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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Render a batch file on a farm run inside this process (no coordinator needed).
    Render {
        /// The batch file (TOML).
        file: PathBuf,
        /// A model, as NAME=DIR (a diffusers-layout folder); repeat for more.
        #[arg(long = "model", value_name = "NAME=DIR", required = true)]
        models: Vec<String>,
        /// Where the images and manifest.jsonl go.
        #[arg(long)]
        out: PathBuf,
        /// Workers rendering in parallel.
        #[arg(long, default_value_t = 1)]
        workers: u32,
        /// Print a JSON summary.
        #[arg(long)]
        json: bool,
    },
    /// Submit a batch file to the coordinator and print the job id.
    Submit {
        /// The batch file (TOML).
        file: PathBuf,
        /// Follow the job until it ends (exit code 3 if any item failed).
        #[arg(long)]
        wait: bool,
        /// With --wait, fetch the results into this folder afterwards.
        #[arg(long, requires = "wait")]
        out: Option<PathBuf>,
        /// Submitting again with the same key returns the same job.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Only validate and show how many tasks it expands to.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Follow a job with a progress bar until it ends (exit 0 only if every item succeeded).
    Watch {
        /// The job id.
        job: String,
        /// Print the final job as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Download a job's finished images and manifest; files already present are skipped.
    Fetch {
        /// The job id.
        job: String,
        /// Where the images and manifest.jsonl go.
        #[arg(long)]
        out: PathBuf,
        /// Print a JSON summary.
        #[arg(long)]
        json: bool,
    },
    /// List jobs, newest first.
    Jobs {
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-render items of a finished job on other workers of its determinism
    /// class and report, per item, byte-identical or not (exit 0 only if all are).
    Verify {
        /// The job id.
        job: String,
        /// How many items to re-render, spread over the job (default: all).
        #[arg(long, default_value_t = 0)]
        sample: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List a job's tasks with their attempt history (worker, epoch, outcome).
    Tasks {
        /// The job id.
        job: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List workers.
    Workers {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job: no more tasks go out, running ones are abandoned.
    Cancel {
        /// The job id.
        job: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Drain a worker: it finishes what it holds and exits.
    Drain {
        /// The worker id.
        worker: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show how a prompt's weights parse and how its tokens fall into encoder chunks.
    Prompt {
        /// The prompt, in AUTOMATIC1111 syntax: (word:1.3), (word), [word], \(, BREAK.
        text: String,
        /// Count tokens with this model folder's tokenizer (default: an estimate by words).
        #[arg(long, value_name = "DIR")]
        model: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the A1111 parameters and the kiln recipe stored in a rendered PNG.
    Inspect {
        /// The PNG file.
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Model tools.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Time one guided UNet step and one VAE decode on the CPU (medians after a warm-up),
    /// with peak memory.
    Pipeline {
        /// The model folder; default: the tiny SD 1.5 model, written to a temporary folder.
        #[arg(long, value_name = "DIR")]
        model: Option<PathBuf>,
        /// Image side in pixels (a multiple of 8).
        #[arg(long, default_value_t = 64)]
        size: u32,
        /// Timed UNet steps (0 skips them).
        #[arg(long, default_value_t = 5)]
        steps: u32,
        /// Timed VAE decodes (0 skips them).
        #[arg(long, default_value_t = 3)]
        decodes: u32,
        /// Guidance scale: above 1 runs the UNet on a batch of two, as txt2img does.
        #[arg(long, default_value_t = 7.5)]
        guidance: f64,
        /// Also print where the time goes: wall time per candle tracing span.
        #[arg(long)]
        profile: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write an SD-1.5-shaped model with random weights (about 4.3 GB) for `bench pipeline`.
    Sd15Model {
        /// The folder to write (outside the repository: it is large).
        #[arg(long)]
        out: PathBuf,
    },
    /// The scheduling policy at scale: sim workers holding one model at a time.
    Schedule {
        /// Sim workers.
        #[arg(long, default_value_t = 200)]
        workers: u32,
        /// Tasks over all jobs.
        #[arg(long, default_value_t = 20_000)]
        tasks: u32,
        /// Distinct models.
        #[arg(long, default_value_t = 3)]
        models: u32,
        /// Jobs (job i uses model i mod models).
        #[arg(long, default_value_t = 10)]
        jobs: u32,
        /// Render time of one task.
        #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
        render: std::time::Duration,
        /// Time to load a model that is not resident.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        load: std::time::Duration,
        /// Run the coordinator on this Redis instead of the memory store.
        #[arg(long)]
        store: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Dispatch rate of the coordinator (memory store): sim workers with 0 ms steps.
    Dispatch {
        /// Sim workers.
        #[arg(long, default_value_t = 50)]
        workers: u32,
        /// Tasks each worker leases and runs at once.
        #[arg(long, default_value_t = 1)]
        slots: u32,
        /// Tasks in the job.
        #[arg(long, default_value_t = 10_000)]
        tasks: u32,
        /// Run the coordinator on this Redis (redis://HOST:PORT/DB) instead of the memory store.
        #[arg(long)]
        store: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ModelCommand {
    /// Write a tiny random-weight model (for tests and trying kiln out).
    Tiny {
        /// The folder to write it to.
        #[arg(long)]
        out: PathBuf,
        /// Its architecture: sd15, sd21 (GELU text encoder, v-prediction), sdxl (two
        /// text encoders, added conditioning) or inpaint (SD 1.5 inpainting UNet).
        #[arg(long, default_value_t = TinyKind::Sd15)]
        kind: TinyKind,
    },
    /// Download a diffusers repository from the Hugging Face hub: only the files kiln reads.
    Pull {
        /// The repository, e.g. stabilityai/sdxl-turbo (gated ones need HF_TOKEN).
        repo: String,
        /// The folder to write it to; run again to resume an interrupted pull.
        #[arg(long)]
        out: PathBuf,
        /// Branch, tag or commit.
        #[arg(long, default_value = "main")]
        revision: String,
        /// Weights precision: fp32 (default) or fp16 (the *.fp16.safetensors variant).
        #[arg(long, default_value = "fp32", value_parser = ["fp32", "fp16"])]
        variant: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    kiln_proto::telemetry::init("warn");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kiln: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_INCOMPLETE),
        Err(e) => {
            if is_broken_pipe(&e) {
                return ExitCode::SUCCESS;
            }
            eprintln!("kiln: {}", first_line(&e));
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Prints the message; a second line (a hint) stays as written.
fn first_line(e: &anyhow::Error) -> String {
    e.to_string()
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Runs one command; Ok(false) means the job ended with items missing.
async fn run(cli: Cli) -> anyhow::Result<bool> {
    let farm = || Farm::new(&cli.coordinator);
    match cli.command {
        Command::Render {
            file,
            models,
            out,
            workers,
            json,
        } => {
            render::run(render::RenderOptions {
                file: &file,
                models: &models,
                out: &out,
                workers,
                json,
            })
            .await
        }
        Command::Submit {
            file,
            wait,
            out,
            idempotency_key,
            dry_run,
            json,
        } => {
            submit::run(
                &farm()?,
                submit::SubmitOptions {
                    file: &file,
                    wait,
                    out,
                    idempotency_key,
                    json,
                    dry_run,
                },
            )
            .await
        }
        Command::Watch { job, json } => {
            let done = watch::follow(&farm()?, &job, json).await?;
            if json {
                println!("{}", format::job_json(&done));
            } else {
                println!("{}", watch::summary_line(&done));
            }
            Ok(done.state == kiln_proto::pb::JobState::Completed as i32)
        }
        Command::Fetch { job, out, json } => {
            let report = fetch::fetch(&farm()?, &job, &out).await?;
            if json {
                println!("{}", serde_json::to_value(&report)?);
            } else {
                println!("{}", fetch::summary_line(&report));
            }
            Ok(true)
        }
        Command::Jobs { limit, json } => list::jobs(&farm()?, limit, json).await.map(|()| true),
        Command::Workers { json } => list::workers(&farm()?, json).await.map(|()| true),
        Command::Tasks { job, json } => list::tasks(&farm()?, &job, json).await.map(|()| true),
        Command::Verify { job, sample, json } => verify::run(&farm()?, &job, sample, json).await,
        Command::Cancel { job, json } => control::cancel(&farm()?, &job, json).await.map(|()| true),
        Command::Drain { worker, json } => {
            control::drain(&farm()?, &worker, json).await.map(|()| true)
        }
        Command::Model {
            command: ModelCommand::Tiny { out, kind },
        } => model::tiny(&out, kind).map(|()| true),
        Command::Bench {
            command:
                BenchCommand::Schedule {
                    workers,
                    tasks,
                    models,
                    jobs,
                    render,
                    load,
                    store,
                    json,
                },
        } => bench::schedule(
            bench::ScheduleOptions {
                workers,
                tasks,
                models,
                jobs,
                render,
                load,
                store,
            },
            json,
        )
        .await
        .map(|()| true),
        Command::Bench {
            command:
                BenchCommand::Dispatch {
                    workers,
                    slots,
                    tasks,
                    store,
                    json,
                },
        } => bench::dispatch(workers, slots, tasks, store.as_deref(), json)
            .await
            .map(|()| true),
        Command::Bench {
            command:
                BenchCommand::Pipeline {
                    model,
                    size,
                    steps,
                    decodes,
                    guidance,
                    profile,
                    json,
                },
        } => {
            let options = bench_pipeline::PipelineOptions {
                model,
                size,
                steps,
                decodes,
                guidance,
                profile,
                json,
            };
            tokio::task::spawn_blocking(move || bench_pipeline::pipeline(&options))
                .await?
                .map(|()| true)
        }
        Command::Bench {
            command: BenchCommand::Sd15Model { out },
        } => tokio::task::spawn_blocking(move || bench_pipeline::sd15_model(&out))
            .await?
            .map(|()| true),
        Command::Prompt { text, model, json } => {
            prompt::run(&text, model.as_deref(), json).map(|()| true)
        }
        Command::Inspect { file, json } => inspect::run(&file, json).map(|()| true),
        Command::Model {
            command:
                ModelCommand::Pull {
                    repo,
                    out,
                    revision,
                    variant,
                },
        } => pull::run(pull::PullOptions {
            repo: &repo,
            revision: &revision,
            out: &out,
            variant: crate::hub::Variant::parse(&variant)?,
        })
        .await
        .map(|()| true),
    }
}
