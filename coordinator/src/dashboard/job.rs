//! A job's page (its state, the buttons the caller may use, running tasks
//! with their previews, the gallery of finished images a page at a time,
//! the series contact sheets, failed tasks with their attempts) and an
//! image's page (the full image, its recipe and its A1111 `parameters`).

use std::collections::HashMap;
use std::fmt::Write as _;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use kiln_proto::ids::JobId;

use super::html::{self, esc, url};
use super::jobs::rate_and_eta;
use super::session::{Visitor, visitor};
use super::{Dashboard, PAGE, Refusal};
use crate::auth::Action;
use crate::control;
use crate::core::Core;
use crate::store::policy::job_retryable;
use crate::store::{Attempt, JobState, TaskRecord, TaskState};

/// Parses a job id from a path.
///
/// # Errors
/// 400 naming the value.
pub(crate) fn job_id(text: &str) -> Result<JobId, Refusal> {
    JobId::parse_field("job", text)
        .map_err(|e| Refusal::Status(StatusCode::BAD_REQUEST, e.to_string()))
}

/// Reads `?page=`.
///
/// # Errors
/// 400 for a value that is not a number.
pub(crate) fn page_of(q: &HashMap<String, String>) -> Result<usize, Refusal> {
    match q.get("page") {
        None => Ok(0),
        Some(p) => p.parse().map_err(|_| {
            Refusal::Status(
                StatusCode::BAD_REQUEST,
                format!("page: {} is not a number", kiln_proto::error::quote(p)),
            )
        }),
    }
}

fn attempts_table(attempts: &[Attempt]) -> String {
    let mut out = String::from(
        "<table class=\"attempts\"><thead><tr><th>#</th><th>Worker</th><th>Outcome</th>\
         <th>Fault</th><th>Took</th><th>Message</th></tr></thead><tbody>",
    );
    for (n, a) in attempts.iter().enumerate() {
        let took = a
            .ended_at_ms
            .map(|end| html::span(end - a.started_at_ms))
            .unwrap_or_else(|| "&ndash;".into());
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{took}</td><td class=\"message\">{}</td></tr>",
            n + 1,
            esc(a.worker.as_str()),
            a.outcome.name(),
            a.fault.map(|f| f.name()).unwrap_or(""),
            esc(&a.message)
        );
    }
    out.push_str("</tbody></table>");
    out
}

