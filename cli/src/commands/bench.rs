//! `kiln bench ...`: benchmarks as commands, never as timed tests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kiln_coordinator::store::{
    MemoryStore, ModelInfo, RedisConfig, RedisStore, Store, WorkerRegistration,
};
use kiln_proto::convert::job_spec_to_pb;
use kiln_proto::ids::WorkerId;
use kiln_proto::pb;
use kiln_proto::spec::{FieldValue, JobSpec, RecipeFields, SweepAxis};
use kiln_worker::agent::LeaseObserver;
use kiln_worker::render::{
    Assets, PreviewSink, RenderError, RenderTask, Rendered, Renderer, SimOptions, SimRenderer,
};
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
    /// Tasks each worker renders at once.
    #[arg(long, default_value_t = 1)]
    slots: u32,
    /// Tasks each worker holds beyond its slots (kiln-worker's --prefetch).
    #[arg(long, default_value_t = kiln_worker::agent::DEFAULT_PREFETCH)]
    prefetch: u32,
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
/// (memory store, real gRPC on loopback), each rendering `slots` tasks at
/// once and holding `prefetch` more; prints lease + complete cycles per second, Redis round trips per
/// task, and the CPU time per cycle of this process plus Redis (`INFO cpu`).
async fn dispatch(args: Dispatch) -> anyhow::Result<()> {
    let Dispatch {
        workers,
        slots,
        prefetch,
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
    farm.prefetch = prefetch;
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
            json!({"store": store_name, "workers": workers, "slots": slots, "prefetch": prefetch, "tasks": tasks, "completed": completed,
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
            "{store_name} store: {completed}/{tasks} tasks by {workers} sim workers ({slots} slots, prefetch {prefetch}): submit {:.2} s, dispatch {:.2} s, {rate:.0} lease+complete cycles/s{trips}{cpu}",
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
    /// Tasks each sim worker holds beyond the one it renders (kiln-worker's
    /// --prefetch; 0: it leases only when a render ends).
    #[arg(long, default_value_t = kiln_worker::agent::DEFAULT_PREFETCH)]
    prefetch: u32,
    /// Stop this long after the first lease and report the rate reached
    /// instead of the makespan (for farms too large to run to the end).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Run the coordinator on this Redis instead of the memory store.
    #[arg(long)]
    store: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Holds every render until the bench opens it, so that the clock starts
/// with every worker registered and holding its first task.
#[derive(Default)]
struct StartGate {
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
}

impl StartGate {
    /// Blocks the render thread until the gate is open.
    fn wait(&self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        while !*open {
            open = self.opened.wait(open).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn open(&self) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.opened.notify_all();
    }
}

/// A sim renderer whose renders wait for the [`StartGate`].
struct Gated {
    sim: Arc<SimRenderer>,
    gate: Arc<StartGate>,
    /// When each render call began (past the gate) and returned, in order:
    /// what the worker did with its time, for the breakdown.
    spans: std::sync::Mutex<Vec<(Instant, Instant)>>,
}

impl Gated {
    /// Runs `render` past the gate, recording when it began and returned.
    fn timed<T>(&self, render: impl FnOnce() -> T) -> T {
        self.gate.wait();
        let began = Instant::now();
        let out = render();
        let ended = Instant::now();
        self.spans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((began, ended));
        out
    }
}

impl Renderer for Gated {
    fn models(&self) -> Vec<kiln_worker::render::ModelInfo> {
        self.sim.models()
    }

    fn determinism_class(&self) -> String {
        self.sim.determinism_class()
    }

    fn assets(&self) -> Arc<Assets> {
        self.sim.assets()
    }

    fn resident(&self) -> Vec<String> {
        self.sim.resident()
    }

    fn render(
        &self,
        task: &RenderTask,
        on_step: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Rendered, RenderError> {
        self.timed(|| self.sim.render(task, on_step))
    }

    fn render_batch(
        &self,
        tasks: &[RenderTask],
        on_step: &mut dyn FnMut(usize, u32) -> bool,
    ) -> Vec<Result<Rendered, RenderError>> {
        self.timed(|| self.sim.render_batch(tasks, on_step))
    }

    fn render_batch_with_previews(
        &self,
        tasks: &[RenderTask],
        on_step: &mut dyn FnMut(usize, u32) -> bool,
        previews: &mut PreviewSink<'_>,
    ) -> Vec<Result<Rendered, RenderError>> {
        self.timed(|| {
            self.sim
                .render_batch_with_previews(tasks, on_step, previews)
        })
    }
}

/// Where the workers' time went between the start and the end of a run,
/// summed over workers, in seconds.
#[derive(Debug, Default)]
struct TimeSpent {
    /// Inside render calls (renders, loads, the PNG encode).
    rendering: f64,
    /// Between one render call's return and the next one's start: the
    /// report, the next lease and the hand-over to the render thread.
    between: f64,
    /// Gaps counted in `between`.
    gaps: u64,
    /// From the start to a worker's first render.
    before_first: f64,
    /// From a worker's last render to the end.
    after_last: f64,
}

/// Sums what `spans` (each worker's render calls, in order) say about the
/// time from `start` to `end`.
fn time_spent(spans: &[Vec<(Instant, Instant)>], start: Instant, end: Instant) -> TimeSpent {
    let mut t = TimeSpent::default();
    for worker in spans {
        let Some((first, last)) = worker.first().zip(worker.last()) else {
            t.after_last += (end - start).as_secs_f64();
            continue;
        };
        t.before_first += first.0.saturating_duration_since(start).as_secs_f64();
        t.after_last += end.saturating_duration_since(last.1).as_secs_f64();
        for (i, (began, ended)) in worker.iter().enumerate() {
            t.rendering += (*ended - *began).as_secs_f64();
            if let Some((next, _)) = worker.get(i + 1) {
                t.between += next.saturating_duration_since(*ended).as_secs_f64();
                t.gaps += 1;
            }
        }
    }
    t
}

/// Returns the fewest model loads with which `workers` workers can finish
/// the work in the ideal makespan (total work / workers): each model needs
/// `tasks_per_model[m] * workers / total` workers busy for the whole
/// makespan (its work over the ideal makespan); those that start with it
/// resident (`initial_holders[m]`) need no load, and every other worker
/// that helps loads it once, so the bound is the sum over models of the
/// workers needed beyond the initial holders, rounded up, where positive.
fn load_lower_bound(tasks_per_model: &[u64], initial_holders: &[u64], workers: u64) -> u64 {
    let total: u64 = tasks_per_model.iter().sum();
    if total == 0 {
        return 0;
    }
    tasks_per_model
        .iter()
        .zip(initial_holders)
        .map(|(&tasks, &held)| (tasks * workers).div_ceil(total).saturating_sub(held))
        .sum()
}

/// Measures the scheduling policy at scale with sim workers that hold one
/// model at a time (each starts with one model resident, round-robin):
/// makespan against the ideal (work / workers), model loads against the
/// load lower bound ([`load_lower_bound`]), and scheduling latency (Lease
/// calls that brought work).
///
/// What the makespan measures: every job is accepted before any worker
/// exists (a worker registered straight in the store, and drained before
/// the workers start, announces the models); then the workers start,
/// register and lease as a farm would, but their renders wait at a gate
/// until every worker holds its first task (or 60 s pass). The clock starts
/// when the gate opens and stops when the last job is seen complete: it
/// counts every render, every load and every report and lease after the
/// first one on loopback gRPC, not the time to spawn and register the
/// in-process agents or the workers' first leases (their switch decisions,
/// made as they arrive, count in the loads); the ideal counts render time
/// only. The JSON's `finished_recorded_s` is when the coordinator recorded the
/// last job finished (its clock, to the millisecond), without the time its watch
/// stream took to tell the bench. With `--duration`, the run stops that long after the gate opens
/// and the rate (completed tasks per second of the window, against workers
/// / render time) replaces the makespan.
async fn schedule(opts: Schedule) -> anyhow::Result<()> {
    let json_out = opts.json;
    if opts.workers == 0 || opts.tasks == 0 || opts.models == 0 || opts.jobs == 0 {
        bail!("--workers, --tasks, --models and --jobs must be at least 1");
    }
    if opts.render.is_zero() {
        bail!("--render must be more than 0");
    }
    let names: Vec<String> = (0..opts.models).map(|m| format!("m{m}")).collect();
    let mut sims = Vec::new();
    let mut renderers: Vec<Arc<dyn Renderer>> = Vec::new();
    let mut gated: Vec<Arc<Gated>> = Vec::new();
    let gate = Arc::new(StartGate::default());
    let mut initial_holders = vec![0u64; names.len()];
    for w in 0..opts.workers as usize {
        // Each worker starts with a different model resident, round-robin:
        // the first of its catalog order.
        let mut order = names.clone();
        order.rotate_left(w % names.len());
        initial_holders[w % names.len()] += 1;
        let sim = Arc::new(SimRenderer::with_options(
            &order,
            opts.render,
            SimOptions {
                resident_slots: Some(1),
                load_time: opts.load,
                ..Default::default()
            },
        ));
        sims.push(sim.clone());
        let g = Arc::new(Gated {
            sim,
            gate: gate.clone(),
            spans: Default::default(),
        });
        gated.push(g.clone());
        renderers.push(g);
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
    // Every job is accepted before any worker starts, so no worker switches
    // models because one job happened to arrive before the others. A worker
    // registered straight in the store announces the models to admission;
    // it is drained before the workers start (a drained worker holds
    // nothing for the policy) and never claims.
    let announcer = WorkerId("bench-announcer".into());
    store
        .register_worker(
            WorkerRegistration {
                id: announcer.clone(),
                labels: Default::default(),
                gpu_memory_bytes: 0,
                slots: 1,
                models: sims
                    .first()
                    .map(|s| s.models())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|m| ModelInfo {
                        name: m.name,
                        hash: m.hash,
                    })
                    .collect(),
                determinism_class: sims
                    .first()
                    .map(|s| s.determinism_class())
                    .unwrap_or_default(),
                version: String::new(),
                assets: Default::default(),
            },
            None,
        )
        .await
        .context("registering the bench's announcer")?;
    let mut farm = EmbeddedFarm::start_coordinator(store.clone()).await?;
    farm.prefetch = opts.prefetch;
    let per_job = opts.tasks / opts.jobs;
    let mut tasks_per_model = vec![0u64; names.len()];
    let mut submissions = Vec::new();
    for j in 0..opts.jobs {
        let model = (j % opts.models) as usize;
        tasks_per_model[model] += u64::from(per_job);
        let spec = seed_sweep(
            format!("bench-schedule-{j}"),
            &names[model],
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
    let mut jobs = Vec::new();
    for s in submissions {
        let resp = s
            .await
            .context("a submission panicked")?
            .map_err(|s| farm.farm.explain(s))?;
        jobs.push(resp.job.context("no job")?.job_id);
    }
    store
        .drain_worker(&announcer)
        .await
        .context("draining the bench's announcer")?;
    let spawned = Instant::now();
    farm.add_workers(renderers, Some(observer)).await?;
    let initial_loads: u64 = sims.iter().map(|s| s.loads()).sum();
    // Every worker holds its first task (each lease call brought one).
    let holding = opts.workers.min(per_job * opts.jobs) as usize;
    while latencies.lock().map_or(0, |l| l.len()) < holding
        && spawned.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let registration = spawned.elapsed();
    // With --duration nothing waits for the jobs to end.
    let followers: Vec<_> = jobs
        .iter()
        .filter(|_| opts.duration.is_none())
        .map(|job| {
            let (client, job) = (farm.farm.clone(), job.clone());
            tokio::spawn(async move {
                watch::follow(&client, &job, true).await?;
                anyhow::Ok(Instant::now())
            })
        })
        .collect();
    let start = Instant::now();
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    gate.open();
    let total = f64::from(per_job * opts.jobs);
    let mut completed = total;
    let loads_now = || sims.iter().map(|s| s.loads()).sum::<u64>() - initial_loads;
    let (elapsed, loads) = match opts.duration {
        Some(limit) => {
            // Counts what is done after the window; the workers finish what
            // they hold when the farm stops.
            tokio::time::sleep_until((start + limit).into()).await;
            let (window, loads) = (start.elapsed(), loads_now());
            let mut done = 0u32;
            for job in &jobs {
                let j = farm
                    .farm
                    .job(job, false)
                    .await
                    .map_err(|s| farm.farm.explain(s))?;
                done += j.job.and_then(|j| j.counts).map_or(0, |c| c.completed);
            }
            completed = f64::from(done);
            (window, loads)
        }
        None => {
            // Each job is followed from before the start, all at once, so
            // the last one's end is seen when it happens rather than after
            // the others' streams are read.
            let mut ended = start;
            for f in followers {
                ended = ended.max(f.await.context("a follower panicked")??);
            }
            (ended - start, loads_now())
        }
    };
    let end = start + elapsed;
    // When the coordinator recorded the last job finished: the makespan less what
    // the followers' streams took to tell the bench.
    let mut finished_ms = None;
    if opts.duration.is_none() {
        for job in &jobs {
            let id = job
                .parse::<kiln_domain::ids::JobId>()
                .with_context(|| format!("the farm answered a job id that is not one: {job}"))?;
            let record = store.job(id).await.context("reading a finished job")?;
            finished_ms = finished_ms.max(record.finished_at_ms);
        }
    }
    farm.stop().await?;
    let spans: Vec<Vec<(Instant, Instant)>> = gated
        .iter()
        .map(|g| g.spans.lock().map(|s| s.clone()).unwrap_or_default())
        .collect();
    let spent = time_spent(&spans, start, end);
    // From the last render's return to the end: its report and how the
    // bench noticed the last job complete.
    let last_render = spans.iter().filter_map(|w| w.last()).map(|s| s.1).max();
    let noticed_ms = last_render.map_or(0.0, |l| {
        end.saturating_duration_since(l).as_secs_f64() * 1000.0
    });
    let bound = load_lower_bound(&tasks_per_model, &initial_holders, u64::from(opts.workers));
    let render_s = opts.render.as_secs_f64();
    let ideal = total * render_s / f64::from(opts.workers);
    let mut lat: Vec<Duration> = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    lat.sort();
    let pct = |p: f64| -> f64 {
        lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let (p50, p90, p99, max) = (pct(0.5), pct(0.9), pct(0.99), pct(1.0));
    let mean_lat =
        lat.iter().map(Duration::as_secs_f64).sum::<f64>() * 1000.0 / lat.len().max(1) as f64;
    let elapsed_s = elapsed.as_secs_f64();
    // Tasks per second: reached, and what the workers render at best.
    let rate = completed / elapsed_s;
    let ideal_rate = f64::from(opts.workers) / render_s;
    if json_out {
        let mut out = json!({"workers": opts.workers, "prefetch": opts.prefetch, "tasks": total, "models": opts.models, "jobs": opts.jobs,
               "render_ms": opts.render.as_millis(), "load_ms": opts.load.as_millis(),
               "registration_s": registration.as_secs_f64(),
               "model_loads": loads, "load_lower_bound": bound,
               "lease_latency_ms": {"p50": p50, "p90": p90, "p99": p99, "max": max, "mean": mean_lat},
               "worker_time_s": {"rendering": spent.rendering, "between_renders": spent.between,
                                 "before_first": spent.before_first, "after_last": spent.after_last,
                                 "gap_ms_mean": 1000.0 * spent.between / spent.gaps.max(1) as f64,
                                 "last_render_to_end_ms": noticed_ms}});
        if opts.duration.is_some() {
            out["window_s"] = json!(elapsed_s);
            out["completed"] = json!(completed);
            out["tasks_per_s"] = json!(rate);
            out["ideal_tasks_per_s"] = json!(ideal_rate);
        } else {
            out["makespan_s"] = json!(elapsed_s);
            out["ideal_s"] = json!(ideal);
            if let Some(f) = finished_ms {
                out["finished_recorded_s"] = json!((f - started_ms) as f64 / 1000.0);
            }
        }
        println!("{out}");
    } else {
        println!(
            "{total} tasks, {} jobs, {} models, {} sim workers (prefetch {}) at {} ms per render ({} ms per model load); workers registered and holding a task in {:.2} s:",
            opts.jobs,
            opts.models,
            opts.workers,
            opts.prefetch,
            opts.render.as_millis(),
            opts.load.as_millis(),
            registration.as_secs_f64()
        );
        if opts.duration.is_some() {
            println!(
                "  {completed} tasks done in {elapsed_s:.2} s after the start: {rate:.0} tasks/s against {ideal_rate:.0} (workers / render time): {:.0}%",
                100.0 * rate / ideal_rate
            );
        } else {
            println!(
                "  makespan {elapsed_s:.2} s from the start, against an ideal of {ideal:.2} s (work / workers): {:.1}% of ideal",
                100.0 * ideal / elapsed_s
            );
            if let Some(f) = finished_ms {
                let recorded = (f - started_ms) as f64 / 1000.0;
                println!(
                    "  the coordinator recorded the last job finished {recorded:.2} s from the start ({:.1}% of ideal); the rest is its watch stream reaching the bench",
                    100.0 * ideal / recorded
                );
            }
        }
        println!(
            "  model loads after start: {loads}, lower bound {bound} (each worker starts with one model resident)"
        );
        println!(
            "  scheduling latency (Lease calls that brought work, {} calls): p50 {p50:.2} ms, p90 {p90:.2} ms, p99 {p99:.2} ms, max {max:.2} ms",
            lat.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::load_lower_bound;

    #[test]
    fn the_load_bound_counts_the_workers_each_model_lacks() {
        // The default bench: 8000, 6000, 6000 tasks on 67, 67, 66 holders of
        // 200 workers: m0 needs 80 workers, 13 more than hold it.
        assert_eq!(
            load_lower_bound(&[8000, 6000, 6000], &[67, 67, 66], 200),
            13
        );
        // Work in proportion to the holders needs no load.
        assert_eq!(load_lower_bound(&[100, 100], &[5, 5], 10), 0);
        // A fraction of a worker still needs a whole load.
        assert_eq!(load_lower_bound(&[101, 99], &[5, 5], 10), 1);
        assert_eq!(load_lower_bound(&[0, 0], &[1, 1], 2), 0);
    }
}
