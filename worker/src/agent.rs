//! The agent loop: register, long-poll for leases, render on the render
//! thread, heartbeat from its own task, and report every task under its epoch.
//! Each heartbeat carries, per task, the latest live preview the render thread
//! made since the one before (`AgentConfig::preview_every`).
//!
//! Shutdown happens in a visible order: on `drain` the agent stops leasing,
//! hands back at once the tasks the render thread has not taken up yet
//! (prefetched, or queued behind a batch), finishes the renders under way,
//! reports them and returns; on `abort` it hands
//! every task whose render has not ended back to the queue at once (a `Fail`
//! with the `CANCELLED` fault: the store queues it again under a fresh attempt
//! without counting it against the task's attempts) and returns without
//! waiting for the render thread, which may be in the middle of a step that
//! cannot be interrupted. A result that render produces later is never sent;
//! had it been, the store would refuse it as stale (the epoch moved on).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kiln_domain::lora_set::ReadyLoraSet;
use kiln_proto::connect::is_transient;
use kiln_proto::ids::{Epoch, TaskId, WorkerId};
use kiln_proto::pb::{self, AbandonReason, FaultClass};
use kiln_proto::telemetry;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tracing::Instrument;

use crate::convert;
use crate::link::Link;
use crate::readiness::Readiness;
use crate::render::{RenderError, Renderer};
use crate::render_thread::{self, RenderControl, RenderThread};

/// How long one Lease long poll may wait for work.
const POLL_WAIT: Duration = Duration::from_secs(10);
/// First and longest pause between retries of a failed call.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(5));
/// Tries of a Complete or Fail report before the agent gives up on it (about a minute).
const REPORT_TRIES: u32 = 16;
/// Most time an abort spends handing the tasks in hand back; a task it could
/// not hand back in that time comes back when its lease expires.
const HAND_BACK_LIMIT: Duration = Duration::from_secs(5);

/// Tasks a worker holds beyond its slots unless told otherwise
/// ([`AgentConfig::prefetch`]): one, so the report of a finished task and
/// the next lease overlap the next render rather than sit between renders
/// (see README, "Prefetch", for what prefetching changes; 0 leases only as
/// tasks end).
pub const DEFAULT_PREFETCH: u32 = 1;

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The coordinator refused the registration for good.
    #[error("the coordinator refused to register worker {worker}: {status}")]
    Refused {
        /// This worker.
        worker: WorkerId,
        /// The coordinator's answer.
        status: Status,
    },
    /// The coordinator refused this worker's token (none, unknown, or not a
    /// worker's): retrying cannot help.
    #[error(
        "the coordinator refused worker {worker}'s token on {call}: {message} (give a worker token with KILN_TOKEN or --token-file)"
    )]
    Denied {
        /// This worker.
        worker: WorkerId,
        /// The call that was refused.
        call: &'static str,
        /// The coordinator's words.
        message: String,
    },
    /// The render thread could not start.
    #[error("cannot start the render thread: {0}")]
    RenderThread(#[from] std::io::Error),
}

/// Who the worker is and how much it takes on.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The worker's id, stable across reconnects.
    pub worker_id: WorkerId,
    /// Tasks rendered at once: the most the render thread puts in one batch.
    pub slots: u32,
    /// Tasks held beyond `slots`, waiting on the render thread behind those
    /// that render: a finished task's report and the lease that replaces it
    /// then happen while the device renders the next one, not between
    /// renders. 0 leases only as tasks end.
    pub prefetch: u32,
    /// Free-form labels shown by `kiln workers`.
    pub labels: BTreeMap<String, String>,
    /// Told how long each Lease call that returned work took, and how many
    /// tasks it brought (benchmarks measure scheduling latency with it).
    pub lease_observer: Option<LeaseObserver>,
    /// Told when the worker is registered (ready), lost its session or drains.
    pub readiness: Readiness,
    /// Denoising steps between live previews sent with heartbeats (0: none).
    pub preview_every: u32,
}

/// A callback for lease timings: (latency, tasks leased).
#[derive(Clone)]
pub struct LeaseObserver(pub Arc<dyn Fn(Duration, usize) + Send + Sync>);

impl std::fmt::Debug for LeaseObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LeaseObserver")
    }
}

