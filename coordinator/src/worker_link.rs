//! The `kiln.v1.WorkerLink` service: what workers call. Every report carries
//! the lease's epoch, and the store refuses a stale one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use kiln_proto::error::{FieldError, quote};
use kiln_proto::ids::{Epoch, JobId, TaskId, WorkerId};
use kiln_proto::model::short_hash;
use kiln_proto::status::bounded;
use kiln_proto::{pb, telemetry};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::auth::{Caller, caller_of};
use crate::clock::unix_ms;
use crate::convert;
use crate::core::Core;
use crate::error::{CoordinatorError, CoordinatorResult, Report, StaleRefusal};
use crate::metrics::{self, Completion};
use crate::store::{
    Claim, CompleteOutcome, FailOutcome, Fault, Lease, NextClaim, Outcome, Preview, ProgressReport,
    StoreError, StoreResult, TaskRecord, TaskResult, TaskState, WorkerRegistration,
};

/// Most tasks one Lease call may ask for.
const MAX_TASKS_PER_LEASE: u32 = 64;

/// The `WorkerLink` service over a [`Core`].
pub struct WorkerLinkService {
    core: Arc<Core>,
    sent: SentLeases,
}

impl WorkerLinkService {
    /// Returns the service.
    pub fn new(core: Arc<Core>) -> Self {
        Self {
            core,
            sent: SentLeases::default(),
        }
    }
}

/// Leases this coordinator sent and whose report it has not taken in yet,
/// remembered so that a completion need not read its task back from the
/// store (on Redis a round trip and the whole task hash per task): what a
/// completion needs of its task never changes while the lease holds. A
/// completion of a lease sent by another coordinator, or forgotten, reads the
/// task as before; so does a replayed report, whose entry the first one took.
#[derive(Default)]
struct SentLeases(Mutex<HashMap<TaskId, Leased>>);

/// Leases [`SentLeases`] remembers; the memory starts over when full (leases
/// that expire or fail are never taken out otherwise).
const REMEMBERED_LEASES: usize = 65_536;

/// What a completion needs of its task, from a lease this coordinator sent
/// or from the store's record.
#[derive(Clone, Debug)]
struct Leased {
    epoch: Epoch,
    job: JobId,
    index: u32,
    model: String,
    /// The image's width and height (`Recipe::output_size`).
    output: (u32, u32),
    file_name: String,
    /// Whether no completion of the task was accepted before this report
    /// (a replayed report of an accepted completion counts once).
    first_report: bool,
    /// When the attempt under this report's epoch began (Unix ms), if known.
    started_at_ms: Option<i64>,
}

impl SentLeases {
    /// Remembers leases just sent to a worker.
    fn remember(&self, leases: &[Lease]) {
        let Ok(mut sent) = self.0.lock() else { return };
        if sent.len() + leases.len() > REMEMBERED_LEASES {
            sent.clear();
        }
        let now = unix_ms();
        for l in leases {
            sent.insert(
                l.task,
                Leased {
                    epoch: l.epoch,
                    job: l.job,
                    index: l.index,
                    model: l.recipe.model.clone(),
                    output: l.recipe.output_size(),
                    file_name: l.file_name.clone(),
                    first_report: true,
                    started_at_ms: Some(now),
                },
            );
        }
    }

    /// Takes out what was remembered of `task`'s lease under `epoch`, if
    /// anything: any report ends that lease, so a second one reads the store.
    fn take(&self, task: TaskId, epoch: Epoch) -> Option<Leased> {
        let mut sent = self.0.lock().ok()?;
        let leased = sent.remove(&task)?;
        (leased.epoch == epoch).then_some(leased)
    }
}

impl Leased {
    /// What a report under `epoch` needs of the task record `task`.
    fn of_record(task: &TaskRecord, epoch: Epoch) -> Self {
        Self {
            epoch,
            job: task.job,
            index: task.index,
            model: task.recipe.model.clone(),
            output: task.recipe.output_size(),
            file_name: task.file_name.clone(),
            first_report: task.state != TaskState::Completed,
            started_at_ms: task
                .attempts
                .last()
                .filter(|a| a.epoch == epoch)
                .map(|a| a.started_at_ms),
        }
    }
}

/// Each method hands the request to a function of this module that speaks
/// [`CoordinatorError`]; the `?` here is where that becomes a `Status`.
#[tonic::async_trait]
impl pb::worker_link_server::WorkerLink for WorkerLinkService {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let caller = caller_of(&request)?;
        Ok(Response::new(
            register(&self.core, &caller, request.into_inner()).await?,
        ))
    }

    async fn lease(
        &self,
        request: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseResponse>, Status> {
        let caller = caller_of(&request)?;
        Ok(Response::new(
            lease(&self.core, &self.sent, &caller, request.into_inner()).await?,
        ))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let caller = caller_of(&request)?;
        Ok(Response::new(
            heartbeat(&self.core, &caller, request.into_inner()).await?,
        ))
    }

    async fn complete(
        &self,
        request: Request<pb::CompleteRequest>,
    ) -> Result<Response<pb::CompleteResponse>, Status> {
        // A child of the worker's span of this task, when it sent a traceparent.
        let span = tracing::info_span!("result_intake", task = %request.get_ref().task_id);
        telemetry::adopt(&span, request.metadata());
        let caller = caller_of(&request)?;
        let mut req = request.into_inner();
        let ask = (req.lease_next > 0).then(|| NextAsk {
            max: req.lease_next.min(MAX_TASKS_PER_LEASE) as usize,
            resident: std::mem::take(&mut req.resident_models),
            ready: kiln_proto::convert::ready_sets_from_pb(&req.ready_lora_sets),
        });
        let next = intake(&self.core, &self.sent, &caller, req, ask.as_ref())
            .instrument(span)
            .await?;
        Ok(Response::new(pb::CompleteResponse { next }))
    }

    async fn fail(
        &self,
        request: Request<pb::FailRequest>,
    ) -> Result<Response<pb::FailResponse>, Status> {
        let caller = caller_of(&request)?;
        Ok(Response::new(
            fail(&self.core, &caller, request.into_inner()).await?,
        ))
    }
}

