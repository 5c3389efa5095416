//! How the CLI shows jobs, workers and models: short state names, tables, JSON.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use kiln_proto::model::short_hash;
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

/// Returns the hash each model name means on the farm: the chosen hashes of
/// `ListModels`, which the coordinator picks by the farm's one rule
/// (`kiln_proto::model`).
pub fn farm_hashes(models: &[pb::ModelSummary]) -> BTreeMap<String, String> {
    models
        .iter()
        .filter_map(|m| {
            let chosen = m.hashes.iter().find(|h| h.chosen)?;
            Some((m.name.clone(), chosen.hash.clone()))
        })
        .collect()
}

/// Returns the farm's hash for a worker's model when the worker holds
/// another one (a mismatch: it gets no task pinned to the farm's hash).
fn mismatch<'a>(m: &pb::ModelInfo, farm: &'a BTreeMap<String, String>) -> Option<&'a str> {
    farm.get(&m.name)
        .filter(|chosen| **chosen != m.hash)
        .map(String::as_str)
}

/// Returns a worker's model as `kiln workers` shows it: the name, and when
/// its hash is not the one the farm chose for the name, both hashes:
/// `tiny (mismatch: abc123def456, farm: 0a1b2c3d4e5f)`.
pub fn worker_model(m: &pb::ModelInfo, farm: &BTreeMap<String, String>) -> String {
    match mismatch(m, farm) {
        Some(chosen) => format!(
            "{} (mismatch: {}, farm: {})",
            m.name,
            short_hash(&m.hash),
            short_hash(chosen)
        ),
        None => m.name.clone(),
    }
}

/// Returns a worker as JSON; with `farm` (the farm's hash of each model
/// name), each model says whether the worker's hash is another one.
pub fn worker_json(w: &pb::WorkerSummary, farm: Option<&BTreeMap<String, String>>) -> Value {
    let model = |m: &pb::ModelInfo| {
        let mut v = json!({"name": m.name, "hash": m.hash});
        if let (Some(farm), Some(fields)) = (farm, v.as_object_mut()) {
            fields.insert("mismatch".into(), mismatch(m, farm).is_some().into());
            fields.insert("farm_hash".into(), json!(farm.get(&m.name)));
        }
        v
    };
    json!({
        "worker_id": w.worker_id,
        "state": w.state,
        "slots": w.slots,
        "models": w.models.iter().map(model).collect::<Vec<_>>(),
        "running": w.running_task_ids,
        "completed": w.completed,
        "failed": w.failed,
        "last_seen": time(w.last_seen_ms),
        "determinism_class": w.determinism_class,
        "labels": w.labels,
    })
}

/// Returns a model as JSON: its hashes (the chosen one marked) with the
/// live workers holding each, the workers with it loaded, and its tasks.
pub fn model_json(m: &pb::ModelSummary) -> Value {
    json!({
        "name": m.name,
        "hashes": m.hashes.iter().map(|h| json!({
            "hash": h.hash,
            "workers": h.worker_ids,
            "chosen": h.chosen,
        })).collect::<Vec<_>>(),
        "resident": m.resident_worker_ids,
        "queued": m.queued,
        "running": m.running,
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
    fn a_worker_holding_another_hash_than_the_farm_is_marked() {
        let farm = farm_hashes(&[pb::ModelSummary {
            name: "tiny".into(),
            hashes: vec![
                pb::ModelHash {
                    hash: "0a1b2c3d4e5f6a7b8c9d".into(),
                    worker_ids: vec!["w1".into(), "w2".into()],
                    chosen: true,
                },
                pb::ModelHash {
                    hash: "abc123def4567890".into(),
                    worker_ids: vec!["w3".into()],
                    chosen: false,
                },
            ],
            ..Default::default()
        }]);
        let model = |hash: &str| pb::ModelInfo {
            name: "tiny".into(),
            hash: hash.into(),
        };
        assert_eq!(
            worker_model(&model("abc123def4567890"), &farm),
            "tiny (mismatch: abc123def456, farm: 0a1b2c3d4e5f)"
        );
        assert_eq!(worker_model(&model("0a1b2c3d4e5f6a7b8c9d"), &farm), "tiny");
        let other = pb::ModelInfo {
            name: "sd15".into(),
            hash: "x".into(),
        };
        assert_eq!(worker_model(&other, &farm), "sd15", "no farm hash: no mark");
    }

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
