//! `kiln bench ...`: benchmarks as commands, never as timed tests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kiln_coordinator::store::{MemoryStore, RedisConfig, RedisStore, Store};
use kiln_proto::convert::job_spec_to_pb;
use kiln_proto::pb;
use kiln_proto::spec::{FieldValue, JobSpec, RecipeFields, SweepAxis};
use kiln_worker::agent::LeaseObserver;
use kiln_worker::render::{SimOptions, SimRenderer};
use serde_json::json;

use crate::commands::bench_pipeline::{BenchPipeline, Sd15Model};
use crate::commands::watch;
use crate::embedded::EmbeddedFarm;

/// Benchmarks.
#[derive(clap::Args, Debug)]
pub struct Bench {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(clap::Subcommand, Debug)]
enum BenchCommand {
    Pipeline(BenchPipeline),
    Sd15Model(Sd15Model),
    Schedule(Schedule),
    Dispatch(Dispatch),
}

impl Bench {
    /// Runs `kiln bench ...`.
    pub async fn run(self) -> anyhow::Result<bool> {
        match self.command {
            BenchCommand::Pipeline(c) => c.run().await,
            BenchCommand::Sd15Model(c) => c.run().await,
            BenchCommand::Schedule(c) => schedule(c).await.map(|()| true),
            BenchCommand::Dispatch(c) => dispatch(c).await.map(|()| true),
        }
    }
}

/// Returns a job of `tasks` one-step 64 px items of `model`, seeds 0, 1, 2, ...
fn seed_sweep(name: String, model: &str, prompt: String, tasks: u32) -> JobSpec {
    JobSpec {
        name,
        defaults: RecipeFields {
            model: Some(model.to_string()),
            prompt: Some(prompt),
            steps: Some(1),
            width: Some(64),
            height: Some(64),
            ..Default::default()
        },
        sweep: vec![SweepAxis {
            field: "seed".into(),
            values: (0..i64::from(tasks)).map(FieldValue::Integer).collect(),
            zip: String::new(),
        }],
        ..Default::default()
    }
}

/// Dispatch rate of the coordinator (memory store): sim workers with 0 ms steps.
#[derive(clap::Args, Debug)]
struct Dispatch {
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
}