async fn register(
    core: &Core,
    caller: &Caller,
    req: pb::RegisterRequest,
) -> CoordinatorResult<pb::RegisterResponse> {
    let id = WorkerId::parse_field("worker_id", &req.worker_id)?;
    if req.slots == 0 || req.slots > MAX_TASKS_PER_LEASE {
        return Err(FieldError::new(
            "slots",
            format!(
                "must be between 1 and {MAX_TASKS_PER_LEASE}, got {}",
                req.slots
            ),
        )
        .into());
    }
    let models = convert::announced("models", &req.models)?;
    let assets = convert::held_assets(&req)?;
    let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
    let asset_names: Vec<&str> = [&assets.loras, &assets.embeddings, &assets.controlnets]
        .into_iter()
        .flatten()
        .map(|m| m.name.as_str())
        .collect();
    tracing::info!(worker = %id, token = %caller.name, slots = req.slots, models = ?names, assets = ?asset_names, class = %req.determinism_class, "worker registered");
    let announced = models.clone();
    let released = core
        .store
        .register_worker(
            WorkerRegistration {
                id: id.clone(),
                labels: req.labels.into_iter().collect(),
                gpu_memory_bytes: req.gpu_memory_bytes,
                slots: req.slots,
                models,
                determinism_class: req.determinism_class,
                version: req.version,
                assets,
            },
            caller.principal(),
        )
        .await?;
    for r in released {
        metrics::lease_expired();
        tracing::warn!(worker = %id, job = %r.job, task = %r.task, epoch = %r.epoch, "worker re-registered: its old lease was released");
        if let Some(job) = r.job_finished {
            core.finalize(job.id).await;
        }
    }
    // Another build of a model than the one its name means on the farm: the
    // worker gets no task pinned to the farm's hash, so say so once here.
    let identities = core.store.models().await?;
    for m in &announced {
        if let Some(farm) = identities
            .iter()
            .find(|i| i.name == m.name && i.chosen() != m.hash)
        {
            tracing::warn!(worker = %id, model = %m.name, hash = %short_hash(&m.hash), farm = %short_hash(farm.chosen()), "the worker holds another build of the model than the farm's: it gets no task pinned to the farm's hash");
        }
    }
    let config = &core.config;
    Ok(pb::RegisterResponse {
        heartbeat_interval_ms: config.heartbeat_interval.as_millis() as u32,
        lease_ttl_ms: config.lease_ttl.as_millis() as u32,
    })
}

async fn lease(
    core: &Core,
    sent: &SentLeases,
    caller: &Caller,
    req: pb::LeaseRequest,
) -> CoordinatorResult<pb::LeaseResponse> {
    let worker = WorkerId::parse_field("worker_id", &req.worker_id)?;
    let owner = caller.principal();
    let max = req.max_tasks.min(MAX_TASKS_PER_LEASE) as usize;
    let wait = Duration::from_millis(u64::from(req.wait_ms)).min(core.config.max_lease_wait);
    // Read at every claim: a SIGHUP reload changes the caps of the next one.
    let caps = core.auth.running_caps();
    let ttl = core.config.lease_ttl;
    let ready = kiln_proto::convert::ready_sets_from_pb(&req.ready_lora_sets);
    let claim = tokio::select! {
        c = core.store.claim(&worker, owner, max, ttl, wait, &req.resident_models, &ready, &caps) => c?,
        // Claims are cancel-safe: dropping a waiting claim leased nothing.
        _ = core.shutdown.cancelled() => Default::default(),
    };
    answer(core, sent, &worker, owner, &claim).await
}

/// Answers a claim with its leases (see [`lease_response`]); when that
/// fails, hands the leases back first.
async fn answer(
    core: &Core,
    sent: &SentLeases,
    worker: &WorkerId,
    owner: Option<&str>,
    claim: &Claim,
) -> CoordinatorResult<pb::LeaseResponse> {
    match lease_response(core, worker, claim).await {
        Ok(response) => {
            sent.remember(&claim.leases);
            Ok(response)
        }
        Err((broken, e)) => {
            // The worker never learns of these leases: hand them back now
            // rather than let them wait for their TTL and cost an attempt. A
            // lease whose own inputs are lost for good (its anchor's image is
            // gone) is failed instead, so its attempts run out rather than
            // being leased again and again.
            let why = e.to_string();
            for l in &claim.leases {
                let permanent = broken == Some(l.task) && !e.is_transient();
                let fault = if permanent {
                    Fault::Internal
                } else {
                    Fault::Cancelled
                };
                hand_back(core, worker, owner, l, fault, &why).await;
            }
            Err(CoordinatorError::LeaseNotSent(Box::new(e)))
        }
    }
}

