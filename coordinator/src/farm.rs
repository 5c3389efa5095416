//! The `kiln.v1.Farm` service: what clients call.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use kiln_proto::convert::job_spec_from_pb;
use kiln_proto::error::FieldError;
use kiln_proto::ids::{JobId, WorkerId};
use kiln_proto::{pb, telemetry};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::clock::unix_ms;
use tracing::Instrument;

use crate::auth::{Action, Caller, Projects, caller_of};
use crate::core::Core;
use crate::core::contact_sheet_path;
use crate::error::{CoordinatorError, CoordinatorResult};
use crate::store::{TaskState, USAGE_DAY_MS, Usage, usage_day};
use crate::{admission, control, convert, manifest, models};

/// How often a watcher gets a progress message when no event happens.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Jobs read from the store to list those of a caller scoped to projects.
const SCOPED_LIST_READS: usize = 10_000;
/// Events read from the store per round trip.
const EVENT_BATCH: usize = 512;

/// The `Farm` service over a [`Core`].
pub struct FarmService {
    core: Arc<Core>,
}

impl FarmService {
    /// Returns the service.
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

type Sender<T> = mpsc::Sender<Result<T, Status>>;

/// Each method hands the request to a function of this module that speaks
/// [`CoordinatorError`]; the `?` here is where that becomes a `Status`.
#[tonic::async_trait]
impl pb::farm_server::Farm for FarmService {
    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        // A child of the submitter's span when it sent a traceparent; the job
        // keeps this span's context for its leases.
        let span = tracing::info_span!("submit_job");
        telemetry::adopt(&span, request.metadata());
        let caller = caller_of(&request)?;
        Ok(Response::new(
            submit_job(&self.core, &caller, request.into_inner())
                .instrument(span)
                .await?,
        ))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        let caller = caller_of(&request)?;
        Ok(Response::new(
            get_job(&self.core, &caller, request.into_inner()).await?,
        ))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let caller = caller_of(&request)?;
        Ok(Response::new(
            list_jobs(&self.core, &caller, request.into_inner()).await?,
        ))
    }

    type WatchJobStream = ReceiverStream<Result<pb::WatchJobResponse, Status>>;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let id = known_job(&self.core, &caller, &req.job_id).await?;
        let (tx, rx) = mpsc::channel(64);
        let core = self.core.clone();
        tokio::spawn(async move {
            let outcome = tokio::select! {
                r = watch(&core, id, req.after_cursor, req.previews, &tx) => r,
                _ = core.shutdown.cancelled() => Err(CoordinatorError::ShuttingDown),
            };
            if let Err(e) = outcome {
                let _ = tx.send(Err(e.into())).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type FetchResultsStream = ReceiverStream<Result<pb::FetchResultsResponse, Status>>;

    async fn fetch_results(
        &self,
        request: Request<pb::FetchResultsRequest>,
    ) -> Result<Response<Self::FetchResultsStream>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let id = known_job(&self.core, &caller, &req.job_id).await?;
        let (tx, rx) = mpsc::channel(4);
        let core = self.core.clone();
        tokio::spawn(async move {
            if let Err(e) = fetch(&core, id, req, &tx).await {
                let _ = tx.send(Err(e.into())).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let caller = caller_of(&request)?;
        Ok(Response::new(
            cancel_job(&self.core, &caller, request.into_inner()).await?,
        ))
    }

    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        caller_of(&request)?.require(Action::ListWorkers)?;
        Ok(Response::new(list_workers(&self.core).await?))
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        // Open to every role, like ListWorkers: it shows the same workers.
        caller_of(&request)?.require(Action::ListWorkers)?;
        let models = models::list(&self.core).await?;
        Ok(Response::new(pb::ListModelsResponse {
            models: models.iter().map(convert::model_summary).collect(),
        }))
    }

    async fn verify_job(
        &self,
        request: Request<pb::VerifyJobRequest>,
    ) -> Result<Response<pb::VerifyJobResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let id = JobId::parse_field("job_id", &req.job_id).map_err(CoordinatorError::from)?;
        let done = control::verify(&self.core, &caller, id, req.sample as usize).await?;
        Ok(Response::new(convert::verification(&done)))
    }

    async fn retry_job(
        &self,
        request: Request<pb::RetryJobRequest>,
    ) -> Result<Response<pb::RetryJobResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let id = JobId::parse_field("job_id", &req.job_id).map_err(CoordinatorError::from)?;
        let (job, requeued) = control::retry(&self.core, &caller, id).await?;
        Ok(Response::new(pb::RetryJobResponse {
            job: Some(convert::job(&job)),
            requeued,
        }))
    }

    async fn pause_job(
        &self,
        request: Request<pb::PauseJobRequest>,
    ) -> Result<Response<pb::PauseJobResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let id = job_to_steer(&self.core, &caller, &req.job_id, Action::Pause).await?;
        let job = self
            .core
            .store
            .pause_job(id, req.paused)
            .await
            .map_err(CoordinatorError::from)?;
        tracing::info!(job = %id, paused = job.paused, token = %caller.name, "job pause set");
        Ok(Response::new(pb::PauseJobResponse {
            job: Some(convert::job(&job)),
        }))
    }

    async fn set_job_priority(
        &self,
        request: Request<pb::SetJobPriorityRequest>,
    ) -> Result<Response<pb::SetJobPriorityResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let id = job_to_steer(&self.core, &caller, &req.job_id, Action::Reorder).await?;
        let job = self
            .core
            .store
            .set_priority(id, req.priority)
            .await
            .map_err(CoordinatorError::from)?;
        tracing::info!(job = %id, priority = job.priority, token = %caller.name, "job priority set");
        Ok(Response::new(pb::SetJobPriorityResponse {
            job: Some(convert::job(&job)),
        }))
    }