/// The live part of a job's page.
///
/// # Errors
/// As [`control::job_for`] (a job the caller may not read is missing), or a
/// store error.
pub(crate) async fn fragment(
    core: &Core,
    v: &Visitor,
    id: JobId,
    page: usize,
) -> Result<String, Refusal> {
    let caller = &v.caller;
    let job = control::job_for(core, caller, id, Action::Read).await?;
    let tasks = core.store.tasks(id).await?;
    let now = crate::clock::unix_ms();
    let c = &job.counts;
    let (rate, eta) = rate_and_eta(&job, now);
    let state = if job.paused && job.state == JobState::Running {
        "paused"
    } else {
        job.state.name()
    };
    let mut out = format!(
        "<section class=\"summary\"><p><span class=\"state {state}\">{state}</span> {bar} \
         {done}/{total} done{failed} &middot; {rate:.1} images/min &middot; ETA {eta} &middot; \
         priority {priority} &middot; project {project} &middot; submitted {age} ago{by}</p>",
        bar = html::progress(c.completed, c.failed, c.total),
        done = c.completed,
        total = c.total,
        failed = if c.failed > 0 {
            format!(", <span class=\"bad\">{} failed</span>", c.failed)
        } else {
            String::new()
        },
        eta = eta.map(html::span).unwrap_or_else(|| "&ndash;".into()),
        priority = job.priority,
        project = esc(&job.project),
        age = html::span(now - job.created_at_ms),
        by = job
            .submitted_by
            .as_deref()
            .map(|b| format!(" by {}", esc(b)))
            .unwrap_or_default(),
    );
    let mut buttons = String::new();
    if !job.is_finished() && caller.require(Action::Cancel).is_ok() {
        buttons.push_str(&html::button(
            v,
            &format!("/jobs/{id}/cancel"),
            "Cancel job",
            "danger",
        ));
    }
    if c.failed > 0 && job_retryable(job.state) && caller.require(Action::Retry).is_ok() {
        buttons.push_str(&html::button(
            v,
            &format!("/jobs/{id}/retry"),
            "Retry failed",
            "",
        ));
    }
    if job.state == JobState::Completed && caller.require(Action::Verify).is_ok() {
        buttons.push_str(&html::button(
            v,
            &format!("/jobs/{id}/verify"),
            "Verify",
            "",
        ));
    }
    if !buttons.is_empty() {
        let _ = write!(out, "<p class=\"actions\">{buttons}</p>");
    }
    out.push_str("</section>");

    let running: Vec<&TaskRecord> = tasks
        .iter()
        .filter(|t| t.state == TaskState::Leased)
        .take(PAGE)
        .collect();
    if !running.is_empty() {
        out.push_str("<h2>Running</h2><div class=\"in-hand\">");
        for t in running {
            let _ = write!(
                out,
                "<figure class=\"task\"><img class=\"preview\" src=\"/api/v1/jobs/{id}/previews/{index}?step={step}\" \
                 alt=\"preview of image {index}\" width=\"64\"><figcaption>#{index} step {step}/{steps}<br>{worker}</figcaption></figure>",
                index = t.index,
                step = t.step,
                steps = t.recipe.steps,
                worker = esc(t.holder().map(|w| w.as_str()).unwrap_or("")),
            );
        }
        out.push_str("</div>");
    }

    let done: Vec<&TaskRecord> = tasks.iter().filter(|t| t.result.is_some()).collect();
    let _ = write!(out, "<h2>Images ({})</h2>", done.len());
    if done.is_empty() {
        out.push_str("<p class=\"empty\">No finished images yet.</p>");
    } else {
        out.push_str("<div class=\"gallery\">");
        for t in done.iter().skip(page * PAGE).take(PAGE) {
            let _ = write!(
                out,
                "<a href=\"/jobs/{id}/images/{index}\" title=\"{title}\"><img src=\"/api/v1/jobs/{id}/images/{index}?thumb=1\" \
                 alt=\"image {index}: {title}\"></a>",
                index = t.index,
                title = esc(&format!(
                    "#{} seed {} {}",
                    t.index, t.recipe.seed, t.recipe.prompt
                )),
            );
        }
        out.push_str("</div>");
        out.push_str(&html::pager(
            &format!("/jobs/{id}?"),
            page,
            done.len() > (page + 1) * PAGE,
        ));
    }

    if job.is_finished() {
        let mut series: Vec<&str> = tasks
            .iter()
            .filter_map(|t| t.series.as_ref().map(|s| s.name.as_str()))
            .collect();
        series.sort_unstable();
        series.dedup();
        if !series.is_empty() {
            out.push_str("<h2>Contact sheets</h2><div class=\"sheets\">");
            for name in series {
                let _ = write!(
                    out,
                    "<figure><img src=\"/api/v1/jobs/{id}/sheets/{}\" alt=\"contact sheet of {n}\"><figcaption>{n}</figcaption></figure>",
                    url(name),
                    n = esc(name)
                );
            }
            out.push_str("</div>");
        }
    }

    let failed: Vec<&TaskRecord> = tasks
        .iter()
        .filter(|t| t.state == TaskState::Failed)
        .collect();
    if !failed.is_empty() {
        let _ = write!(out, "<h2>Failed ({})</h2>", failed.len());
        for t in failed.iter().take(PAGE) {
            let _ = write!(
                out,
                "<details class=\"failed\"><summary>#{} {} (seed {})</summary>{}</details>",
                t.index,
                esc(&t.recipe.prompt),
                t.recipe.seed,
                attempts_table(&t.attempts)
            );
        }
        if failed.len() > PAGE {
            let _ = write!(out, "<p>and {} more</p>", failed.len() - PAGE);
        }
    }
    Ok(out)
}