/// What a Complete asks for its next leases (`CompleteRequest.lease_next`):
/// a Lease that never waits, claimed in the store's transition that accepts
/// the result ([`Store::complete_and_claim`](crate::store::Store::complete_and_claim)).
struct NextAsk {
    max: usize,
    resident: Vec<String>,
    ready: Vec<kiln_proto::lora_set::ReadyLoraSet>,
}

/// Answers a completion's next claim. The result stands whatever happens
/// here, so a claim that failed or cannot be sent is logged and left out
/// (claimed leases that cannot be sent are handed back by [`answer`]); the
/// worker then calls Lease itself.
async fn next_leases(
    core: &Core,
    sent: &SentLeases,
    worker: &WorkerId,
    owner: Option<&str>,
    claim: StoreResult<Claim>,
) -> Option<pb::LeaseResponse> {
    let answered = match claim {
        Ok(claim) => answer(core, sent, worker, owner, &claim).await,
        Err(e) => Err(e.into()),
    };
    match answered {
        Ok(answer) => Some(answer),
        Err(e) => {
            tracing::warn!(worker = %worker, error = %e, "no lease with the completion; the worker will call Lease");
            None
        }
    }
}

/// Builds the answer to a claim: publishes the images of deduplicated tasks,
/// finalizes the jobs they finished, and reads the blobs of every lease. On
/// failure, names the lease whose blobs could not be read, if it was one.
async fn lease_response(
    core: &Core,
    worker: &WorkerId,
    claim: &Claim,
) -> Result<pb::LeaseResponse, (Option<TaskId>, CoordinatorError)> {
    // The store already counts these tasks as done: publish every one and
    // finalize every job they finished even when one publish fails, then
    // report the first failure.
    let mut first_failure = None;
    for d in &claim.deduped {
        let published = match core.folder(d.job).await {
            Ok(folder) => core
                .results
                .publish(&folder, &d.file_name, &d.source)
                .await
                .map_err(CoordinatorError::from),
            Err(e) => Err(e),
        };
        match published {
            Ok(()) => {
                metrics::task_completed(&d.model, Completion::Deduped);
                tracing::debug!(job = %d.job, task = %d.task, source = %d.source, "served from an earlier result")
            }
            Err(e) => {
                tracing::warn!(job = %d.job, task = %d.task, source = %d.source, error = %e, "could not publish an earlier result");
                first_failure.get_or_insert(e);
            }
        }
    }
    for job in &claim.finished {
        core.finalize(job.id).await;
    }
    if let Some(e) = first_failure {
        return Err((None, e));
    }
    record_queue_waits(core, &claim.leases).await;
    let mut tasks = Vec::with_capacity(claim.leases.len());
    let mut traces = HashMap::new();
    for l in &claim.leases {
        tracing::debug!(worker = %worker, job = %l.job, task = %l.task, index = l.index, epoch = %l.epoch, "leased");
        let mut task = convert::lease(l);
        task.traceparent = lease_trace(core, &mut traces, worker, l).await;
        task.blobs = lease_blobs(core, l).await.map_err(|e| (Some(l.task), e))?;
        tasks.push(task);
    }
    Ok(pb::LeaseResponse {
        tasks,
        drain: claim.drain,
    })
}

/// Records `kiln_queue_wait_seconds` for the leases that are their task's
/// first (epoch 1: epochs grow on every claim and reap), from the job's
/// submission time, which the core remembers per job.
async fn record_queue_waits(core: &Core, leases: &[Lease]) {
    let mut jobs: Vec<(JobId, usize)> = Vec::new();
    for l in leases.iter().filter(|l| l.epoch == Epoch(1)) {
        match jobs.iter_mut().find(|(j, _)| *j == l.job) {
            Some((_, n)) => *n += 1,
            None => jobs.push((l.job, 1)),
        }
    }
    for (job, n) in jobs {
        match core.submitted_at_ms(job).await {
            Ok(created_at_ms) => {
                let waited =
                    Duration::from_millis(u64::try_from(unix_ms() - created_at_ms).unwrap_or(0));
                for _ in 0..n {
                    metrics::queue_wait(waited);
                }
            }
            Err(e) => tracing::debug!(%job, error = %e, "queue wait not recorded"),
        }
    }
}

/// Records a `lease` span in the trace of the lease's job (when the job was
/// submitted traced and this coordinator exports spans) and returns its
/// `traceparent` for the worker; empty otherwise. `traces` keeps each job's
/// context for the rest of one claim.
async fn lease_trace(
    core: &Core,
    traces: &mut HashMap<JobId, Option<String>>,
    worker: &WorkerId,
    lease: &Lease,
) -> String {
    if !telemetry::is_exporting() {
        return String::new();
    }
    let parent = match traces.get(&lease.job) {
        Some(parent) => parent.clone(),
        None => {
            let parent = match core.store.job(lease.job).await {
                Ok(job) => job.traceparent,
                Err(e) => {
                    // A trace is not worth failing a lease for.
                    tracing::debug!(job = %lease.job, error = %e, "no trace context for the lease");
                    None
                }
            };
            traces.insert(lease.job, parent.clone());
            parent
        }
    };
    let Some(parent) = parent else {
        return String::new();
    };
    let span = tracing::info_span!("lease", worker = %worker, job = %lease.job, task = %lease.task, index = lease.index, epoch = %lease.epoch);
    telemetry::adopt_traceparent(&span, &parent);
    telemetry::traceparent(&span).unwrap_or_default()
}