/// Measures the coordinator's dispatch rate: `workers` sim workers with
/// 0 ms steps run a job of `tasks` one-step items through the embedded farm
/// (memory store, real gRPC on loopback), each leasing up to `slots` tasks at
/// once; prints lease + complete cycles per second, Redis round trips per
/// task, and the CPU time per cycle of this process plus Redis (`INFO cpu`).
async fn dispatch(args: Dispatch) -> anyhow::Result<()> {
    let Dispatch {
        workers,
        slots,
        tasks,
        store,
        json: json_out,
    } = args;
    let store_url = store.as_deref();
    if workers == 0 || tasks == 0 || slots == 0 {
        bail!("--workers, --slots and --tasks must be at least 1");
    }
    let renderer = Arc::new(SimRenderer::new(&["sim".into()], Duration::ZERO));
    let redis = match store_url {
        Some(url) => Some(Arc::new(
            RedisStore::connect(&RedisConfig {
                url: url.to_string(),
                name: format!("bench-{}", uuid::Uuid::new_v4().simple()),
                retention: Duration::from_secs(600),
            })
            .await
            .with_context(|| format!("--store {url}"))?,
        )),
        None => None,
    };
    let store: Arc<dyn Store> = match &redis {
        Some(r) => r.clone(),
        None => Arc::new(MemoryStore::new()),
    };
    let mut farm = EmbeddedFarm::start_coordinator(store).await?;
    farm.slots = slots;
    farm.add_workers((0..workers).map(|_| renderer.clone() as _).collect(), None)
        .await?;
    let trips_before = redis.as_ref().map_or(0, |r| r.round_trips());
    let spec = seed_sweep("bench-dispatch".into(), "sim", "benchmark".into(), tasks);
    let started = Instant::now();
    let resp = farm
        .farm
        .submit(pb::SubmitJobRequest {
            spec: Some(job_spec_to_pb(&spec)),
            idempotency_key: String::new(),
        })
        .await
        .map_err(|s| farm.farm.explain(s))?;
    let submitted = started.elapsed();
    // CPU from here on: the dispatch, not the job's creation.
    let cpu_before = process_cpu_s();
    let redis_cpu_before = match &redis {
        Some(r) => Some(r.server_cpu_s().await?),
        None => None,
    };
    let job = resp.job.context("no job")?;
    let done = watch::follow(&farm.farm, &job.job_id, true).await?;
    let elapsed = started.elapsed();
    let trips = redis.as_ref().map(|r| r.round_trips() - trips_before);
    let process_cpu = process_cpu_s().zip(cpu_before).map(|(a, b)| a - b);
    let redis_cpu = match (&redis, redis_cpu_before) {
        (Some(r), Some(before)) => Some(r.server_cpu_s().await? - before),
        _ => None,
    };
    farm.stop().await?;
    let completed = done.counts.unwrap_or_default().completed;
    let rate = f64::from(completed) / (elapsed - submitted).as_secs_f64();
    let per_task = trips.map(|t| t as f64 / f64::from(completed.max(1)));
    // This process and Redis together (Redis may serve others too).
    let cpu_per_cycle =
        process_cpu.map(|p| (p + redis_cpu.unwrap_or(0.0)) * 1e6 / f64::from(completed.max(1)));
    let store_name = if redis.is_some() { "redis" } else { "memory" };
    if json_out {
        println!(
            "{}",
            json!({"store": store_name, "workers": workers, "tasks": tasks, "completed": completed,
                   "submit_s": submitted.as_secs_f64(), "total_s": elapsed.as_secs_f64(),
                   "cycles_per_s": rate, "redis_round_trips_per_task": per_task,
                   "process_cpu_s": process_cpu, "redis_cpu_s": redis_cpu,
                   "cpu_us_per_cycle": cpu_per_cycle})
        );
    } else {
        let trips = per_task
            .map(|p| format!(", {p:.1} Redis round trips per task"))
            .unwrap_or_default();
        let cpu = cpu_per_cycle
            .map(|c| format!(", {c:.0} µs CPU per cycle"))
            .unwrap_or_default();
        println!(
            "{store_name} store: {completed}/{tasks} tasks by {workers} sim workers: submit {:.2} s, dispatch {:.2} s, {rate:.0} lease+complete cycles/s{trips}{cpu}",
            submitted.as_secs_f64(),
            (elapsed - submitted).as_secs_f64()
        );
    }
    Ok(())
}

/// Returns the CPU time this process has used (user plus system, all
/// threads), in seconds; None where `/proc/self/stat` cannot be read.
fn process_cpu_s() -> Option<f64> {
    // The kernel reports it in USER_HZ ticks, 100 a second on Linux.
    const TICKS_PER_S: f64 = 100.0;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let user: f64 = fields.next()?.parse().ok()?;
    let system: f64 = fields.next()?.parse().ok()?;
    Some((user + system) / TICKS_PER_S)
}