    async fn get_usage(
        &self,
        request: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        let caller = caller_of(&request)?;
        Ok(Response::new(
            usage(&self.core, &caller, request.into_inner()).await?,
        ))
    }

    async fn drain_worker(
        &self,
        request: Request<pb::DrainWorkerRequest>,
    ) -> Result<Response<pb::DrainWorkerResponse>, Status> {
        let caller = caller_of(&request)?;
        Ok(Response::new(
            drain_worker(&self.core, &caller, request.into_inner()).await?,
        ))
    }
}

async fn submit_job(
    core: &Core,
    caller: &Caller,
    req: pb::SubmitJobRequest,
) -> CoordinatorResult<pb::SubmitJobResponse> {
    caller.require(Action::Submit)?;
    // Wire types stop here: admission speaks the domain JobSpec.
    let spec = req
        .spec
        .ok_or_else(|| FieldError::new("spec", "missing"))
        .and_then(job_spec_from_pb)?;
    let (job, created) = admission::admit(core, caller, spec, &req.idempotency_key).await?;
    if created {
        tracing::info!(job = %job.id, tasks = job.counts.total, name = %job.name, project = %job.project, token = %caller.name, "job submitted");
    } else {
        tracing::info!(job = %job.id, "resubmission returned the existing job");
    }
    Ok(pb::SubmitJobResponse {
        job: Some(convert::job(&job)),
        created,
    })
}

async fn get_job(
    core: &Core,
    caller: &Caller,
    req: pb::GetJobRequest,
) -> CoordinatorResult<pb::GetJobResponse> {
    let id = JobId::parse_field("job_id", &req.job_id)?;
    caller.require(Action::Read)?;
    let job = core.store.job(id).await?;
    caller.job_access(&job, Action::Read)?;
    let tasks = if req.include_tasks {
        core.store.tasks(id).await?
    } else {
        Vec::new()
    };
    Ok(pb::GetJobResponse {
        job: Some(convert::job(&job)),
        tasks: tasks.iter().map(convert::task).collect(),
    })
}

async fn list_jobs(
    core: &Core,
    caller: &Caller,
    req: pb::ListJobsRequest,
) -> CoordinatorResult<pb::ListJobsResponse> {
    caller.require(Action::Read)?;
    let limit = match req.limit {
        0 => 100,
        n => n.min(10_000) as usize,
    };
    // A caller scoped to projects reads further back, so that its own
    // newest jobs fill the list even among other projects' jobs.
    let read = match caller.projects {
        Projects::All => limit,
        Projects::Only(_) => SCOPED_LIST_READS,
    };
    let jobs = core.store.jobs(read).await?;
    Ok(pb::ListJobsResponse {
        jobs: jobs
            .iter()
            .filter(|j| caller.job_access(j, Action::Read).is_ok())
            .take(limit)
            .map(convert::job)
            .collect(),
    })
}

