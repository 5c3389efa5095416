//! The coordinator's HTTP side door, for probes, scrapers and autoscalers
//! (gRPC stays the API of clients and workers):
//!
//! - `GET /healthz`: 200 while the process serves;
//! - `GET /readyz`: 200 when the store answers a ping within
//!   [`READY_TIMEOUT`], else 503 with the reason on one line;
//! - `GET /metrics`: the Prometheus text exposition ([`Metrics::render`]);
//! - `GET /api/v1/queue[?model=NAME]`: the farm's queue per model as JSON,
//!   from [`Store::farm_counts`](crate::store::Store::farm_counts), so every
//!   coordinator of one store answers the same;
//! - `GET /api/v1/jobs/{job}/previews/{index}`: the latest live preview of a
//!   running task as `image/png` with `Cache-Control: no-store`, 404 when it
//!   has none (not running, or no preview yet), from the store, so every
//!   coordinator of one Redis serves the same.
//!
//! - the web dashboard at `/` and its `/api/v1/events`, `/api/v1/jobs/...`
//!   ([`crate::dashboard`]).
//!
//! With `--auth`, `/metrics` and `/api/v1/*` need `Authorization: Bearer
//! TOKEN` of any token of the auth file (or the dashboard's login cookie),
//! checked by [`caller`] through
//! [`dashboard::http_caller`](crate::dashboard::http_caller), the same
//! [`Auth`](crate::auth::Auth) check as gRPC calls (401 without one); a job's
//! endpoints also need the token's role to read and its project to be the
//! job's ([`Caller::job_access`], 403 otherwise). The probes stay open, as
//! kubelets send no token.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use kiln_proto::side_door::METRICS_CONTENT_TYPE;
use serde::{Deserialize, Serialize};

use crate::auth::{Action, Caller};
use crate::core::Core;
use crate::metrics::{self, Metrics};
use crate::store::{FarmCounts, StoreError};
use kiln_proto::ids::JobId;

/// How long `/readyz` waits for the store's answer.
pub const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// What every handler shares.
#[derive(Clone)]
struct SideDoor {
    core: Arc<Core>,
    metrics: Arc<Metrics>,
}

/// Returns the side door's routes, the dashboard's among them
/// ([`crate::dashboard`]; `tls`: served over TLS, so its cookies are
/// `Secure`); anything else answers 404.
pub fn router(core: Arc<Core>, metrics: Arc<Metrics>, tls: bool) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(scrape))
        .route("/api/v1/queue", get(queue))
        .route("/api/v1/jobs/{job}/previews/{index}", get(job_preview))
        .with_state(SideDoor {
            core: core.clone(),
            metrics,
        })
        .merge(crate::dashboard::router(core, tls))
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<SideDoor>) -> Response {
    if s.core.shutdown.is_cancelled() {
        return unavailable("shutting down");
    }
    match tokio::time::timeout(READY_TIMEOUT, s.core.store.ping()).await {
        Ok(Ok(())) => "ready\n".into_response(),
        Ok(Err(e)) => {
            metrics::store_error();
            unavailable(&format!("the store does not answer: {e}"))
        }
        Err(_) => {
            metrics::store_error();
            unavailable(&format!(
                "the store did not answer within {} s",
                READY_TIMEOUT.as_secs()
            ))
        }
    }
}

/// A 503 with a one-line reason.
fn unavailable(reason: &str) -> Response {
    let line = reason.split_whitespace().collect::<Vec<_>>().join(" ");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("not ready: {line}\n"),
    )
        .into_response()
}

/// Why an authenticated route answers no: a status and one line.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    line: String,
}

impl Refusal {
    fn new(status: StatusCode, line: impl std::fmt::Display) -> Self {
        Self {
            status,
            line: format!("{line}\n"),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut answer = (self.status, self.line).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            answer
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        answer
    }
}

/// The one check of who calls the side door's authenticated routes: the
/// [`Caller`] of the request's credentials, or a 401. Today the credential
/// is `Authorization: Bearer TOKEN`; without `--auth` every caller is the
/// implicit admin.
fn caller(core: &Core, headers: &HeaderMap) -> Result<Caller, Refusal> {
    crate::dashboard::http_caller(&core.auth, headers)
        .map_err(|e| Refusal::new(StatusCode::UNAUTHORIZED, e))
}

/// Returns the 401 answer unless the request carries credentials the
/// coordinator knows (`None`: go on).
fn refusal(core: &Core, headers: &HeaderMap) -> Option<Response> {
    caller(core, headers).err().map(IntoResponse::into_response)
}

/// Answers a store failure: 404 for what does not exist, else 503.
fn store_failure(e: StoreError) -> Refusal {
    match e {
        StoreError::JobNotFound(_) | StoreError::NoTaskAt { .. } | StoreError::TaskNotFound(_) => {
            Refusal::new(StatusCode::NOT_FOUND, e)
        }
        e => {
            metrics::store_error();
            Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot read the store: {e}"),
            )
        }
    }
}

/// Runs a store read under [`metrics::STORE_READ_TIMEOUT`], mapping failures
/// to their answer.
async fn read<T>(call: impl Future<Output = Result<T, StoreError>>) -> Result<T, Refusal> {
    match tokio::time::timeout(metrics::STORE_READ_TIMEOUT, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(store_failure(e)),
        Err(_) => Err(store_failure(StoreError::Unavailable(format!(
            "no answer within {} s",
            metrics::STORE_READ_TIMEOUT.as_secs()
        )))),
    }
}