/// Ends a lease the worker will never hear of through the store's fail path:
/// with `Fault::Cancelled` it is handed back (queued again at once, no attempt
/// used); with another fault it counts as a failed attempt.
async fn hand_back(
    core: &Core,
    worker: &WorkerId,
    owner: Option<&str>,
    l: &Lease,
    fault: Fault,
    why: &str,
) {
    let message = format!("the coordinator could not send the lease: {why}");
    let handed = core
        .store
        .fail(
            worker,
            owner,
            l.task,
            l.epoch,
            fault,
            &message,
            core.config.max_attempts,
        )
        .await;
    match handed {
        Ok(_) => {
            tracing::warn!(worker = %worker, job = %l.job, task = %l.task, epoch = %l.epoch, %fault, reason = %why, "lease not sent: handed back")
        }
        // The lease then expires and is reaped as before.
        Err(e) => {
            tracing::warn!(worker = %worker, task = %l.task, epoch = %l.epoch, error = %e, "could not hand a lease back")
        }
    }
}

async fn heartbeat(
    core: &Core,
    caller: &Caller,
    req: pb::HeartbeatRequest,
) -> CoordinatorResult<pb::HeartbeatResponse> {
    let worker = WorkerId::parse_field("worker_id", &req.worker_id)?;
    let mut progress = Vec::with_capacity(req.tasks.len());
    for (i, t) in req.tasks.iter().enumerate() {
        progress.push(ProgressReport {
            task: TaskId::parse_field(&format!("tasks[{i}].task_id"), &t.task_id)?,
            epoch: Epoch(t.epoch),
            step: t.step,
        });
    }
    let ttl = core.config.lease_ttl;
    let out = core
        .store
        .heartbeat(&worker, caller.principal(), &progress, ttl)
        .await?;
    keep_previews(core, &worker, &req.tasks, &progress, &out.extended).await;
    Ok(pb::HeartbeatResponse {
        extended_task_ids: out.extended.iter().map(|t| t.to_string()).collect(),
        abandon: out
            .abandon
            .iter()
            .map(|(task, epoch, reason)| pb::Abandon {
                task_id: task.to_string(),
                epoch: epoch.0,
                reason: convert::abandon_reason(*reason).into(),
            })
            .collect(),
        lease_ttl_ms: ttl.as_millis() as u32,
        drain: out.drain,
    })
}

/// Keeps the live previews a heartbeat carried for the leases it extended,
/// each for one lease TTL: a worker that falls silent has its preview gone
/// with its lease. A malformed preview, or a store that cannot keep one, is
/// logged and skipped: previews never cost a worker its lease.
async fn keep_previews(
    core: &Core,
    worker: &WorkerId,
    reported: &[pb::LeaseProgress],
    progress: &[ProgressReport],
    extended: &[TaskId],
) {
    for (i, (wire, p)) in reported.iter().zip(progress).enumerate() {
        if wire.preview_png.is_empty() || !extended.contains(&p.task) {
            continue;
        }
        let path = format!("tasks[{i}].preview_png");
        if let Err(e) = kiln_proto::preview::check(&path, &wire.preview_png) {
            tracing::warn!(worker = %worker, task = %p.task, error = %e, "preview refused");
            continue;
        }
        let preview = Preview {
            step: wire.preview_step,
            png: wire.preview_png.clone(),
        };
        let kept = core
            .store
            .put_preview(worker, p.task, p.epoch, &preview, core.config.lease_ttl)
            .await;
        if let Err(e) = kept {
            tracing::warn!(worker = %worker, task = %p.task, error = %e, "cannot keep a preview");
        }
    }
}

async fn fail(
    core: &Core,
    caller: &Caller,
    req: pb::FailRequest,
) -> CoordinatorResult<pb::FailResponse> {
    let worker = WorkerId::parse_field("worker_id", &req.worker_id)?;
    let task = TaskId::parse_field("task_id", &req.task_id)?;
    let epoch = Epoch(req.epoch);
    let fault = convert::fault_from_wire(req.fault);
    // The worker's words go into the task's history, events and logs: bounded
    // like every message the coordinator passes on.
    let message = bounded(req.message);
    let out = core
        .store
        .fail(
            &worker,
            caller.principal(),
            task,
            epoch,
            fault,
            &message,
            core.config.max_attempts,
        )
        .await?;
    match out {
        FailOutcome::Recorded {
            will_retry,
            job_finished,
        } => {
            tracing::warn!(worker = %worker, task = %task, epoch = %epoch, %fault, will_retry, %message, "task failed");
            if fault == Fault::Cancelled {
                metrics::attempt_ended(Outcome::Cancelled, Some(fault));
            } else {
                metrics::attempt_ended(Outcome::Failed, Some(fault));
                if !will_retry {
                    match core.store.task(task).await {
                        Ok(t) => metrics::task_completed(&t.recipe.model, Completion::Failed),
                        Err(e) => tracing::debug!(%task, error = %e, "failure not counted"),
                    }
                }
            }
            if let Some(job) = job_finished {
                core.finalize(job.id).await;
            }
            Ok(pb::FailResponse { will_retry })
        }
        FailOutcome::Stale { reason } => {
            Err(stale(core, &worker, task, epoch, Report::Fail, reason).await)
        }
    }
}