/// `GET /jobs/{job}`: the job's page.
pub(crate) async fn page(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Path(job): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let v = match visitor(&d, &headers) {
        Ok(v) => v,
        Err(refusal) => return refusal.page(),
    };
    let built = async {
        let id = job_id(&job)?;
        let page = page_of(&q)?;
        let record = control::job_for(&d.core, &v.caller, id, Action::Read).await?;
        let live = fragment(&d.core, &v, id, page).await?;
        let notice = q
            .get("done")
            .map(|what| format!("<p class=\"notice\">{}</p>", esc(what)))
            .unwrap_or_default();
        Ok::<_, Refusal>((
            record.name.clone(),
            format!(
                "<h1>{} <small>{id}</small></h1>{notice}<div id=\"live\" data-live=\"/api/v1/events?job={id}&amp;page={page}\">{live}</div>",
                esc(&record.name)
            ),
        ))
    }
    .await;
    match built {
        Ok((name, body)) => html::page(&d, &v, &name, "Jobs", &body),
        Err(refusal) => refusal.page(),
    }
}

/// `GET /jobs/{job}/images/{index}`: one image with its recipe and A1111
/// `parameters`.
pub(crate) async fn image_page(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Path((job, index)): Path<(String, u32)>,
) -> Response {
    let v = match visitor(&d, &headers) {
        Ok(v) => v,
        Err(refusal) => return refusal.page(),
    };
    let built = async {
        let id = job_id(&job)?;
        let record = control::job_for(&d.core, &v.caller, id, Action::Read).await?;
        let task = d.core.store.task_at(id, index).await?;
        let result = task.result.as_ref().ok_or_else(|| {
            Refusal::Status(StatusCode::NOT_FOUND, format!("image {index} of job {id} is not finished"))
        })?;
        let folder = d.core.folder(id).await?;
        let bytes = d
            .core
            .results
            .read_image(&folder, &task.file_name, &result.object)
            .await
            .map_err(crate::error::CoordinatorError::from)?;
        let parameters = match kiln_domain::png_text::read(&bytes) {
            Ok(text) => text.parameters.unwrap_or_else(|| "(the image carries no parameters chunk)".into()),
            Err(e) => format!("(cannot read the image's text chunks: {e})"),
        };
        let recipe = serde_json::to_string_pretty(&task.recipe).unwrap_or_default();
        Ok::<_, Refusal>(format!(
            "<h1><a href=\"/jobs/{id}\">{name}</a> &rsaquo; image {index}</h1>\
             <div class=\"image\"><img class=\"full\" src=\"/api/v1/jobs/{id}/images/{index}\" alt=\"image {index}\">\
             <div class=\"meta\"><p>{file} &middot; {size} bytes &middot; rendered in {ms} ms &middot; model {hash} &middot; {class}</p>\
             <h2>parameters</h2><pre class=\"parameters\">{parameters}</pre>\
             <h2>Recipe</h2><pre class=\"recipe\">{recipe}</pre><h2>Attempts</h2>{attempts}</div></div>",
            name = esc(&record.name),
            file = esc(&task.file_name),
            size = result.size,
            ms = result.render_ms,
            hash = esc(kiln_proto::model::short_hash(&result.model_hash)),
            class = esc(&result.class),
            parameters = esc(&parameters),
            recipe = esc(&recipe),
            attempts = attempts_table(&task.attempts),
        ))
    }
    .await;
    match built {
        Ok(body) => html::page(&d, &v, &format!("image {index}"), "Jobs", &body),
        Err(refusal) => refusal.page(),
    }
}