/// Tells a running agent to stop: `drain` finishes the tasks in hand,
/// `abort` hands them back.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    /// Stop leasing; finish and report the tasks in hand.
    pub drain: CancellationToken,
    /// Stop renders now and hand their tasks back.
    pub abort: CancellationToken,
}

/// What the agent did before it returned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Images the coordinator accepted.
    pub completed: u64,
    /// Tasks reported as failed.
    pub failed: u64,
    /// Tasks dropped: abandoned on the coordinator's word, or refused as stale.
    pub dropped: u64,
    /// Tasks handed back to the queue unfinished by an abort.
    pub handed_back: u64,
}

/// A task in hand.
struct InFlight {
    epoch: Epoch,
    control: RenderControl,
    /// Set when the coordinator said to abandon it, or when an abort handed
    /// it back: the render's own report is not sent.
    abandoned: Arc<AtomicBool>,
    /// Set once the render has ended and its report is under way: from then
    /// on the report's own answer decides, and abandon orders (a heartbeat
    /// racing the Complete) are ignored.
    reporting: Arc<AtomicBool>,
    /// The model it renders with; `None` when the task could not be read.
    model: Option<String>,
    /// The LoRA set it renders with, when it has one: held ready afterwards.
    lora_set: Option<ReadyLoraSet>,
}

/// State shared by the lease loop, the heartbeat task and the task runners.
struct Shared {
    link: Link,
    worker: WorkerId,
    renderer: Arc<dyn Renderer>,
    render: RenderThread,
    lease_observer: Option<LeaseObserver>,
    /// Cancelled once the agent takes no new work (a drain or an abort, asked
    /// by the process or the coordinator, or the lease loop ended): from then
    /// on a Complete asks for no next lease.
    stop_leasing: CancellationToken,
    in_flight: Mutex<HashMap<TaskId, InFlight>>,
    /// Signalled when a task ends and frees its slot.
    slot_freed: Notify,
    /// Cancelled when the coordinator asks this worker to drain.
    drain_asked: CancellationToken,
    heartbeat_ms: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    handed_back: AtomicU64,
}

impl Shared {
    fn in_flight(&self) -> MutexGuard<'_, HashMap<TaskId, InFlight>> {
        // No .await happens under this lock; a poisoned one still holds valid entries.
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The worker agent: see the module docs.
pub struct Agent {
    shared: Arc<Shared>,
    config: AgentConfig,
}

impl Agent {
    /// Returns an agent that renders with `renderer` and talks over `link`.
    ///
    /// # Errors
    /// When the render thread cannot start.
    pub fn new(
        link: Link,
        renderer: Arc<dyn Renderer>,
        config: AgentConfig,
    ) -> Result<Self, AgentError> {
        let render = RenderThread::spawn(
            renderer.clone(),
            config.preview_every,
            config.slots.max(1) as usize,
        )?;
        Ok(Self {
            shared: Arc::new(Shared {
                link,
                worker: config.worker_id.clone(),
                renderer,
                render,
                lease_observer: config.lease_observer.clone(),
                stop_leasing: CancellationToken::new(),
                in_flight: Mutex::new(HashMap::new()),
                slot_freed: Notify::new(),
                drain_asked: CancellationToken::new(),
                heartbeat_ms: AtomicU64::new(3000),
                completed: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                handed_back: AtomicU64::new(0),
            }),
            config,
        })
    }