/// Parses a request's job id and checks that the job exists and that the
/// caller may read it, so a stream opens only for a job it can follow.
async fn known_job(core: &Core, caller: &Caller, job_id: &str) -> CoordinatorResult<JobId> {
    let id = JobId::parse_field("job_id", job_id)?;
    control::job_for(core, caller, id, Action::Read).await?;
    Ok(id)
}

/// Parses a request's job id and checks that the caller may take `action`
/// on the job (see [`control::job_for`]).
async fn job_to_steer(
    core: &Core,
    caller: &Caller,
    job_id: &str,
    action: Action,
) -> CoordinatorResult<JobId> {
    let id = JobId::parse_field("job_id", job_id)?;
    control::job_for(core, caller, id, action).await?;
    Ok(id)
}

/// Sums the store's per-day usage buckets from the day holding `since_ms`
/// per project and model, for the projects the caller reaches (and only
/// `project` when one is asked for).
async fn usage(
    core: &Core,
    caller: &Caller,
    req: pb::GetUsageRequest,
) -> CoordinatorResult<pb::GetUsageResponse> {
    caller.require(Action::Read)?;
    let since_day = if req.since_ms > 0 {
        usage_day(req.since_ms)
    } else {
        0
    };
    let mut totals: BTreeMap<(String, String), Usage> = BTreeMap::new();
    for row in core.store.usage(since_day).await? {
        if !caller.may_see(&row.project) || !(req.project.is_empty() || req.project == row.project)
        {
            continue;
        }
        let sum = totals.entry((row.project, row.model)).or_default();
        sum.images += row.usage.images;
        sum.render_ms += row.usage.render_ms;
        sum.failed_attempts += row.usage.failed_attempts;
    }
    Ok(pb::GetUsageResponse {
        usage: totals
            .iter()
            .map(|((project, model), u)| convert::usage_entry(project, model, u))
            .collect(),
        from_ms: since_day * USAGE_DAY_MS,
    })
}

async fn cancel_job(
    core: &Core,
    caller: &Caller,
    req: pb::CancelJobRequest,
) -> CoordinatorResult<pb::CancelJobResponse> {
    let id = JobId::parse_field("job_id", &req.job_id)?;
    let job = control::cancel(core, caller, id).await?;
    Ok(pb::CancelJobResponse {
        job: Some(convert::job(&job)),
    })
}

async fn list_workers(core: &Core) -> CoordinatorResult<pb::ListWorkersResponse> {
    let now = unix_ms();
    let lost_after = 3 * core.config.lease_ttl.as_millis() as i64;
    let workers = core.store.workers().await?;
    Ok(pb::ListWorkersResponse {
        workers: workers
            .iter()
            .map(|w| convert::worker(w, now - w.last_seen_ms > lost_after))
            .collect(),
    })
}

async fn drain_worker(
    core: &Core,
    caller: &Caller,
    req: pb::DrainWorkerRequest,
) -> CoordinatorResult<pb::DrainWorkerResponse> {
    let id = WorkerId::parse_field("worker_id", &req.worker_id)?;
    let w = control::drain(core, caller, &id).await?;
    Ok(pb::DrainWorkerResponse {
        worker: Some(convert::worker(&w, false)),
    })
}