/// Explains a refused report from the task as the store holds it now: the
/// store's outcome says only that the lease is not the reporter's.
async fn stale(
    core: &Core,
    worker: &WorkerId,
    task: TaskId,
    epoch: Epoch,
    report: Report,
    store_reason: String,
) -> CoordinatorError {
    match core.store.task(task).await {
        Ok(record) => CoordinatorError::Stale {
            job: record.job,
            task,
            worker: worker.clone(),
            report,
            refusal: StaleRefusal::of(&record, worker, epoch, store_reason),
        },
        Err(e) => e.into(),
    }
}

/// Returns the images a leased recipe refers to: the job's blobs, or for a
/// shot, its anchor's accepted image from the result store (the anchor is
/// looked up by index: one store read, whatever the job's size).
async fn lease_blobs(core: &Core, lease: &Lease) -> CoordinatorResult<Vec<pb::Blob>> {
    let refs: Vec<String> = lease.recipe.images();
    if refs.is_empty() {
        return Ok(Vec::new());
    }
    let mut found = core.store.blobs(lease.job, &refs).await?;
    let missing: Vec<&String> = refs
        .iter()
        .filter(|r| !found.iter().any(|(sha, _)| sha == *r))
        .collect();
    if let Some(anchor) = lease.anchor.filter(|_| !missing.is_empty()) {
        let t = core.store.task_at(lease.job, anchor).await?;
        if let Some(result) = t.result.as_ref().filter(|r| missing.contains(&&r.sha256)) {
            let folder = core.folder(lease.job).await?;
            let png = core
                .results
                .read_image(&folder, &t.file_name, &result.object)
                .await?;
            found.push((result.sha256.clone(), png));
        }
    }
    Ok(found
        .into_iter()
        .map(|(sha256, data)| pb::Blob {
            sha256,
            data: data.to_vec(),
        })
        .collect())
}

/// Takes in a rendered image: checks it, stages it under its epoch, lets the
/// store decide (and claim the worker's next leases in the same transition
/// when it asks for them), then publishes or discards it. Returns the next
/// leases' answer, if asked for and made.
async fn intake(
    core: &Core,
    sent: &SentLeases,
    caller: &Caller,
    req: pb::CompleteRequest,
    ask: Option<&NextAsk>,
) -> CoordinatorResult<Option<pb::LeaseResponse>> {
    let worker = WorkerId::parse_field("worker_id", &req.worker_id)?;
    let task_id = TaskId::parse_field("task_id", &req.task_id)?;
    let epoch = Epoch(req.epoch);
    let digest = kiln_domain::image::sha256_hex(&req.png);
    if !req.sha256.eq_ignore_ascii_case(&digest) {
        return Err(FieldError::new(
            "sha256",
            format!(
                "does not match the uploaded bytes: got {}, computed {digest}",
                quote(&req.sha256)
            ),
        )
        .into());
    }
    let task = match sent.take(task_id, epoch) {
        Some(leased) => leased,
        None => Leased::of_record(&core.store.task(task_id).await?, epoch),
    };
    let (w, h) = png_size(&req.png)
        .ok_or_else(|| FieldError::new("png", "is not a PNG image (no IHDR header)"))?;
    // With the hires fix the image is its second pass's size.
    let (want_w, want_h) = task.output;
    if (w, h) != (want_w, want_h) {
        return Err(FieldError::new(
            "png",
            format!("is {w}x{h}, but the recipe asks for {want_w}x{want_h}"),
        )
        .into());
    }
    let timings = req.timings.unwrap_or_default();
    let size = req.png.len() as u64;
    let folder = core.folder(task.job).await?;
    let staged = core
        .results
        .stage(&folder, task_id, epoch, Bytes::from(req.png))
        .await?;
    let result = TaskResult {
        object: staged.clone(),
        sha256: digest,
        size,
        model_hash: req.model_hash,
        render_ms: timings.render_ms,
        encode_ms: timings.encode_ms,
        // The store fills in the worker's class.
        class: String::new(),
    };
    let owner = caller.principal();
    let (outcome, claim) = match ask {
        Some(ask) => {
            let caps = core.auth.running_caps();
            let next = NextClaim {
                max: ask.max,
                ttl: core.config.lease_ttl,
                resident: &ask.resident,
                ready: &ask.ready,
                caps: &caps,
            };
            match core
                .store
                .complete_and_claim(&worker, owner, task_id, epoch, result, next)
                .await
            {
                Ok((outcome, claim)) => (Ok(outcome), claim),
                Err(e) => (Err(e), None),
            }
        }
        None => (
            core.store
                .complete(&worker, owner, task_id, epoch, result)
                .await,
            None,
        ),
    };
    match outcome {
        Ok(CompleteOutcome::Accepted { job_finished }) => {
            // A replayed report of an accepted completion is accepted
            // again; it counts once.
            if task.first_report {
                metrics::task_completed(&task.model, Completion::Completed);
                metrics::attempt_ended(Outcome::Completed, None);
                if let Some(started) = task.started_at_ms {
                    let took = u64::try_from(unix_ms() - started).unwrap_or(0);
                    metrics::task_time(&task.model, Duration::from_millis(took));
                }
            }
            if let Err(e) = core
                .results
                .publish(&folder, &task.file_name, &staged)
                .await
            {
                // The worker hears of the failure, not of the next leases:
                // hand them back rather than let them wait for their TTL.
                if let Some(Ok(claim)) = &claim {
                    let why = format!("the completion's image could not be published: {e}");
                    for l in &claim.leases {
                        hand_back(core, &worker, owner, l, Fault::Cancelled, &why).await;
                    }
                }
                return Err(e.into());
            }
            tracing::debug!(worker = %worker, job = %task.job, index = task.index, epoch = %epoch, "completed");
            if let Some(job) = job_finished {
                core.finalize(job.id).await;
            }
            Ok(match claim {
                Some(claim) => next_leases(core, sent, &worker, owner, claim).await,
                None => None,
            })
        }
        Ok(CompleteOutcome::Stale { reason }) => {
            metrics::stale_completion();
            core.results.discard(&staged).await?;
            let refused = stale(core, &worker, task_id, epoch, Report::Complete, reason).await;
            tracing::warn!(worker = %worker, job = %task.job, task = %task_id, epoch = %epoch, error = %refused, "stale completion refused");
            Err(refused)
        }
        // Refused before anything changed: the upload is never accepted.
        Err(e @ StoreError::WorkerBound(_)) => {
            core.results.discard(&staged).await?;
            Err(e.into())
        }
        // The outcome is unknown (the store may have accepted it before the
        // connection failed), so the staged upload stays: the worker retries,
        // and the job's finalize publishes or removes it.
        Err(e) => Err(e.into()),
    }
}

