//! `GET /api/v1/events`: Server-Sent Events that keep a page live. Each
//! `html` event carries the new inner HTML of the page's live part, made by
//! the same function that rendered the page, and is sent only when it
//! changed; a `logout` event tells the page that its token is no longer
//! known.
//!
//! What is shown comes from the store each time, so every coordinator of
//! one store shows the same: a job's page wakes on the job's event log in
//! the store ([`Store::wait_events`](crate::store::Store::wait_events),
//! Redis pub/sub across coordinators), the lists (jobs, workers, queue)
//! are read again every [`TICK`]. The caller is judged again before every
//! event, so a token removed from the auth file stops its streams.
//!
//! Views: `?job=ID[&page=N]`, `?view=jobs[&project=&state=&page=]`,
//! `?view=workers[&page=]`, `?view=queue`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use kiln_proto::ids::JobId;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::job::{job_id, page_of};
use super::jobs::JobsQuery;
use super::session::{Visitor, visitor};
use super::{Dashboard, Refusal, job, jobs, workers};

/// How often a list is read again, and the longest a job's page waits for
/// an event before it is read again anyway (rates and ages move).
pub const TICK: Duration = Duration::from_secs(1);
/// Events of a job read per round trip while following its log.
const EVENT_BATCH: usize = 512;

/// What a stream follows.
enum View {
    Job(JobId, usize),
    Jobs(JobsQuery),
    Workers(usize),
    Queue,
}

impl View {
    fn parse(q: &HashMap<String, String>) -> Result<Self, Refusal> {
        if let Some(id) = q.get("job") {
            return Ok(View::Job(job_id(id)?, page_of(q)?));
        }
        match q.get("view").map(String::as_str) {
            Some("jobs") => Ok(View::Jobs(JobsQuery::parse(q)?)),
            Some("workers") => Ok(View::Workers(page_of(q)?)),
            Some("queue") => Ok(View::Queue),
            _ => Err(Refusal::Status(
                StatusCode::BAD_REQUEST,
                "name a view: ?job=ID, ?view=jobs, ?view=workers or ?view=queue".into(),
            )),
        }
    }
}

/// The live HTML of `view` for `v`.
async fn render(d: &Dashboard, v: &Visitor, view: &View) -> Result<String, Refusal> {
    let core = &d.core;
    match view {
        View::Job(id, page) => job::fragment(core, v, *id, *page).await,
        View::Jobs(q) => {
            let (list, more) = jobs::listing(core, &v.caller, q).await?;
            Ok(jobs::fragment(&list, more, q, crate::clock::unix_ms()))
        }
        View::Workers(page) => workers::fragment(core, v, *page).await,
        View::Queue => workers::queue_fragment(core).await,
    }
}

/// An SSE event; carriage returns, which SSE cannot carry, become HTML
/// character references.
fn html_event(fragment: &str) -> Event {
    Event::default()
        .event("html")
        .data(fragment.replace('\r', "&#13;"))
}

/// `GET /api/v1/events`.
pub(crate) async fn stream(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let opened = async {
        let v = visitor(&d, &headers)?;
        let view = View::parse(&q)?;
        // Refusals (a job out of reach, a role) answer before the stream opens.
        let first = render(&d, &v, &view).await?;
        Ok::<_, Refusal>((v, view, first))
    };
    let (v, view, first) = match opened.await {
        Ok(o) => o,
        Err(refusal) => return refusal.plain(),
    };
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(4);
    tokio::spawn(async move {
        let shutdown = d.core.shutdown.clone();
        tokio::select! {
            () = follow(&d, &headers, v, &view, first, &tx) => {}
            () = shutdown.cancelled() => {}
            () = tx.closed() => {}
        }
    });
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// Sends the view's HTML whenever it changes, until the client goes, the
/// caller is refused, or the view is gone.
async fn follow(
    d: &Dashboard,
    headers: &HeaderMap,
    mut v: Visitor,
    view: &View,
    first: String,
    tx: &mpsc::Sender<Result<Event, Infallible>>,
) {
    if tx.send(Ok(html_event(&first))).await.is_err() {
        return;
    }
    let mut last = first;
    let mut cursor = 0u64;
    loop {
        match view {
            View::Job(id, _) => {
                // Catch up with the job's log, then wait for its next event.
                while let Ok(events) = d.core.store.events(*id, cursor, EVENT_BATCH).await {
                    if let Some(e) = events.last() {
                        cursor = e.seq;
                    }
                    if events.len() < EVENT_BATCH {
                        break;
                    }
                }
                let _ = d.core.store.wait_events(*id, cursor, TICK).await;
                // At most one page a tick however busy the job is.
                tokio::time::sleep(TICK / 2).await;
            }
            _ => tokio::time::sleep(TICK).await,
        }
        // The caller again (the auth file may have changed); the session's
        // CSRF token stays the one the page holds.
        v.caller = match visitor(d, headers) {
            Ok(now) => now.caller,
            Err(_) => {
                let _ = tx
                    .send(Ok(Event::default().event("logout").data("log in again")))
                    .await;
                return;
            }
        };
        match render(d, &v, view).await {
            Ok(html) if html != last => {
                if tx.send(Ok(html_event(&html))).await.is_err() {
                    return;
                }
                last = html;
            }
            Ok(_) => {}
            Err(Refusal::Status(StatusCode::NOT_FOUND, _)) => return,
            Err(_) => {}
        }
    }
}
