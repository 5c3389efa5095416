//! The buttons: POSTs that cancel a job, retry its failed tasks, verify it,
//! or drain a worker. Each checks the CSRF token first, then who is
//! calling, then hands the action to [`crate::control`], the same checks
//! and transitions as the `Farm` service; the answer goes back to the page
//! with a one-line notice.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use kiln_proto::ids::WorkerId;

use super::html::url;
use super::job::job_id;
use super::session::{Visitor, check_csrf, form, visitor};
use super::{Dashboard, Refusal};
use crate::control;

/// The CSRF check and the caller of a POST.
fn checked(d: &Dashboard, headers: &HeaderMap, body: &[u8]) -> Result<Visitor, Refusal> {
    check_csrf(headers, &form(body))?;
    visitor(d, headers)
}

fn back_to_job(job: &str, notice: &str) -> Response {
    Redirect::to(&format!("/jobs/{job}?done={}", url(notice))).into_response()
}

/// `POST /jobs/{job}/cancel`.
pub(crate) async fn cancel(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Path(job): Path<String>,
    body: Bytes,
) -> Response {
    let done = async {
        let v = checked(&d, &headers, &body)?;
        let id = job_id(&job)?;
        let record = control::cancel(&d.core, &v.caller, id).await?;
        Ok::<_, Refusal>(back_to_job(&job, &format!("job {}", record.state)))
    };
    done.await.unwrap_or_else(Refusal::page)
}

/// `POST /jobs/{job}/retry`.
pub(crate) async fn retry(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Path(job): Path<String>,
    body: Bytes,
) -> Response {
    let done = async {
        let v = checked(&d, &headers, &body)?;
        let id = job_id(&job)?;
        let (_, requeued) = control::retry(&d.core, &v.caller, id).await?;
        Ok::<_, Refusal>(back_to_job(
            &job,
            &format!("{requeued} tasks back in the queue"),
        ))
    };
    done.await.unwrap_or_else(Refusal::page)
}

/// `POST /jobs/{job}/verify`: a verification of every image; goes to the
/// verification job's page.
pub(crate) async fn verify(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Path(job): Path<String>,
    body: Bytes,
) -> Response {
    let done = async {
        let v = checked(&d, &headers, &body)?;
        let id = job_id(&job)?;
        let verification = control::verify(&d.core, &v.caller, id, 0).await?;
        Ok::<_, Refusal>(match verification.job {
            Some(check) => Redirect::to(&format!(
                "/jobs/{}?done={}",
                check.id,
                url(&format!("verification of {id}"))
            ))
            .into_response(),
            None => back_to_job(&job, "no image of this job can be re-rendered"),
        })
    };
    done.await.unwrap_or_else(Refusal::page)
}

/// `POST /workers/{worker}/drain`.
pub(crate) async fn drain(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Path(worker): Path<String>,
    body: Bytes,
) -> Response {
    let done = async {
        let v = checked(&d, &headers, &body)?;
        let id = WorkerId::parse_field("worker", &worker)
            .map_err(|e| Refusal::Status(StatusCode::BAD_REQUEST, e.to_string()))?;
        control::drain(&d.core, &v.caller, &id).await?;
        Ok::<_, Refusal>(Redirect::to("/workers").into_response())
    };
    done.await.unwrap_or_else(Refusal::page)
}
