//! How the CLI shows jobs and workers: short state names, tables, JSON.

use std::time::{Duration, UNIX_EPOCH};

use kiln_proto::pb::{self, JobState};
use serde_json::{Value, json};

/// Returns the short name of a job state.
pub fn job_state(state: i32) -> &'static str {
    match JobState::try_from(state).unwrap_or(JobState::Unspecified) {
        JobState::Running => "running",
        JobState::Completed => "completed",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
        JobState::Unspecified => "unknown",
    }
}

/// Returns the state a job is shown in: `paused` for a running job that
/// is paused (`kiln pause`), else its state.
pub fn shown_state(j: &pb::JobSummary) -> &'static str {
    if j.paused && j.state == JobState::Running as i32 {
        "paused"
    } else {
        job_state(j.state)
    }
}

/// Returns a Unix-milliseconds time as RFC 3339 (UTC), or "-" for none.
pub fn time(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let t = UNIX_EPOCH + Duration::from_millis(ms as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Returns a job as JSON.
pub fn job_json(j: &pb::JobSummary) -> Value {
    let c = j.counts.unwrap_or_default();
    json!({
        "job_id": j.job_id,
        "name": j.name,
        "project": j.project,
        "priority": j.priority,
        "state": shown_state(j),
        "paused": j.paused,
        "counts": {
            "total": c.total, "queued": c.queued, "running": c.leased,
            "completed": c.completed, "failed": c.failed, "cancelled": c.cancelled,
        },
        "created_at": time(j.created_at_ms),
        "finished_at": if j.finished_at_ms > 0 { Value::from(time(j.finished_at_ms)) } else { Value::Null },
        "idempotency_key": j.idempotency_key,
    })
}

/// Returns a worker as JSON.
pub fn worker_json(w: &pb::WorkerSummary) -> Value {
    json!({
        "worker_id": w.worker_id,
        "state": w.state,
        "slots": w.slots,
        "models": w.models.iter().map(|m| json!({"name": m.name, "hash": m.hash})).collect::<Vec<_>>(),
        "running": w.running_task_ids,
        "completed": w.completed,
        "failed": w.failed,
        "last_seen": time(w.last_seen_ms),
        "determinism_class": w.determinism_class,
        "labels": w.labels,
    })
}

/// Formats rows as a left-aligned table with a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                let pad = widths[i].saturating_sub(cell.chars().count());
                out.push_str(cell);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.trim_end().to_string()
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["ID", "STATE"],
            &[
                vec!["a".into(), "running".into()],
                vec!["bbbb".into(), "done".into()],
            ],
        );
        assert_eq!(t, "ID    STATE\na     running\nbbbb  done");
    }

    #[test]
    fn states_have_short_names() {
        assert_eq!(job_state(JobState::Completed as i32), "completed");
        assert_eq!(time(0), "-");
        assert_eq!(time(1_700_000_000_000), "2023-11-14T22:13:20Z");
    }
}
