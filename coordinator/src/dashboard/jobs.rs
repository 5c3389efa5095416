//! The jobs page: newest first, filtered by project and state, a page of
//! [`PAGE`] rows at a time, each with its progress, rate and ETA; the rows
//! are the live fragment that [`super::events`] sends again as they change.

use std::collections::HashMap;
use std::fmt::Write as _;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use super::html::{self, esc, url};
use super::session::visitor;
use super::{Dashboard, PAGE, Refusal};
use crate::auth::{Action, Caller, Projects};
use crate::core::Core;
use crate::store::{JobRecord, JobState};

/// Jobs read from the store, newest first, when a filter or a caller's
/// projects leave some out (as `ListJobs` reads for a scoped caller).
pub const SCAN: usize = 10_000;

/// What the jobs page shows: a filter and a page.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct JobsQuery {
    /// Only this project's jobs.
    pub project: Option<String>,
    /// Only jobs in this state.
    pub state: Option<JobState>,
    /// The page, from 0.
    pub page: usize,
}

impl JobsQuery {
    /// Reads `?project=&state=&page=`.
    ///
    /// # Errors
    /// 400 naming the field of a malformed value.
    pub fn parse(q: &HashMap<String, String>) -> Result<Self, Refusal> {
        let bad = |field: &str, value: &str| {
            Refusal::Status(
                StatusCode::BAD_REQUEST,
                format!("{field}: {} is not valid", kiln_proto::error::quote(value)),
            )
        };
        let project = match q.get("project").map(|p| p.trim()) {
            None | Some("") => None,
            Some(p) => {
                kiln_proto::recipe::check_name("project", p).map_err(|_| bad("project", p))?;
                Some(p.to_string())
            }
        };
        let state = match q.get("state").map(String::as_str) {
            None | Some("") => None,
            Some(s) => Some(JobState::parse(s).ok_or_else(|| bad("state", s))?),
        };
        let page = match q.get("page") {
            None => 0,
            Some(p) => p.parse().map_err(|_| bad("page", p))?,
        };
        Ok(Self {
            project,
            state,
            page,
        })
    }

    /// The query string of this filter, without the page, ending in `&`
    /// (or `?` alone).
    pub fn base(&self, path: &str) -> String {
        let mut out = format!("{path}?");
        if let Some(p) = &self.project {
            let _ = write!(out, "project={}&", url(p));
        }
        if let Some(s) = self.state {
            let _ = write!(out, "state={}&", s.name());
        }
        out
    }
}

/// Returns the page of jobs the caller may read under `q`, newest first,
/// and whether older ones follow.
///
/// # Errors
/// 403 for a role that may not read jobs; a store error.
pub(crate) async fn listing(
    core: &Core,
    caller: &Caller,
    q: &JobsQuery,
) -> Result<(Vec<JobRecord>, bool), Refusal> {
    caller.require(Action::Read)?;
    let unfiltered = q.project.is_none() && q.state.is_none();
    let read = match (&caller.projects, unfiltered) {
        (Projects::All, true) => (q.page + 1) * PAGE + 1,
        _ => SCAN,
    };
    let mut jobs: Vec<JobRecord> = core
        .store
        .jobs(read)
        .await?
        .into_iter()
        .filter(|j| caller.job_access(j, Action::Read).is_ok())
        .filter(|j| q.project.as_deref().is_none_or(|p| p == j.project))
        .filter(|j| q.state.is_none_or(|s| s == j.state))
        .skip(q.page * PAGE)
        .take(PAGE + 1)
        .collect();
    let more = jobs.len() > PAGE;
    jobs.truncate(PAGE);
    Ok((jobs, more))
}

/// Images per minute since the job started, and the time left at that
/// rate for a running job (`None` before its first image).
pub fn rate_and_eta(job: &JobRecord, now_ms: i64) -> (f64, Option<i64>) {
    let end = job.finished_at_ms.unwrap_or(now_ms);
    let minutes = ((end - job.created_at_ms).max(1) as f64) / 60_000.0;
    let rate = f64::from(job.counts.completed) / minutes;
    let c = &job.counts;
    let left = c.total.saturating_sub(c.completed + c.failed + c.cancelled);
    let eta = (job.state == JobState::Running && rate > 0.0)
        .then(|| (f64::from(left) / rate * 60_000.0) as i64);
    (rate, eta)
}

