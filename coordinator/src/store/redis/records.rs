//! Reading script replies and the records the scripts store (hashes and JSON).

use std::collections::{BTreeMap, HashMap};

use kiln_proto::ids::{Epoch, WorkerId};
use kiln_proto::recipe::Recipe;
use redis::Value;
use serde::{Deserialize, Serialize};

use crate::store::state::{Fault, JobState, Outcome, StateName, TaskState};
use crate::store::types::*;
use crate::store::{StoreError, StoreResult};

pub(super) fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Okay => "OK".into(),
        _ => String::new(),
    }
}

pub(super) fn items(v: Value) -> StoreResult<Vec<Value>> {
    match v {
        Value::Array(a) => Ok(a),
        other => Err(StoreError::Corrupt(format!(
            "unexpected script reply {other:?}"
        ))),
    }
}

/// Returns true when a script refused the call because the worker id is
/// bound to another token (its one-item reply `bound`).
pub(super) fn is_bound(reply: &[Value]) -> bool {
    matches!(reply, [only] if text(only) == "bound")
}

pub(super) fn num<T: std::str::FromStr>(
    h: &HashMap<String, String>,
    field: &str,
) -> StoreResult<T> {
    h.get(field)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| StoreError::Corrupt(format!("field {field:?} missing or not a number")))
}

pub(super) fn parse_id<T: std::str::FromStr>(s: &str, what: &str) -> StoreResult<T> {
    s.parse()
        .map_err(|_| StoreError::Corrupt(format!("{what} {s:?}")))
}

/// Parses a stored name of one of the store's enums.
pub(super) fn named<T: StateName>(s: &str, what: &str) -> StoreResult<T> {
    T::parse(s).ok_or_else(|| StoreError::Corrupt(format!("{what} {s:?}")))
}

/// Parses a stored fault: the empty name is no fault.
pub(super) fn fault(s: &str) -> StoreResult<Option<Fault>> {
    if s.is_empty() {
        Ok(None)
    } else {
        named(s, "fault").map(Some)
    }
}

pub(super) fn parse_job(h: &HashMap<String, String>) -> StoreResult<JobRecord> {
    let s = |f: &str| h.get(f).cloned().unwrap_or_default();
    let finished: i64 = num(h, "finished")?;
    let idem = s("idem");
    Ok(JobRecord {
        id: parse_id(&s("id"), "job id")?,
        name: s("name"),
        project: s("project"),
        priority: num(h, "priority")?,
        state: named::<JobState>(&s("state"), "job state")?,
        // The counters are kept under the task states' names.
        counts: TaskCounts {
            total: num(h, "total")?,
            queued: num(h, TaskState::Queued.name())?,
            leased: num(h, TaskState::Leased.name())?,
            completed: num(h, TaskState::Completed.name())?,
            failed: num(h, TaskState::Failed.name())?,
            cancelled: num(h, TaskState::Cancelled.name())?,
        },
        created_at_ms: num(h, "created")?,
        finished_at_ms: (finished > 0).then_some(finished),
        idempotency_key: (!idem.is_empty()).then_some(idem),
        class: Some(s("class")).filter(|c| !c.is_empty()),
        verify_of: match s("verify_of").as_str() {
            "" => None,
            v => Some(parse_id(v, "job id")?),
        },
        // Absent until the job is first paused.
        paused: s("paused") == "1",
        traceparent: Some(s("traceparent")).filter(|t| !t.is_empty()),
        submitted_by: Some(s("by")).filter(|b| !b.is_empty()),
    })
}

/// An attempt as the scripts store it (JSON).
#[derive(Deserialize)]
pub(super) struct StoredAttempt {
    worker: String,
    epoch: u64,
    started: i64,
    #[serde(default)]
    ended: Option<i64>,
    outcome: String,
    #[serde(default)]
    fault: String,
    #[serde(default)]
    message: String,
}

/// A task's result as stored (JSON).
#[derive(Serialize, Deserialize)]
pub(super) struct StoredResult {
    pub(super) object: String,
    pub(super) sha256: String,
    pub(super) size: u64,
    pub(super) model_hash: String,
    pub(super) render_ms: u64,
    pub(super) encode_ms: u64,
    #[serde(default)]
    pub(super) class: String,
}

pub(super) fn parse_task(h: &HashMap<String, String>) -> StoreResult<TaskRecord> {
    let s = |f: &str| h.get(f).cloned().unwrap_or_default();
    let mut recipe: Recipe = serde_json::from_str(&s("recipe"))
        .map_err(|e| StoreError::Corrupt(format!("task recipe: {e}")))?;
    // A shot's init image (its anchor's output) is kept beside the recipe.
    let init = s("init");
    if !init.is_empty() {
        recipe.init_image = Some(init);
    }
    let attempts: Vec<StoredAttempt> = serde_json::from_str(&s("attempts"))
        .map_err(|e| StoreError::Corrupt(format!("task attempts: {e}")))?;
    let result = match s("result").as_str() {
        "" => None,
        json => {
            let r: StoredResult = serde_json::from_str(json)
                .map_err(|e| StoreError::Corrupt(format!("task result: {e}")))?;
            Some(TaskResult {
                object: r.object,
                sha256: r.sha256,
                size: r.size,
                model_hash: r.model_hash,
                render_ms: r.render_ms,
                encode_ms: r.encode_ms,
                class: r.class,
            })
        }
    };
    Ok(TaskRecord {
        id: parse_id(&s("id"), "task id")?,
        job: parse_id(&s("job"), "job id")?,
        index: num(h, "index")?,
        recipe,
        file_name: s("file"),
        state: named::<TaskState>(&s("state"), "task state")?,
        epoch: Epoch(num(h, "epoch")?),
        attempts: attempts
            .into_iter()
            .map(|a| {
                Ok(Attempt {
                    worker: WorkerId(a.worker),
                    epoch: Epoch(a.epoch),
                    started_at_ms: a.started,
                    ended_at_ms: a.ended,
                    outcome: named::<Outcome>(&a.outcome, "attempt outcome")?,
                    fault: fault(&a.fault)?,
                    message: a.message,
                })
            })
            .collect::<StoreResult<_>>()?,
        // Absent until the task is first retried.
        counted_from: match h.get("counted") {
            Some(_) => num(h, "counted")?,
            None => 0,
        },
        step: num(h, "step")?,
        result,
        series: match s("series").as_str() {
            "" => None,
            name => Some(SeriesPlace {
                name: name.to_string(),
                shot: num(h, "shot")?,
                depends_on: u32::try_from(num::<i64>(h, "depends")?).ok(),
            }),
        },
    })
}

/// A worker's registration as stored (JSON).
#[derive(Serialize, Deserialize)]
pub(super) struct StoredRegistration {
    pub(super) labels: BTreeMap<String, String>,
    pub(super) gpu_memory_bytes: u64,
    pub(super) slots: u32,
    pub(super) models: Vec<(String, String)>,
    pub(super) determinism_class: String,
    pub(super) version: String,
    /// Absent in registrations stored before assets existed.
    #[serde(default)]
    pub(super) assets: super::super::HeldAssets,
}