/// Returns the width and height in a PNG's IHDR chunk.
fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    if png.len() < 24 || &png[..8] != SIGNATURE || &png[12..16] != b"IHDR" {
        return None;
    }
    let w = u32::from_be_bytes(png[16..20].try_into().ok()?);
    let h = u32::from_be_bytes(png[20..24].try_into().ok()?);
    Some((w, h))
}
#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::store::ModelInfo;
    use kiln_proto::ids::JobId;
    use kiln_proto::pb::worker_link_server::WorkerLink;
    use kiln_proto::recipe::{Recipe, Scheduler};

    use super::*;
    use crate::config::CoordinatorConfig;
    use crate::results::ResultStore;
    use crate::store::{
        Lease, MemoryStore, NewJob, NewTask, Outcome, SeriesPlace, Store, TaskResult, TaskState,
    };

    /// Claims one task for `worker` (a 30 s lease, no wait); the test has queued one.
    async fn claim_one(store: &MemoryStore, worker: &WorkerId) -> Lease {
        crate::store::conformance::claim(store, &worker.0, 1)
            .await
            .remove(0)
    }

    fn task(index: u32, depends_on: Option<u32>) -> NewTask {
        NewTask {
            id: TaskId::new(),
            index,
            recipe: Recipe {
                model: "tiny".into(),
                model_hash: String::new(),
                prompt: "a lighthouse".into(),
                negative_prompt: String::new(),
                seed: u64::from(index),
                steps: 2,
                guidance: 5.0,
                width: 64,
                height: 64,
                scheduler: Scheduler::Ddim,
                karras: false,
                eta: 0.0,
                strength: 0.5,
                init_image: None,
                mask: None,
                noise_seed: None,
                extras: Default::default(),
            },
            file_name: format!("{index:05}-lighthouse.png"),
            series: Some(SeriesPlace {
                name: "coast".into(),
                shot: index,
                depends_on,
            }),
            avoid: Vec::new(),
        }
    }

    /// Registers `id` as a one-slot worker holding model `tiny` (hash `h`).
    async fn register_tiny_worker(store: &MemoryStore, id: &WorkerId) {
        store
            .register_worker(
                WorkerRegistration {
                    id: id.clone(),
                    labels: BTreeMap::new(),
                    gpu_memory_bytes: 0,
                    slots: 1,
                    models: vec![ModelInfo {
                        name: "tiny".into(),
                        hash: "h".into(),
                    }],
                    determinism_class: "cpu/f32".into(),
                    version: "test".into(),
                    assets: Default::default(),
                },
                None,
            )
            .await
            .unwrap();
    }

    /// Creates job `id` named `name` in project `default` with `tasks`.
    async fn create_job(
        store: &MemoryStore,
        id: JobId,
        name: &str,
        tasks: Vec<NewTask>,
        pin_class: bool,
    ) {
        store
            .create_job(NewJob {
                id,
                name: name.into(),
                project: "default".into(),
                priority: 0,
                idempotency_key: None,
                tasks,
                blobs: Vec::new(),
                pin_class,
                class: None,
                dedupe: false,
                verify_of: None,
                traceparent: None,
                notify: Vec::new(),
                submitted_by: None,
            })
            .await
            .unwrap();
    }

    /// A shot whose anchor image is lost from the result store: the Lease
    /// call fails without waiting for the leases' TTL, never as NOT_FOUND (the
    /// worker would take it for a lost session). The loss costs the shot an
    /// attempt each time, so it fails for good instead of being leased
    /// forever; a task sent in the same answer is handed back free.
    #[tokio::test]
    async fn a_lease_whose_input_is_lost_fails_its_task_and_spares_the_others() {
        let store = Arc::new(MemoryStore::new());
        let w = WorkerId("w1".into());
        register_tiny_worker(&store, &w).await;
        let job = JobId::new();
        create_job(
            &store,
            job,
            "coast",
            vec![task(0, None), task(1, Some(0)), task(2, None)],
            true,
        )
        .await;
        let anchor = claim_one(&store, &w).await;
        // Accepted, but its image never reached the result store.
        let result = TaskResult {
            object: "nowhere/.staging/lost.png".into(),
            sha256: "ab".repeat(32),
            size: 1,
            model_hash: "h".into(),
            render_ms: 1,
            encode_ms: 1,
            class: String::new(),
        };
        store
            .complete(&w, None, anchor.task, anchor.epoch, result)
            .await
            .unwrap();
        let core = Arc::new(Core::new(
            store.clone(),
            ResultStore::in_memory(),
            CoordinatorConfig::default(),
        ));
        let service = WorkerLinkService::new(core.clone());
        let lease = |max_tasks| {
            let mut request = Request::new(pb::LeaseRequest {
                worker_id: "w1".into(),
                max_tasks,
                wait_ms: 0,
                resident_models: Vec::new(),
                ready_lora_sets: Vec::new(),
            });
            // What the interceptor puts there without --auth.
            request.extensions_mut().insert(Caller::implicit_admin());
            service.lease(request)
        };
        // One answer with the shot and an innocent task of the same job.
        let answer = lease(2).await;
        let status = answer.expect_err("the anchor image cannot be read");
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
        let shot = store.task_at(job, 1).await.unwrap();
        assert_eq!(shot.state, TaskState::Queued, "queued again at once");
        assert_eq!(shot.attempts.len(), 1);
        assert_eq!(shot.attempts[0].outcome, Outcome::Failed);
        assert_eq!(shot.faults(), 1, "a lost input costs an attempt");
        let innocent = store.task_at(job, 2).await.unwrap();
        assert_eq!(innocent.state, TaskState::Queued, "handed back at once");
        assert_eq!(innocent.attempts.len(), 1, "it was in the same answer");
        assert_eq!(innocent.attempts[0].outcome, Outcome::Cancelled);
        assert_eq!(innocent.faults(), 0, "a hand-back uses no attempt");
        // The only worker keeps getting it until the policy gives up on it.
        let mut calls = 1;
        while store.task_at(job, 1).await.unwrap().state == TaskState::Queued {
            assert!(calls < 10, "the shot is leased forever");
            let status = lease(1).await.expect_err("still unreadable");
            assert_ne!(status.code(), tonic::Code::NotFound);
            calls += 1;
        }
        let shot = store.task_at(job, 1).await.unwrap();
        assert_eq!(shot.state, TaskState::Failed, "{:?}", shot.attempts);
        // The innocent task was never charged and is leased normally now.
        let answer = lease(1)
            .await
            .expect("the innocent task is sent")
            .into_inner();
        let ids: Vec<String> = answer.tasks.iter().map(|t| t.task_id.clone()).collect();
        let innocent = store.task_at(job, 2).await.unwrap();
        assert_eq!(ids, [innocent.id.to_string()]);
        assert_eq!(innocent.faults(), 0);
    }

    fn png(shade: u8) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(64, 64, image::Rgb([shade, 0, 0]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    fn complete_request(task: TaskId, epoch: Epoch, png: Vec<u8>) -> Request<pb::CompleteRequest> {
        let mut request = Request::new(pb::CompleteRequest {
            worker_id: "w1".into(),
            task_id: task.to_string(),
            epoch: epoch.0,
            sha256: kiln_domain::image::sha256_hex(&png),
            png,
            model_hash: "h".into(),
            timings: None,
            ..Default::default()
        });
        // What the interceptor puts there without --auth.
        request.extensions_mut().insert(Caller::implicit_admin());
        request
    }

    /// A Complete asking for `lease_next` carries the worker's next lease
    /// back, taken only after the result was accepted; with nothing queued
    /// it carries an empty answer, and a request without the field (an older
    /// worker) gets none: that worker calls Lease as before.
    #[tokio::test]
    async fn a_completion_carries_the_next_lease_when_asked() {
        let store = Arc::new(MemoryStore::new());
        register_tiny_worker(&store, &WorkerId("w1".into())).await;
        let job = JobId::new();
        let mut tasks = vec![task(0, None), task(1, None), task(2, None)];
        for t in &mut tasks {
            t.series = None;
        }
        create_job(&store, job, "three", tasks, false).await;
        let core = Arc::new(Core::new(
            store.clone(),
            ResultStore::in_memory(),
            CoordinatorConfig::default(),
        ));
        let service = WorkerLinkService::new(core);
        let first = claim_one(&store, &WorkerId("w1".into())).await;
        let ask = |task: TaskId, epoch: Epoch, lease_next: u32| {
            let mut request = complete_request(task, epoch, png(1));
            request.get_mut().lease_next = lease_next;
            request.get_mut().resident_models = vec!["tiny".into()];
            service.complete(request)
        };
        let next = ask(first.task, first.epoch, 1)
            .await
            .unwrap()
            .into_inner()
            .next
            .expect("asked for a next lease");
        assert_eq!(next.tasks.len(), 1);
        let second = store.task_at(job, 1).await.unwrap();
        assert_eq!(next.tasks[0].task_id, second.id.to_string());
        assert_eq!(second.state, TaskState::Leased);
        assert_eq!(second.attempts[0].worker, WorkerId("w1".into()));
        let first_now = store.task_at(job, 0).await.unwrap();
        assert_eq!(first_now.state, TaskState::Completed, "accepted first");
        // An older worker's request: the result is taken, no lease with it.
        let answer = ask(second.id, Epoch(next.tasks[0].epoch), 0)
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.next, None);
        assert_eq!(
            store.task_at(job, 2).await.unwrap().state,
            TaskState::Queued,
            "nothing leased without lease_next"
        );
        let third = claim_one(&store, &WorkerId("w1".into())).await;
        // Nothing left to lease: an empty answer, and the job is done.
        let last = ask(third.task, third.epoch, 1).await.unwrap().into_inner();
        assert_eq!(last.next.map(|n| n.tasks.len()), Some(0));
        let counts: Vec<TaskState> = store
            .tasks(job)
            .await
            .unwrap()
            .iter()
            .map(|t| t.state)
            .collect();
        assert_eq!(counts, [TaskState::Completed; 3]);
    }

    /// A lease the coordinator sent answers its completion as the task's
    /// record would, once, and only under its own epoch.
    #[tokio::test]
    async fn a_sent_lease_answers_its_completion_as_the_record_would() {
        let store = Arc::new(MemoryStore::new());
        let worker = WorkerId("w1".into());
        register_tiny_worker(&store, &worker).await;
        let job = JobId::new();
        create_job(&store, job, "one", vec![task(0, None)], false).await;
        let lease = claim_one(&store, &worker).await;
        let record = Leased::of_record(&store.task(lease.task).await.unwrap(), lease.epoch);
        let sent = SentLeases::default();
        sent.remember(std::slice::from_ref(&lease));
        assert!(
            sent.take(lease.task, lease.epoch.next()).is_none(),
            "another epoch's report reads the store"
        );
        sent.remember(std::slice::from_ref(&lease));
        let remembered = sent.take(lease.task, lease.epoch).expect("remembered");
        let facts = |l: &Leased| {
            (
                l.epoch,
                l.job,
                l.index,
                l.model.clone(),
                l.output,
                l.file_name.clone(),
                l.first_report,
                l.started_at_ms.is_some(),
            )
        };
        assert_eq!(facts(&remembered), facts(&record));
        assert!(
            sent.take(lease.task, lease.epoch).is_none(),
            "a second report reads the store"
        );
    }

    /// On a real S3 API (moto, see `kiln_tests::s3`): a completion under an epoch the store
    /// refuses leaves nothing in the bucket, neither under the final name
    /// nor staged; the accepted one appears under the final name only.
    #[tokio::test]
    async fn a_refused_completion_leaves_nothing_in_the_bucket() {
        let s3 = kiln_tests::s3::S3Server::start().unwrap();
        let results =
            ResultStore::open_with_env(&format!("s3://{}/unit", s3.bucket()), s3.env()).unwrap();
        results.check().await.unwrap();
        let store = Arc::new(MemoryStore::new());
        let registration = WorkerRegistration {
            id: WorkerId("w1".into()),
            labels: BTreeMap::new(),
            gpu_memory_bytes: 0,
            slots: 1,
            models: vec![ModelInfo {
                name: "tiny".into(),
                hash: "h".into(),
            }],
            determinism_class: "cpu/f32".into(),
            version: "test".into(),
            assets: Default::default(),
        };
        store
            .register_worker(registration.clone(), None)
            .await
            .unwrap();
        let job = JobId::new();
        store
            .create_job(NewJob {
                id: job,
                name: "two".into(),
                project: "default".into(),
                priority: 0,
                idempotency_key: None,
                // Two tasks, so the job stays running: no manifest yet.
                tasks: vec![task(0, None), task(1, None)],
                blobs: Vec::new(),
                pin_class: false,
                class: None,
                dedupe: false,
                verify_of: None,
                traceparent: None,
                notify: Vec::new(),
                submitted_by: None,
            })
            .await
            .unwrap();
        let w = WorkerId("w1".into());
        let old = claim_one(&store, &w).await;
        // The worker restarts: its old lease is released and fenced.
        store.register_worker(registration, None).await.unwrap();
        let new = claim_one(&store, &w).await;
        assert!(new.epoch > old.epoch);
        let core = Arc::new(Core::new(
            store.clone(),
            results,
            CoordinatorConfig::default(),
        ));
        let service = WorkerLinkService::new(core);
        let refused = service
            .complete(complete_request(old.task, old.epoch, png(1)))
            .await
            .expect_err("the old epoch is stale");
        assert_eq!(
            refused.code(),
            tonic::Code::FailedPrecondition,
            "{refused:?}"
        );
        assert_eq!(
            s3.keys("unit/").unwrap(),
            Vec::<String>::new(),
            "a refused upload leaves nothing"
        );
        let accepted = png(2);
        service
            .complete(complete_request(new.task, new.epoch, accepted.clone()))
            .await
            .unwrap();
        let final_key = format!("unit/{job}/00000-lighthouse.png");
        assert_eq!(s3.keys("unit/").unwrap(), std::slice::from_ref(&final_key));
        assert_eq!(s3.get(&final_key).unwrap(), accepted);
    }
}