async fn job_preview(
    State(s): State<SideDoor>,
    headers: HeaderMap,
    Path((job, index)): Path<(String, u32)>,
) -> Response {
    match preview_of(&s.core, &headers, &job, index).await {
        Ok(png) => (
            [
                (header::CONTENT_TYPE, HeaderValue::from_static("image/png")),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            ],
            png,
        )
            .into_response(),
        Err(refused) => refused.into_response(),
    }
}

/// Returns the PNG of the latest preview of task `index` of `job`, or the answer
/// that refuses it: 401, 403 for a job of another project (or a role that may
/// not read jobs), 404 for no such job, task or preview.
async fn preview_of(
    core: &Core,
    headers: &HeaderMap,
    job: &str,
    index: u32,
) -> Result<Vec<u8>, Refusal> {
    let caller = caller(core, headers)?;
    let id = JobId::parse_field("job", job).map_err(|e| Refusal::new(StatusCode::NOT_FOUND, e))?;
    caller
        .require(Action::Read)
        .map_err(|e| Refusal::new(StatusCode::FORBIDDEN, e))?;
    let record = read(core.store.job(id)).await?;
    caller.job_access(&record, Action::Read).map_err(|_| {
        Refusal::new(
            StatusCode::FORBIDDEN,
            format!("job {id} is not in a project of token {}", caller.name),
        )
    })?;
    let task = read(core.store.task_at(id, index)).await?;
    match read(core.store.preview(task.id)).await? {
        Some(p) => Ok(p.png),
        None => Err(Refusal::new(
            StatusCode::NOT_FOUND,
            format!("task {index} of job {id} has no live preview"),
        )),
    }
}

async fn scrape(State(s): State<SideDoor>, headers: HeaderMap) -> Response {
    if let Some(refused) = refusal(&s.core, &headers) {
        return refused;
    }
    let text = s.metrics.render(s.core.store.as_ref()).await;
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(METRICS_CONTENT_TYPE),
        )],
        text,
    )
        .into_response()
}

/// `?model=NAME`.
#[derive(Deserialize)]
struct QueueQuery {
    model: Option<String>,
}

/// The answer of `/api/v1/queue`.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queue {
    /// Per model.
    pub models: BTreeMap<String, ModelQueue>,
    /// Queued tasks over the models listed.
    pub queued: u64,
    /// Running tasks over the models listed.
    pub running: u64,
}

/// One model's entry of [`Queue`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelQueue {
    /// Tasks waiting for a worker (shots waiting for their anchor included).
    pub queued: u64,
    /// Tasks under a lease.
    pub running: u64,
    /// Live workers announcing the model that take work (not draining).
    pub workers: u64,
}

impl Queue {
    /// Builds the answer from the store's counts: every model, or only
    /// `model` (with zeros when the farm knows nothing of it).
    pub fn of(counts: &FarmCounts, model: Option<&str>) -> Self {
        let entry = |load: &crate::store::ModelLoad| ModelQueue {
            queued: load.queued,
            running: load.running,
            workers: load.workers,
        };
        let models: BTreeMap<String, ModelQueue> = match model {
            Some(name) => BTreeMap::from([(
                name.to_string(),
                counts.models.get(name).map(entry).unwrap_or_default(),
            )]),
            None => counts
                .models
                .iter()
                .map(|(name, load)| (name.clone(), entry(load)))
                .collect(),
        };
        Self {
            queued: models.values().map(|m| m.queued).sum(),
            running: models.values().map(|m| m.running).sum(),
            models,
        }
    }
}

async fn queue(
    State(s): State<SideDoor>,
    headers: HeaderMap,
    Query(query): Query<QueueQuery>,
) -> Response {
    if let Some(refused) = refusal(&s.core, &headers) {
        return refused;
    }
    if let Some(model) = &query.model
        && let Err(e) = kiln_proto::recipe::check_name("model", model)
    {
        return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response();
    }
    let counts =
        match tokio::time::timeout(metrics::STORE_READ_TIMEOUT, s.core.store.farm_counts()).await {
            Ok(Ok(counts)) => counts,
            Ok(Err(e)) => {
                metrics::store_error();
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("cannot read the queue: {e}\n"),
                )
                    .into_response();
            }
            Err(_) => {
                metrics::store_error();
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "the store did not answer within {} s\n",
                        metrics::STORE_READ_TIMEOUT.as_secs()
                    ),
                )
                    .into_response();
            }
        };
    axum::Json(Queue::of(&counts, query.model.as_deref())).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ModelLoad;

    fn counts() -> FarmCounts {
        let mut c = FarmCounts::default();
        c.models.insert(
            "tiny".into(),
            ModelLoad {
                queued: 3,
                running: 1,
                workers: 2,
            },
        );
        c.models.insert(
            "sd15".into(),
            ModelLoad {
                queued: 5,
                running: 0,
                workers: 0,
            },
        );
        c
    }

    #[test]
    fn the_queue_sums_its_models() {
        let q = Queue::of(&counts(), None);
        assert_eq!((q.queued, q.running), (8, 1));
        assert_eq!(q.models.len(), 2);
        let json = serde_json::to_value(&q).unwrap();
        assert_eq!(json["models"]["tiny"]["workers"], 2);
    }

    #[test]
    fn one_model_is_one_entry_with_zeros_when_unknown() {
        let q = Queue::of(&counts(), Some("tiny"));
        assert_eq!(q.models.len(), 1);
        assert_eq!((q.queued, q.running), (3, 1));
        let q = Queue::of(&counts(), Some("sdxl"));
        assert_eq!(q.models["sdxl"], ModelQueue::default());
        assert_eq!((q.queued, q.running), (0, 0));
    }
}