/// The scheduling policy at scale: sim workers holding one model at a time.
#[derive(clap::Args, Debug)]
struct Schedule {
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
    render: Duration,
    /// Time to load a model that is not resident.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    load: Duration,
    /// Run the coordinator on this Redis instead of the memory store.
    #[arg(long)]
    store: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Measures the scheduling policy at scale with sim workers that hold one
/// model at a time: makespan against the ideal (work / workers), model
/// loads, and scheduling latency (Lease calls that brought work).
async fn schedule(opts: Schedule) -> anyhow::Result<()> {
    let json_out = opts.json;
    if opts.workers == 0 || opts.tasks == 0 || opts.models == 0 || opts.jobs == 0 {
        bail!("--workers, --tasks, --models and --jobs must be at least 1");
    }
    let names: Vec<String> = (0..opts.models).map(|m| format!("m{m}")).collect();
    let mut sims = Vec::new();
    let mut renderers: Vec<Arc<dyn kiln_worker::render::Renderer>> = Vec::new();
    for w in 0..opts.workers as usize {
        // Each worker starts with a different model resident, round-robin.
        let mut order = names.clone();
        order.rotate_left(w % names.len());
        let sim = Arc::new(SimRenderer::with_options(
            &order,
            opts.render,
            SimOptions {
                resident_slots: Some(1),
                load_time: opts.load,
                fail: false,
                ..Default::default()
            },
        ));
        sims.push(sim.clone());
        renderers.push(sim);
    }
    let latencies: Arc<std::sync::Mutex<Vec<Duration>>> = Default::default();
    let observer = {
        let latencies = latencies.clone();
        LeaseObserver(Arc::new(move |d, _| {
            if let Ok(mut l) = latencies.lock() {
                l.push(d);
            }
        }))
    };
    let store: Arc<dyn Store> = match &opts.store {
        Some(url) => Arc::new(
            RedisStore::connect(&RedisConfig {
                url: url.clone(),
                name: format!("bench-{}", uuid::Uuid::new_v4().simple()),
                retention: Duration::from_secs(600),
            })
            .await
            .with_context(|| format!("--store {url}"))?,
        ),
        None => Arc::new(MemoryStore::new()),
    };
    // Jobs are submitted before the workers start, so no worker switches
    // models because one job happened to arrive before the others: the
    // submissions wait (the coordinator's model grace) until the first worker
    // announces the models.
    let mut farm = EmbeddedFarm::start_coordinator(store).await?;
    let per_job = opts.tasks / opts.jobs;
    let started = Instant::now();
    let mut submissions = Vec::new();
    for j in 0..opts.jobs {
        let spec = seed_sweep(
            format!("bench-schedule-{j}"),
            &names[(j % opts.models) as usize],
            format!("job {j}"),
            per_job,
        );
        let client = farm.farm.clone();
        submissions.push(tokio::spawn(async move {
            client
                .submit(pb::SubmitJobRequest {
                    spec: Some(job_spec_to_pb(&spec)),
                    idempotency_key: String::new(),
                })
                .await
        }));
    }
    farm.add_workers(renderers, Some(observer)).await?;
    let initial_loads: u64 = sims.iter().map(|s| s.loads()).sum();
    let mut jobs = Vec::new();
    for s in submissions {
        let resp = s
            .await
            .context("a submission panicked")?
            .map_err(|s| farm.farm.explain(s))?;
        jobs.push(resp.job.context("no job")?.job_id);
    }
    for job in &jobs {
        watch::follow(&farm.farm, job, true).await?;
    }
    let makespan = started.elapsed();
    farm.stop().await?;
    let loads = sims.iter().map(|s| s.loads()).sum::<u64>() - initial_loads;
    let total = f64::from(per_job * opts.jobs);
    let ideal = total * opts.render.as_secs_f64() / f64::from(opts.workers);
    let mut lat: Vec<Duration> = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    lat.sort();
    let pct = |p: f64| -> f64 {
        lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let (p50, p90, p99, max) = (pct(0.5), pct(0.9), pct(0.99), pct(1.0));
    if json_out {
        println!(
            "{}",
            json!({"workers": opts.workers, "tasks": total, "models": opts.models, "jobs": opts.jobs,
                   "render_ms": opts.render.as_millis(), "load_ms": opts.load.as_millis(),
                   "makespan_s": makespan.as_secs_f64(), "ideal_s": ideal,
                   "model_loads": loads, "lease_latency_ms": {"p50": p50, "p90": p90, "p99": p99, "max": max}})
        );
    } else {
        println!(
            "{total} tasks, {} jobs, {} models, {} sim workers at {} ms per render ({} ms per model load):",
            opts.jobs,
            opts.models,
            opts.workers,
            opts.render.as_millis(),
            opts.load.as_millis()
        );
        println!(
            "  makespan {:.2} s against an ideal of {ideal:.2} s (work / workers): {:.0}% of ideal",
            makespan.as_secs_f64(),
            100.0 * ideal / makespan.as_secs_f64()
        );
        println!("  model loads after start: {loads} (each worker starts with one model resident)");
        println!(
            "  scheduling latency (Lease calls that brought work, {} calls): p50 {p50:.2} ms, p90 {p90:.2} ms, p99 {p99:.2} ms, max {max:.2} ms",
            lat.len()
        );
    }
    Ok(())
}
