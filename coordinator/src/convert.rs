//! Conversions between the coordinator's records, enums and results and the
//! wire messages, from which the service handlers (`farm.rs`,
//! `worker_link.rs`) build their answers; the one mapping of the
//! coordinator's state enums ([`JobState`](crate::store::JobState),
//! [`TaskState`](crate::store::TaskState), [`Fault`](crate::store::Fault),
//! [`EventKind`](crate::store::EventKind),
//! [`AbandonReason`](crate::store::AbandonReason)) to and from their
//! `kiln.v1` numbers.

use kiln_proto::error::FieldError;
use kiln_proto::pb;
use kiln_proto::recipe::check_name;

use crate::models::ModelSummary;
use crate::store::{
    AbandonReason, Attempt, Event, EventKind, Fault, HeldAssets, JobRecord, JobState, Lease,
    ModelInfo, Preview, RunningTask, TaskCounts, TaskRecord, TaskState, Usage, WorkerRecord,
};
use crate::verify::Verification;

/// Returns the wire job state.
pub fn job_state(s: JobState) -> pb::JobState {
    match s {
        JobState::Running => pb::JobState::Running,
        JobState::Completed => pb::JobState::Completed,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

/// Returns the wire task state.
pub fn task_state(s: TaskState) -> pb::TaskState {
    match s {
        TaskState::Queued => pb::TaskState::Queued,
        TaskState::Leased => pb::TaskState::Leased,
        TaskState::Completed => pb::TaskState::Completed,
        TaskState::Failed => pb::TaskState::Failed,
        TaskState::Cancelled => pb::TaskState::Cancelled,
    }
}

/// Returns the wire fault class; no fault is `Unspecified`.
pub fn fault(f: Option<Fault>) -> pb::FaultClass {
    match f {
        None => pb::FaultClass::Unspecified,
        Some(Fault::WorkerLost) => pb::FaultClass::WorkerLost,
        Some(Fault::OutOfMemory) => pb::FaultClass::OutOfMemory,
        Some(Fault::ModelLoad) => pb::FaultClass::ModelLoad,
        Some(Fault::BadInput) => pb::FaultClass::BadInput,
        Some(Fault::Cancelled) => pb::FaultClass::Cancelled,
        Some(Fault::Internal) => pb::FaultClass::Internal,
        Some(Fault::ModelUnavailable) => pb::FaultClass::ModelUnavailable,
    }
}

/// Reads a worker's fault class: an unknown or unspecified one counts as `Internal`.
pub fn fault_from_wire(value: i32) -> Fault {
    match pb::FaultClass::try_from(value) {
        Ok(pb::FaultClass::WorkerLost) => Fault::WorkerLost,
        Ok(pb::FaultClass::OutOfMemory) => Fault::OutOfMemory,
        Ok(pb::FaultClass::ModelLoad) => Fault::ModelLoad,
        Ok(pb::FaultClass::BadInput) => Fault::BadInput,
        Ok(pb::FaultClass::Cancelled) => Fault::Cancelled,
        // Only the coordinator decides that a model is unavailable.
        Ok(
            pb::FaultClass::Internal
            | pb::FaultClass::Unspecified
            | pb::FaultClass::ModelUnavailable,
        )
        | Err(_) => Fault::Internal,
    }
}

/// Returns the wire event kind.
pub fn event_kind(k: EventKind) -> pb::EventKind {
    match k {
        EventKind::Leased => pb::EventKind::Leased,
        EventKind::Completed => pb::EventKind::Completed,
        EventKind::Failed => pb::EventKind::Failed,
        EventKind::Expired => pb::EventKind::Expired,
        EventKind::Cancelled => pb::EventKind::Cancelled,
        EventKind::StaleRefused => pb::EventKind::StaleRefused,
        EventKind::JobFinished => pb::EventKind::JobFinished,
        EventKind::Paused => pb::EventKind::Paused,
        EventKind::Resumed => pb::EventKind::Resumed,
        EventKind::Reprioritized => pb::EventKind::Reprioritized,
        EventKind::Retried => pb::EventKind::Retried,
    }
}

/// Returns the wire abandon reason.
pub fn abandon_reason(r: AbandonReason) -> pb::AbandonReason {
    match r {
        AbandonReason::Cancelled => pb::AbandonReason::Cancelled,
        AbandonReason::LeaseLost => pb::AbandonReason::LeaseLost,
    }
}

/// Returns the wire summary of a job.
pub fn job(r: &JobRecord) -> pb::JobSummary {
    pb::JobSummary {
        job_id: r.id.to_string(),
        name: r.name.clone(),
        project: r.project.clone(),
        priority: r.priority,
        state: job_state(r.state).into(),
        counts: Some(counts(&r.counts)),
        created_at_ms: r.created_at_ms,
        finished_at_ms: r.finished_at_ms.unwrap_or(0),
        idempotency_key: r.idempotency_key.clone().unwrap_or_default(),
        determinism_class: r.class.clone().unwrap_or_default(),
        verify_of: r.verify_of.map(|j| j.to_string()).unwrap_or_default(),
        paused: r.paused,
    }
}

fn counts(c: &TaskCounts) -> pb::TaskCounts {
    pb::TaskCounts {
        total: c.total,
        queued: c.queued,
        leased: c.leased,
        completed: c.completed,
        failed: c.failed,
        cancelled: c.cancelled,
    }
}

fn attempt(a: &Attempt) -> pb::Attempt {
    pb::Attempt {
        worker_id: a.worker.to_string(),
        epoch: a.epoch.0,
        started_at_ms: a.started_at_ms,
        ended_at_ms: a.ended_at_ms.unwrap_or(0),
        outcome: a.outcome.name().to_string(),
        fault: fault(a.fault).into(),
        message: a.message.clone(),
    }
}

/// Returns the wire view of a task with its attempts.
pub fn task(t: &TaskRecord) -> pb::TaskInfo {
    pb::TaskInfo {
        task_id: t.id.to_string(),
        index: t.index,
        state: task_state(t.state).into(),
        recipe: Some(kiln_proto::convert::recipe_to_pb(&t.recipe)),
        attempts: t.attempts.iter().map(attempt).collect(),
        step: t.step,
        file_name: t.file_name.clone(),
        sha256: t
            .result
            .as_ref()
            .map(|r| r.sha256.clone())
            .unwrap_or_default(),
        recipe_hash: t.recipe.hash(),
        series: t
            .series
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default(),
        shot: t.series.as_ref().map_or(0, |s| s.shot),
        depends_on: t.series.as_ref().and_then(|s| s.depends_on),
        determinism_class: t
            .result
            .as_ref()
            .map(|r| r.class.clone())
            .unwrap_or_default(),
    }
}

/// Returns the wire form of an event.
pub fn event(e: &Event) -> pb::JobEvent {
    pb::JobEvent {
        seq: e.seq,
        at_ms: e.at_ms,
        kind: event_kind(e.kind).into(),
        task_id: e.task.map(|t| t.to_string()).unwrap_or_default(),
        index: e.index,
        worker_id: e.worker.as_ref().map(|w| w.to_string()).unwrap_or_default(),
        epoch: e.epoch.0,
        fault: fault(e.fault).into(),
        message: e.message.clone(),
    }
}

/// Returns the wire progress of a running task.
pub fn running(r: &RunningTask) -> pb::TaskProgress {
    pb::TaskProgress {
        task_id: r.task.to_string(),
        index: r.index,
        step: r.step,
        steps: r.steps,
        worker_id: r.worker.to_string(),
    }
}

/// Reads one list a registering worker announces (models, LoRAs, embeddings,
/// ControlNets); each name must follow the catalog name rule.
///
/// # Errors
/// The first name refused, as `FIELD[i].name`.
pub fn announced(field: &str, infos: &[pb::ModelInfo]) -> Result<Vec<ModelInfo>, FieldError> {
    infos
        .iter()
        .enumerate()
        .map(|(i, m)| {
            check_name(&format!("{field}[{i}].name"), &m.name)?;
            Ok(ModelInfo {
                name: m.name.clone(),
                hash: m.hash.clone(),
            })
        })
        .collect()
}

/// Reads the LoRAs, embeddings and ControlNets a registering worker announces.
///
/// # Errors
/// The first name refused, as `loras[i].name` (or `embeddings`, `controlnets`).
pub fn held_assets(req: &pb::RegisterRequest) -> Result<HeldAssets, FieldError> {
    Ok(HeldAssets {
        loras: announced("loras", &req.loras)?,
        embeddings: announced("embeddings", &req.embeddings)?,
        controlnets: announced("controlnets", &req.controlnets)?,
    })
}

/// Returns the wire form of a running task's live preview.
pub fn preview(r: &RunningTask, p: &Preview) -> pb::TaskPreview {
    pb::TaskPreview {
        task_id: r.task.to_string(),
        index: r.index,
        step: p.step,
        png: p.png.clone(),
    }
}

/// Returns the wire form of a model.
pub fn model(m: &ModelInfo) -> pb::ModelInfo {
    pb::ModelInfo {
        name: m.name.clone(),
        hash: m.hash.clone(),
    }
}

/// Returns the wire summary of a worker; `lost` when it stopped calling.
pub fn worker(w: &WorkerRecord, lost: bool) -> pb::WorkerSummary {
    let r = &w.registration;
    pb::WorkerSummary {
        worker_id: r.id.to_string(),
        state: if lost {
            "lost"
        } else if w.draining {
            "draining"
        } else {
            "active"
        }
        .to_string(),
        slots: r.slots,
        models: r.models.iter().map(model).collect(),
        running_task_ids: w.running.iter().map(|t| t.to_string()).collect(),
        last_seen_ms: w.last_seen_ms,
        determinism_class: r.determinism_class.clone(),
        labels: r.labels.clone().into_iter().collect(),
        completed: w.completed,
        failed: w.failed,
    }
}

/// Returns the wire form of a model summary: its hashes, the chosen one first and marked.
pub fn model_summary(m: &ModelSummary) -> pb::ModelSummary {
    pb::ModelSummary {
        name: m.name.clone(),
        hashes: m
            .hashes
            .iter()
            .enumerate()
            .map(|(i, h)| pb::ModelHash {
                hash: h.hash.clone(),
                worker_ids: h.workers.iter().map(|w| w.to_string()).collect(),
                chosen: i == 0,
            })
            .collect(),
        resident_worker_ids: m.resident.iter().map(|w| w.to_string()).collect(),
        queued: m.queued,
        running: m.running,
    }
}

/// Returns the wire form of a lease.
pub fn lease(l: &Lease) -> pb::LeasedTask {
    pb::LeasedTask {
        task_id: l.task.to_string(),
        job_id: l.job.to_string(),
        index: l.index,
        epoch: l.epoch.0,
        recipe: Some(kiln_proto::convert::recipe_to_pb(&l.recipe)),
        lease_ttl_ms: l.ttl.as_millis() as u32,
        blobs: Vec::new(),
        traceparent: String::new(),
    }
}

/// Returns a verification's answer.
pub fn verification(v: &Verification) -> pb::VerifyJobResponse {
    pb::VerifyJobResponse {
        job: v.job.as_ref().map(job),
        original_index: v.original_index.clone(),
        skipped: v
            .skipped
            .iter()
            .map(|s| pb::SkippedItem {
                index: s.index,
                reason: s.reason.clone(),
            })
            .collect(),
    }
}

/// Returns the wire entry of one project's usage of one model.
pub fn usage_entry(project: &str, model: &str, u: &Usage) -> pb::UsageEntry {
    pb::UsageEntry {
        project: project.to_string(),
        model: model.to_string(),
        images: u.images,
        render_seconds: u.render_ms as f64 / 1000.0,
        failed_attempts: u.failed_attempts,
    }
}