    fn registration(&self) -> pb::RegisterRequest {
        let renderer = &self.shared.renderer;
        let [loras, embeddings, controlnets] = convert::asset_infos(&renderer.assets());
        pb::RegisterRequest {
            worker_id: self.config.worker_id.to_string(),
            labels: self.config.labels.clone().into_iter().collect(),
            gpu_memory_bytes: 0,
            slots: self.config.slots,
            models: renderer
                .models()
                .into_iter()
                .map(convert::model_info)
                .collect(),
            determinism_class: renderer.determinism_class(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            loras,
            embeddings,
            controlnets,
        }
    }

    /// Registers, retrying transient failures until it works or `stop` fires.
    /// Returns false if stopped first.
    fn denied(&self, call: &'static str, status: &Status) -> AgentError {
        AgentError::Denied {
            worker: self.config.worker_id.clone(),
            call,
            message: status.message().to_string(),
        }
    }

    async fn register(&self, stop: &CancellationToken) -> Result<bool, AgentError> {
        let mut pause = BACKOFF.0;
        loop {
            match self.shared.link.register(self.registration()).await {
                Ok(resp) => {
                    let ms = u64::from(resp.heartbeat_interval_ms.max(100));
                    self.shared.heartbeat_ms.store(ms, Ordering::Relaxed);
                    tracing::info!(worker = %self.config.worker_id, heartbeat_ms = ms, lease_ttl_ms = resp.lease_ttl_ms, "registered");
                    self.config.readiness.ready();
                    return Ok(true);
                }
                Err(status) if is_transient(&status) => {
                    self.config.readiness.not_ready(&format!(
                        "not registered: the coordinator is unreachable ({})",
                        status.message()
                    ));
                    tracing::warn!(worker = %self.config.worker_id, error = %status.message(), "coordinator unreachable; retrying registration");
                }
                Err(status) if is_denied(&status) => {
                    return Err(self.denied("Register", &status));
                }
                Err(status) => {
                    return Err(AgentError::Refused {
                        worker: self.config.worker_id.clone(),
                        status,
                    });
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.cancelled() => return Ok(false),
            }
            pause = (pause * 2).min(BACKOFF.1);
        }
    }

    /// Runs until drained or aborted; see the module docs.
    ///
    /// # Errors
    /// When the coordinator refuses the registration for good.
    pub async fn run(self, shutdown: Shutdown) -> Result<Summary, AgentError> {
        if !self.register(&shutdown.drain).await? {
            return Ok(Summary::default());
        }
        let stop_heartbeat = CancellationToken::new();
        let heartbeat = tokio::spawn(heartbeat_loop(self.shared.clone(), stop_heartbeat.clone()));
        let abort_watch = tokio::spawn({
            let (shared, abort) = (self.shared.clone(), shutdown.abort.clone());
            async move {
                abort.cancelled().await;
                for f in shared.in_flight().values() {
                    f.control.cancel();
                }
            }
        });
        // A Complete takes the next lease with it only while the agent leases.
        let stop_leasing = tokio::spawn({
            let (shutdown, shared) = (shutdown.clone(), self.shared.clone());
            async move {
                tokio::select! {
                    _ = shutdown.drain.cancelled() => {}
                    _ = shutdown.abort.cancelled() => {}
                    _ = shared.drain_asked.cancelled() => {}
                }
                shared.stop_leasing.cancel();
            }
        });
        let result = self.lease_loop(&shutdown).await;
        self.shared.stop_leasing.cancel();
        stop_leasing.abort();
        self.config
            .readiness
            .not_ready("draining: finishing the tasks in hand, taking no new work");
        tracing::info!(worker = %self.config.worker_id, in_hand = self.shared.in_flight().len(), "stopped leasing; finishing the tasks in hand");
        // A drain finishes the renders under way; tasks still waiting for the
        // render thread (prefetched, or queued behind a batch) go back to the
        // queue at once, for another worker.
        if result.is_ok()
            && tokio::time::timeout(
                HAND_BACK_LIMIT,
                hand_back(&self.shared, |f| !f.control.is_started()),
            )
            .await
            .is_err()
        {
            tracing::warn!(worker = %self.config.worker_id, "could not hand the waiting tasks back in time; the rest come back when their leases expire");
        }
        self.wait_for_tasks(&shutdown).await;
        stop_heartbeat.cancel();
        abort_watch.abort();
        let _ = heartbeat.await;
        result?;
        let summary = Summary {
            completed: self.shared.completed.load(Ordering::Relaxed),
            failed: self.shared.failed.load(Ordering::Relaxed),
            dropped: self.shared.dropped.load(Ordering::Relaxed),
            handed_back: self.shared.handed_back.load(Ordering::Relaxed),
        };
        tracing::info!(worker = %self.config.worker_id, completed = summary.completed, failed = summary.failed, dropped = summary.dropped, handed_back = summary.handed_back, "worker stopped");
        Ok(summary)
    }

    async fn lease_loop(&self, shutdown: &Shutdown) -> Result<(), AgentError> {
        // Either the process (SIGTERM) or the coordinator (DrainWorker) can ask for a drain.
        let drained = || async {
            tokio::select! {
                _ = shutdown.drain.cancelled() => {}
                _ = self.shared.drain_asked.cancelled() => {}
            }
        };
        let mut pause = BACKOFF.0;
        loop {
            if shutdown.drain.is_cancelled() || self.shared.drain_asked.is_cancelled() {
                return Ok(());
            }
            let freed = self.shared.slot_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let busy = self.shared.in_flight().len() as u32;
            let free = (self.config.slots + self.config.prefetch).saturating_sub(busy);
            if free == 0 {
                tokio::select! {
                    _ = freed => continue,
                    _ = drained() => return Ok(()),
                }
            }
            let asked = tokio::time::Instant::now();
            let (resident, ready) = ahead(&self.shared);
            let answer = tokio::select! {
                r = self.shared.link.lease(self.shared.worker.as_str(), free, POLL_WAIT, resident, &ready) => r,
                _ = drained() => return Ok(()),
            };
            match answer {
                Ok(resp) => {
                    pause = BACKOFF.0;
                    take_leases(&self.shared, resp, asked);
                }
                Err(status) if status.code() == Code::NotFound => {
                    tracing::warn!(worker = %self.shared.worker, "the coordinator lost this worker's session; registering again");
                    self.config
                        .readiness
                        .not_ready("not registered: the coordinator lost this worker's session");
                    if !self.register(&shutdown.drain).await? {
                        return Ok(());
                    }
                }
                Err(status) if is_denied(&status) => {
                    return Err(self.denied("Lease", &status));
                }
                Err(status) => {
                    tracing::warn!(worker = %self.shared.worker, code = ?status.code(), error = %status.message(), "lease failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = drained() => return Ok(()),
                    }
                    pause = (pause * 2).min(BACKOFF.1);
                }
            }
        }
    }

    /// Waits until every task in hand has been reported, or, once `abort`
    /// fires, handed back; reports already under way are still awaited.
    async fn wait_for_tasks(&self, shutdown: &Shutdown) {
        let mut handed = false;
        loop {
            let freed = self.shared.slot_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.shared.in_flight().is_empty() {
                return;
            }
            if handed {
                freed.await;
                continue;
            }
            tokio::select! {
                _ = &mut freed => {}
                _ = shutdown.abort.cancelled() => {
                    if tokio::time::timeout(HAND_BACK_LIMIT, hand_back(&self.shared, |_| true)).await.is_err() {
                        tracing::error!(worker = %self.shared.worker, "could not hand every task back in time; the rest come back when their leases expire");
                        return;
                    }
                    handed = true;
                }
            }
        }
    }
}

/// Takes a lease answer (from a Lease call, or carried back by a Complete):
/// tells the observer how long the ask took, starts the tasks and heeds a
/// drain order.
fn take_leases(shared: &Arc<Shared>, resp: pb::LeaseResponse, asked: tokio::time::Instant) {
    if let Some(observe) = &shared.lease_observer
        && !resp.tasks.is_empty()
    {
        (observe.0)(asked.elapsed(), resp.tasks.len());
    }
    start(shared, resp.tasks);
    if resp.drain {
        tracing::info!(worker = %shared.worker, "the coordinator asked this worker to drain");
        shared.drain_asked.cancel();
    }
}

/// Takes the tasks of one lease answer in hand and renders them in the background.
///
/// They are queued on the render thread in one submission, so that those with
/// the same model, size and schedule render as one batch. Each task's runner
/// reports it; a Complete that brings the next leases starts them before the
/// finished task leaves the hand, so the lease loop never sees its slot free
/// in between and the worker never holds more than its slots.
fn start(shared: &Arc<Shared>, tasks: Vec<pb::LeasedTask>) {
    let mut submitted = Vec::with_capacity(tasks.len());
    let mut handles = Vec::with_capacity(tasks.len());
    for task in tasks {
        let Ok(task_id) = task.task_id.parse::<TaskId>() else {
            tracing::error!(task = %task.task_id, "the coordinator sent a task id that is not a UUID; ignoring it");
            continue;
        };
        let epoch = Epoch(task.epoch);
        let converted = convert::render_task(&task);
        let control = RenderControl::default();
        let abandoned = Arc::new(AtomicBool::new(false));
        let reporting = Arc::new(AtomicBool::new(false));
        shared.in_flight().insert(
            task_id,
            InFlight {
                epoch,
                control: control.clone(),
                abandoned: abandoned.clone(),
                reporting: reporting.clone(),
                model: converted.as_ref().ok().map(|t| t.recipe.model.clone()),
                lora_set: converted
                    .as_ref()
                    .ok()
                    .and_then(|t| ReadyLoraSet::of(&t.recipe)),
            },
        );
        tracing::debug!(worker = %shared.worker, job = %task.job_id, index = task.index, epoch = %epoch, model = converted.as_ref().map_or("", |t| t.recipe.model.as_str()), "rendering");
        // Continues the coordinator's lease span, when it sent one; so
        // does the report below.
        let render_span = tracing::info_span!("render", task = %task_id, job = %task.job_id, index = task.index, epoch = %epoch);
        telemetry::adopt_traceparent(&render_span, &task.traceparent);
        let handle = (
            task_id,
            epoch,
            abandoned,
            reporting,
            task.traceparent.clone(),
        );
        match converted {
            Ok(mut t) => {
                t.span = render_span;
                submitted.push((t, control));
                handles.push((handle, None));
            }
            Err(e) => handles.push((handle, Some(e))),
        }
    }
    let mut receivers = shared.render.submit(submitted).into_iter();
    for ((task_id, epoch, abandoned, reporting, traceparent), refused) in handles {
        let receiver = match refused {
            Some(_) => None,
            None => receivers.next(),
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let result = match refused {
                Some(e) => Err(e),
                None => render_thread::wait(receiver).await,
            };
            reporting.store(true, Ordering::SeqCst);
            // An abort that handed the task back already took it out of hand.
            let in_hand = shared.in_flight().contains_key(&task_id);
            if in_hand {
                let span = tracing::info_span!("report", task = %task_id, epoch = %epoch);
                telemetry::adopt_traceparent(&span, &traceparent);
                report(&shared, task_id, epoch, &abandoned, result)
                    .instrument(span)
                    .await;
            }
            shared.in_flight().remove(&task_id);
            shared.slot_freed.notify_waiters();
        });
    }
}

/// What this worker will hold when a task leased now comes to render, as it
/// tells the coordinator with a lease request: its models ([`models_ahead`])
/// and its ready LoRA sets ([`sets_ahead`]), counting the tasks in hand whose
/// render has not ended (those that have are in the renderer's answer). A
/// prefetching worker asks while it renders, so reporting only what the
/// renderer holds at that moment would have the store choose for the state
/// the worker is about to leave.
fn ahead(shared: &Shared) -> (Vec<String>, Vec<ReadyLoraSet>) {
    let (resident, ready) = (
        shared.renderer.resident(),
        shared.renderer.ready_lora_sets(),
    );
    let in_flight = shared.in_flight();
    let before_render = || {
        in_flight
            .values()
            .filter(|f| !f.reporting.load(Ordering::SeqCst))
    };
    let models = before_render().filter_map(|f| f.model.clone());
    let sets = before_render().filter_map(|f| f.lora_set.clone());
    (models_ahead(resident, models), sets_ahead(ready, sets))
}

/// The models of a worker holding `resident` once the tasks in hand (their
/// models) have rendered: those of the tasks in hand that are not resident
/// (they load them, and a worker loading a model holds that one alone, as the
/// store counts it in `policy::holds_for_affinity`), else `resident`.
fn models_ahead(resident: Vec<String>, in_hand: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut loading: Vec<String> = Vec::new();
    for model in in_hand {
        if !resident.contains(&model) && !loading.contains(&model) {
            loading.push(model);
        }
    }
    if loading.is_empty() {
        resident
    } else {
        loading
    }
}

/// The LoRA sets a worker holding `ready` holds once the tasks in hand (their
/// sets) have rendered: a renderer keeps the set it rendered with, so those
/// not ready yet come first (the coordinator reads the first
/// `MAX_READY_SETS`), then `ready`.
fn sets_ahead(
    ready: Vec<ReadyLoraSet>,
    in_hand: impl IntoIterator<Item = ReadyLoraSet>,
) -> Vec<ReadyLoraSet> {
    let mut ahead: Vec<ReadyLoraSet> = Vec::new();
    for set in in_hand {
        if !ready.contains(&set) && !ahead.contains(&set) {
            ahead.push(set);
        }
    }
    ahead.extend(ready);
    ahead
}

/// Sends the outcome of a render to the coordinator, retrying transient errors.
async fn report(
    shared: &Arc<Shared>,
    task: TaskId,
    epoch: Epoch,
    abandoned: &AtomicBool,
    result: Result<crate::render::Rendered, RenderError>,
) {
    if abandoned.load(Ordering::SeqCst) {
        tracing::info!(worker = %shared.worker, %task, %epoch, "task abandoned as the coordinator asked");
        shared.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let worker_id = shared.worker.to_string();
    let outcome = match result {
        Ok(rendered) => {
            let sha256 = kiln_domain::image::sha256_hex(&rendered.png);
            // The slot this task frees is filled by the same call, unless
            // the agent stopped leasing.
            let lease_next = u32::from(!shared.stop_leasing.is_cancelled());
            let (resident, ready) = if lease_next > 0 {
                ahead(shared)
            } else {
                Default::default()
            };
            let req = pb::CompleteRequest {
                worker_id,
                task_id: task.to_string(),
                epoch: epoch.0,
                png: rendered.png,
                sha256,
                model_hash: rendered.model_hash,
                timings: Some(pb::RenderTimings {
                    render_ms: rendered.render_ms,
                    encode_ms: rendered.encode_ms,
                }),
                lease_next,
                resident_models: resident,
                ready_lora_sets: kiln_proto::convert::ready_sets_to_pb(&ready),
            };
            let asked = tokio::time::Instant::now();
            retry(abandoned, || shared.link.complete(req.clone()))
                .await
                .map(|resp| {
                    if let Some(next) = resp.next {
                        take_leases(shared, next, asked);
                    }
                    true
                })
        }
        Err(e) => {
            let (fault, message) = match &e {
                RenderError::Cancelled => (
                    FaultClass::Cancelled,
                    "the worker stopped: task handed back".to_string(),
                ),
                other => (convert::fault(other), other.to_string()),
            };
            tracing::warn!(worker = %shared.worker, %task, %epoch, ?fault, error = %message, "render failed");
            let req = pb::FailRequest {
                worker_id,
                task_id: task.to_string(),
                epoch: epoch.0,
                fault: fault.into(),
                message,
            };
            retry(abandoned, || shared.link.fail(req.clone()))
                .await
                .map(|_| false)
        }
    };
    match outcome {
        Ok(true) => {
            shared.completed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(false) => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
        }
        Err(status) if status.code() == Code::FailedPrecondition => {
            tracing::warn!(worker = %shared.worker, %task, %epoch, reason = %status.message(), "report refused: lease lost, result discarded");
            shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
        Err(status) => {
            tracing::error!(worker = %shared.worker, %task, %epoch, code = ?status.code(), error = %status.message(), "could not report the task; its lease will expire and it runs again elsewhere");
            shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Hands every task in hand that `which` picks and whose render has not ended
/// back to the coordinator at once, and forgets it: its render is cancelled
/// and its own report will not be sent. Tasks whose report is already under
/// way are left to it.
async fn hand_back(shared: &Shared, which: impl Fn(&InFlight) -> bool) {
    let tasks: Vec<(TaskId, Epoch)> = {
        let mut in_flight = shared.in_flight();
        let ids: Vec<TaskId> = in_flight
            .iter()
            .filter(|(_, f)| !f.reporting.load(Ordering::SeqCst) && which(f))
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| {
                let f = in_flight.remove(&id)?;
                f.abandoned.store(true, Ordering::SeqCst);
                f.control.cancel();
                Some((id, f.epoch))
            })
            .collect()
    };
    for (task, epoch) in tasks {
        let req = pb::FailRequest {
            worker_id: shared.worker.to_string(),
            task_id: task.to_string(),
            epoch: epoch.0,
            fault: FaultClass::Cancelled.into(),
            message: "the worker stopped: task handed back".to_string(),
        };
        let never = AtomicBool::new(false);
        match retry(&never, || shared.link.fail(req.clone())).await {
            Ok(_) => {
                tracing::info!(worker = %shared.worker, %task, %epoch, "task handed back");
                shared.handed_back.fetch_add(1, Ordering::Relaxed);
            }
            Err(status) => {
                tracing::warn!(worker = %shared.worker, %task, %epoch, code = ?status.code(), error = %status.message(), "could not hand the task back; it comes back when its lease expires");
                shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    shared.slot_freed.notify_waiters();
}

/// Returns true for the answers to a token the coordinator will not take.
fn is_denied(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unauthenticated | Code::PermissionDenied
    )
}

/// Retries `call` on transient errors with backoff, until it succeeds, fails
/// for good, the task is abandoned, or the tries run out.
async fn retry<T, F, Fut>(abandoned: &AtomicBool, mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut pause = BACKOFF.0;
    let mut tries = 0;
    loop {
        tries += 1;
        match call().await {
            Err(status)
                if is_transient(&status)
                    && tries < REPORT_TRIES
                    && !abandoned.load(Ordering::SeqCst) =>
            {
                tracing::warn!(code = ?status.code(), error = %status.message(), tries, "report failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(BACKOFF.1);
            }
            other => return other,
        }
    }
}

/// Sends heartbeats every interval until `stop`: progress out, abandon orders in.
async fn heartbeat_loop(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let interval = Duration::from_millis(shared.heartbeat_ms.load(Ordering::Relaxed));
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.cancelled() => return,
        }
        let tasks: Vec<pb::LeaseProgress> = shared
            .in_flight()
            .iter()
            .map(|(id, f)| {
                // Taken once: a heartbeat that fails loses it, and the next one is newer.
                let preview = f.control.take_preview();
                pb::LeaseProgress {
                    task_id: id.to_string(),
                    epoch: f.epoch.0,
                    step: f.control.step(),
                    preview_step: preview.as_ref().map_or(0, |p| p.step),
                    preview_png: preview.map(|p| p.png).unwrap_or_default(),
                }
            })
            .collect();
        let req = pb::HeartbeatRequest {
            worker_id: shared.worker.to_string(),
            tasks,
        };
        match shared.link.heartbeat(req).await {
            Ok(resp) => {
                for a in resp.abandon {
                    let Ok(task) = a.task_id.parse::<TaskId>() else {
                        continue;
                    };
                    let reason =
                        AbandonReason::try_from(a.reason).unwrap_or(AbandonReason::LeaseLost);
                    if let Some(f) = shared.in_flight().get(&task)
                        && f.epoch == Epoch(a.epoch)
                        && !f.reporting.load(Ordering::SeqCst)
                    {
                        tracing::warn!(worker = %shared.worker, %task, epoch = a.epoch, ?reason, "abandoning task");
                        f.abandoned.store(true, Ordering::SeqCst);
                        f.control.cancel();
                    }
                }
                if resp.drain && !shared.drain_asked.is_cancelled() {
                    tracing::info!(worker = %shared.worker, "the coordinator asked this worker to drain");
                    shared.drain_asked.cancel();
                }
            }
            Err(status) => {
                tracing::warn!(worker = %shared.worker, code = ?status.code(), error = %status.message(), "heartbeat failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{ReadyLoraSet, models_ahead, sets_ahead};

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_worker_reports_the_models_its_waiting_tasks_will_load() {
        // Nothing in hand, or only tasks of resident models: the resident models.
        assert_eq!(models_ahead(names(&["m1"]), names(&[])), names(&["m1"]));
        assert_eq!(
            models_ahead(names(&["m1", "m2"]), names(&["m1", "m2", "m1"])),
            names(&["m1", "m2"])
        );
        // A waiting task for m2 loads it before a task leased now renders:
        // the worker counts as m2's holder, once, as the store counts it.
        assert_eq!(
            models_ahead(names(&["m1"]), names(&["m1", "m2", "m2"])),
            names(&["m2"])
        );
        assert_eq!(
            models_ahead(names(&[]), names(&["m3", "m2"])),
            names(&["m3", "m2"])
        );
    }

    #[test]
    fn a_worker_reports_the_lora_sets_its_waiting_tasks_will_merge() {
        let set = |model: &str, key: &str| ReadyLoraSet {
            model: model.into(),
            set: key.into(),
        };
        let ready = vec![set("m1", "ink")];
        assert_eq!(sets_ahead(ready.clone(), []), ready);
        assert_eq!(
            sets_ahead(
                ready.clone(),
                [set("m1", "ink"), set("m1", "mira"), set("m1", "mira")]
            ),
            [set("m1", "mira"), set("m1", "ink")]
        );
    }
}
