//! The workers page (a page of [`PAGE`] workers: labels, determinism
//! class, models with the resident ones marked, the tasks in hand with
//! their step, last heartbeat, failures, the drain button) and the queue
//! page (the numbers of `/api/v1/queue`).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;

use super::html::{self, esc, url};
use super::job::page_of;
use super::session::{Visitor, visitor};
use super::{Dashboard, PAGE, Refusal};
use crate::auth::Action;
use crate::core::Core;
use crate::http::Queue;
use crate::store::WorkerState;
use crate::store::policy::worker_state;

/// The live part of the workers page.
///
/// # Errors
/// A store error.
pub(crate) async fn fragment(core: &Core, v: &Visitor, page: usize) -> Result<String, Refusal> {
    let caller = &v.caller;
    caller.require(Action::ListWorkers)?;
    let mut workers = core.store.workers().await?;
    workers.sort_by(|a, b| a.registration.id.as_str().cmp(b.registration.id.as_str()));
    let resident: HashMap<String, Vec<String>> = core
        .store
        .live_workers()
        .await?
        .into_iter()
        .map(|w| (w.id.as_str().to_string(), w.resident))
        .collect();
    let total = workers.len();
    let now = crate::clock::unix_ms();
    let may_drain = caller.require(Action::Drain).is_ok();
    let mut out = String::from(
        "<table class=\"workers\"><thead><tr><th>Worker</th><th>State</th><th>Labels</th><th>Class</th>\
         <th>Models, LoRAs, embeddings, ControlNets</th><th>In hand</th><th>Last heard</th><th>Done</th><th>Failures</th><th></th></tr></thead><tbody>",
    );
    let mut jobs = BTreeMap::new();
    for w in workers.iter().skip(page * PAGE).take(PAGE) {
        let r = &w.registration;
        let silent = (now - w.last_seen_ms).max(0) as u64;
        let state = worker_state(silent, w.draining, w.running.len());
        let labels: Vec<String> = r
            .labels
            .iter()
            .map(|(k, v)| format!("{}={}", esc(k), esc(v)))
            .collect();
        let loaded = resident.get(r.id.as_str());
        let models: Vec<String> = r
            .models
            .iter()
            .map(|m| {
                let mark = loaded.is_some_and(|l| l.contains(&m.name));
                format!(
                    "<span class=\"model{}\" title=\"{}\">{}</span>",
                    if mark { " resident" } else { "" },
                    esc(&m.hash),
                    esc(&m.name)
                )
            })
            .collect();
        // LoRAs, embeddings and ControlNets the worker announced (#13, #14): the
        // coordinator routes by them, so a supervisor sees why a task went where.
        let assets = &r.assets;
        let models: Vec<String> = models
            .into_iter()
            .chain(
                [
                    ("lora", &assets.loras),
                    ("embedding", &assets.embeddings),
                    ("controlnet", &assets.controlnets),
                ]
                .into_iter()
                .flat_map(|(kind, held)| {
                    held.iter().map(move |m| {
                        format!(
                            "<span class=\"model {kind}\" title=\"{kind} {}\">{kind}:{}</span>",
                            esc(&m.hash),
                            esc(&m.name)
                        )
                    })
                }),
            )
            .collect();
        let mut in_hand = Vec::new();
        for task in &w.running {
            let Ok(t) = core.store.task(*task).await else {
                continue;
            };
            if let std::collections::btree_map::Entry::Vacant(slot) = jobs.entry(t.job) {
                slot.insert(core.store.job(t.job).await.ok().map(|j| j.project));
            }
            let visible = jobs
                .get(&t.job)
                .and_then(|p| p.as_deref())
                .is_some_and(|p| caller.may_see(p));
            in_hand.push(if visible {
                format!(
                    "<a href=\"/jobs/{}\">#{}</a> step {}/{}",
                    t.job, t.index, t.step, t.recipe.steps
                )
            } else {
                format!(
                    "a task of another project, step {}/{}",
                    t.step, t.recipe.steps
                )
            });
        }
        let drain = if may_drain && !w.draining && state != WorkerState::Lost {
            html::button(
                v,
                &format!("/workers/{}/drain", url(r.id.as_str())),
                "Drain",
                "",
            )
        } else {
            String::new()
        };
        let _ = write!(
            out,
            "<tr><td>{id}</td><td><span class=\"state {state}\">{state}</span></td><td>{labels}</td><td>{class}</td>\
             <td>{models}</td><td>{hand}</td><td>{heard} ago</td><td>{done}</td><td>{failed}</td><td>{drain}</td></tr>",
            id = esc(r.id.as_str()),
            state = state.name(),
            labels = labels.join(" "),
            class = esc(&r.determinism_class),
            models = models.join(" "),
            hand = in_hand.join("<br>"),
            heard = html::span(silent as i64),
            done = w.completed,
            failed = w.failed,
        );
    }
    out.push_str("</tbody></table>");
    if total == 0 {
        out = "<p class=\"empty\">No workers registered.</p>".into();
    }
    out.push_str(&html::pager("/workers?", page, total > (page + 1) * PAGE));
    Ok(out)
}

/// `GET /workers`.
pub(crate) async fn page(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let v = match visitor(&d, &headers) {
        Ok(v) => v,
        Err(refusal) => return refusal.page(),
    };
    let built = async {
        let page = page_of(&q)?;
        let live = fragment(&d.core, &v, page).await?;
        Ok::<_, Refusal>(format!(
            "<h1>Workers</h1><div id=\"live\" data-live=\"/api/v1/events?view=workers&amp;page={page}\">{live}</div>"
        ))
    }
    .await;
    match built {
        Ok(body) => html::page(&d, &v, "workers", "Workers", &body),
        Err(refusal) => refusal.page(),
    }
}

/// The live part of the queue page: [`Queue::of`] over the store's counts,
/// the answer of `/api/v1/queue`.
///
/// # Errors
/// A store error.
pub(crate) async fn queue_fragment(core: &Core) -> Result<String, Refusal> {
    let counts = core.store.farm_counts().await?;
    let q = Queue::of(&counts, None);
    let mut out = format!(
        "<p>{} queued, {} running</p><table class=\"queue\"><thead><tr><th>Model</th><th>Queued</th><th>Running</th><th>Workers</th></tr></thead><tbody>",
        q.queued, q.running
    );
    for (name, m) in &q.models {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(name),
            m.queued,
            m.running,
            m.workers
        );
    }
    out.push_str("</tbody></table>");
    Ok(out)
}

/// `GET /queue`.
pub(crate) async fn queue_page(State(d): State<Dashboard>, headers: HeaderMap) -> Response {
    let v = match visitor(&d, &headers) {
        Ok(v) => v,
        Err(refusal) => return refusal.page(),
    };
    match queue_fragment(&d.core).await {
        Ok(live) => html::page(
            &d,
            &v,
            "queue",
            "Queue",
            &format!(
                "<h1>Queue</h1><div id=\"live\" data-live=\"/api/v1/events?view=queue\">{live}</div>"
            ),
        ),
        Err(refusal) => refusal.page(),
    }
}