/// Sends the job's events after `cursor`, with progress in between, until
/// the job ends; with `previews`, progress messages also carry the live
/// previews this stream has not sent yet.
async fn watch(
    core: &Core,
    id: JobId,
    mut cursor: u64,
    previews: bool,
    tx: &Sender<pb::WatchJobResponse>,
) -> CoordinatorResult<()> {
    let store = &core.store;
    // The step of the last preview sent per task.
    let mut sent: HashMap<String, u32> = HashMap::new();
    let progress = |job: pb::JobSummary,
                    running: Vec<pb::TaskProgress>,
                    previews: Vec<pb::TaskPreview>| pb::WatchJobResponse {
        event: None,
        job: Some(job),
        running,
        previews,
    };
    // A first message, so the client knows the job's size before any event.
    let running = store.running(id).await?;
    let first = progress(
        convert::job(&store.job(id).await?),
        running.iter().map(convert::running).collect(),
        fresh_previews(core, id, previews, &mut sent).await?,
    );
    if tx.send(Ok(first)).await.is_err() {
        return Ok(());
    }
    let mut last_progress = tokio::time::Instant::now();
    loop {
        let events = store.events(id, cursor, EVENT_BATCH).await?;
        if !events.is_empty() {
            let job = convert::job(&store.job(id).await?);
            for e in events {
                cursor = e.seq;
                let msg = pb::WatchJobResponse {
                    event: Some(convert::event(&e)),
                    job: Some(job.clone()),
                    running: Vec::new(),
                    previews: Vec::new(),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return Ok(());
                }
            }
            continue;
        }
        let job = store.job(id).await?;
        if job.is_finished() {
            // Events written between the read above and this check come first.
            if store.events(id, cursor, 1).await?.is_empty() {
                return Ok(());
            }
            continue;
        }
        if last_progress.elapsed() >= PROGRESS_EVERY {
            let running = store.running(id).await?;
            let msg = progress(
                convert::job(&job),
                running.iter().map(convert::running).collect(),
                fresh_previews(core, id, previews, &mut sent).await?,
            );
            if tx.send(Ok(msg)).await.is_err() {
                return Ok(());
            }
            last_progress = tokio::time::Instant::now();
        }
        store.wait_events(id, cursor, PROGRESS_EVERY).await?;
    }
}

/// Returns the job's live previews that differ from the last one `sent` per
/// task (and records them as sent); none unless `wanted`.
async fn fresh_previews(
    core: &Core,
    id: JobId,
    wanted: bool,
    sent: &mut HashMap<String, u32>,
) -> CoordinatorResult<Vec<pb::TaskPreview>> {
    if !wanted {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for (running, preview) in core.store.previews(id).await? {
        let p = convert::preview(&running, &preview);
        if sent.insert(p.task_id.clone(), p.step) != Some(p.step) {
            out.push(p);
        }
    }
    Ok(out)
}

/// Sends the job's finished items from `req.from_index` on, in index order.
async fn fetch(
    core: &Core,
    id: JobId,
    req: pb::FetchResultsRequest,
    tx: &Sender<pb::FetchResultsResponse>,
) -> CoordinatorResult<()> {
    let job = core.store.job(id).await?;
    let folder = crate::results::folder(job.id, job.verify_of);
    if job.is_finished() && !core.results.has_manifest(&folder).await? {
        core.write_manifest(id).await?;
    }
    let held: HashMap<u32, String> = req.held.into_iter().map(|h| (h.index, h.sha256)).collect();
    let tasks = core.store.tasks(id).await?;
    for task in tasks.iter().filter(|t| t.index >= req.from_index) {
        if matches!(task.state, TaskState::Queued | TaskState::Leased) {
            continue;
        }
        let (png, sha256) = match &task.result {
            Some(r) if held.get(&task.index) == Some(&r.sha256) => (Vec::new(), r.sha256.clone()),
            Some(r) => {
                let bytes = core
                    .results
                    .read_image(&folder, &task.file_name, &r.object)
                    .await?;
                (bytes.to_vec(), r.sha256.clone())
            }
            None => (Vec::new(), String::new()),
        };
        let msg = pb::FetchResultsResponse {
            index: task.index,
            state: convert::task_state(task.state).into(),
            file_name: if task.result.is_some() {
                task.file_name.clone()
            } else {
                String::new()
            },
            sha256,
            manifest_line: manifest::line(&job, task),
            png,
            artifact: String::new(),
        };
        if tx.send(Ok(msg)).await.is_err() {
            return Ok(());
        }
    }
    // Job-level files: each series' contact sheet, once the job has ended.
    let mut series: Vec<&str> = tasks
        .iter()
        .filter_map(|t| t.series.as_ref().map(|s| s.name.as_str()))
        .collect();
    series.dedup();
    for name in series {
        let path = contact_sheet_path(name);
        if let Some(data) = core.results.get_artifact(&folder, &path).await? {
            let msg = pb::FetchResultsResponse {
                sha256: kiln_domain::image::sha256_hex(&data),
                png: data.to_vec(),
                artifact: path,
                ..Default::default()
            };
            if tx.send(Ok(msg)).await.is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}