/// The table of jobs, the live part of the page.
pub(crate) fn fragment(jobs: &[JobRecord], more: bool, q: &JobsQuery, now_ms: i64) -> String {
    if jobs.is_empty() && q.page == 0 {
        return "<p class=\"empty\">No jobs to show.</p>".to_string();
    }
    let mut out = String::from(
        "<table class=\"jobs\"><thead><tr><th>Name</th><th>Project</th><th>State</th>\
         <th>Progress</th><th>Rate</th><th>ETA</th><th>Priority</th><th>By</th><th>Age</th></tr></thead><tbody>",
    );
    for j in jobs {
        let (rate, eta) = rate_and_eta(j, now_ms);
        let c = &j.counts;
        let state = if j.paused && j.state == JobState::Running {
            "paused".to_string()
        } else {
            j.state.name().to_string()
        };
        let _ = write!(
            out,
            "<tr data-job=\"{id}\"><td><a href=\"/jobs/{id}\">{name}</a></td><td>{project}</td>\
             <td><span class=\"state {state}\">{state}</span></td>\
             <td>{bar} {done}/{total}{failed}</td><td>{rate:.1}/min</td><td>{eta}</td>\
             <td>{priority}</td><td>{by}</td><td>{age}</td></tr>",
            id = j.id,
            name = esc(&j.name),
            project = esc(&j.project),
            bar = html::progress(c.completed, c.failed, c.total),
            done = c.completed,
            total = c.total,
            failed = if c.failed > 0 {
                format!(" <span class=\"bad\">({} failed)</span>", c.failed)
            } else {
                String::new()
            },
            eta = eta.map(html::span).unwrap_or_else(|| "&ndash;".into()),
            priority = j.priority,
            by = j
                .submitted_by
                .as_deref()
                .map(esc)
                .unwrap_or_else(|| "&ndash;".into()),
            age = html::span(now_ms - j.created_at_ms),
        );
    }
    out.push_str("</tbody></table>");
    out.push_str(&html::pager(&q.base("/"), q.page, more));
    out
}

/// `GET /`: the jobs page.
pub(crate) async fn page(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Query(raw): Query<HashMap<String, String>>,
) -> Response {
    let v = match visitor(&d, &headers) {
        Ok(v) => v,
        Err(refusal) => return refusal.page(),
    };
    let q = match JobsQuery::parse(&raw) {
        Ok(q) => q,
        Err(refusal) => return refusal.page(),
    };
    let (jobs, more) = match listing(&d.core, &v.caller, &q).await {
        Ok(l) => l,
        Err(refusal) => return refusal.page(),
    };
    let live = fragment(&jobs, more, &q, crate::clock::unix_ms());
    let mut states = String::from("<option value=\"\">any state</option>");
    // Labels, not state names, so the page's words name only jobs' states.
    for (s, label) in [
        (JobState::Running, "running"),
        (JobState::Completed, "done"),
        (JobState::Failed, "failed"),
        (JobState::Cancelled, "cancelled"),
    ] {
        let selected = if q.state == Some(s) { " selected" } else { "" };
        let _ = write!(
            states,
            "<option value=\"{}\"{selected}>{label}</option>",
            s.name()
        );
    }
    let events = format!(
        "/api/v1/events?view=jobs&{}page={}",
        &q.base("")[1..],
        q.page
    );
    let body = format!(
        "<h1>Jobs</h1><form class=\"filter\" method=\"get\" action=\"/\">\
         <input name=\"project\" placeholder=\"project\" value=\"{}\"><select name=\"state\">{states}</select>\
         <button>Filter</button></form><div id=\"live\" data-live=\"{}\">{live}</div>",
        esc(q.project.as_deref().unwrap_or("")),
        esc(&events)
    );
    html::page(&d, &v, "jobs", "Jobs", &body)
}
