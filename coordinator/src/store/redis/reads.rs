//! The read side of the Redis store: listings, tasks, workers, events. Plain
//! reads, never transitions, so they need no script.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use kiln_proto::ids::{Epoch, JobId, WorkerId};
use redis::Value;
use tokio::time::Instant;

use super::records::*;
use super::scripts::{LIVE_FIELDS, PIN_FIELDS};
use super::scripts::{USAGE_FAILED, USAGE_IMAGES, USAGE_RENDER_MS, USAGE_SEP};
use super::{FALLBACK_POLL, RedisStore};
use crate::store::state::{EventKind, JobState, StateName, WorkerState};
use crate::store::types::*;
use crate::store::{StoreError, StoreResult};

impl RedisStore {
    /// Reads the `usage` hash: fields `day|project|model|counter` (see
    /// `end_lease` in prelude.lua), buckets of `since_day` and later.
    pub(super) async fn read_usage(&self, since_day: i64) -> StoreResult<Vec<UsageRow>> {
        let h = self.hgetall(self.key(&["usage"])).await?;
        let mut rows: BTreeMap<(i64, String, String), Usage> = BTreeMap::new();
        for (field, value) in &h {
            let corrupt = || StoreError::Corrupt(format!("usage field {field:?} = {value:?}"));
            let mut parts = field.split(USAGE_SEP);
            let (Some(day), Some(project), Some(model), Some(counter), None) = (
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
            ) else {
                return Err(corrupt());
            };
            let day: i64 = day.parse().map_err(|_| corrupt())?;
            if day < since_day {
                continue;
            }
            let n: u64 = value.parse().map_err(|_| corrupt())?;
            let usage = rows
                .entry((day, project.to_string(), model.to_string()))
                .or_default();
            match counter {
                USAGE_IMAGES => usage.images = n,
                USAGE_RENDER_MS => usage.render_ms = n,
                USAGE_FAILED => usage.failed_attempts = n,
                _ => return Err(corrupt()),
            }
        }
        Ok(rows
            .into_iter()
            .map(|((day, project, model), usage)| UsageRow {
                day,
                project,
                model,
                usage,
            })
            .collect())
    }

    pub(super) async fn read_jobs(&self, limit: usize) -> StoreResult<Vec<JobRecord>> {
        let key = self.key(&["jobs"]);
        // Read a little more than asked: jobs past retention are skipped and pruned.
        let ids: Vec<String> = self
            .retry("ZREVRANGE", || {
                let mut conn = self.conn.clone();
                let key = key.clone();
                async move {
                    redis::cmd("ZREVRANGE")
                        .arg(key)
                        .arg(0)
                        .arg(limit.saturating_mul(2).max(16) as i64 - 1)
                        .query_async(&mut conn)
                        .await
                }
            })
            .await?;
        let keys: Vec<String> = ids.iter().map(|id| self.key(&["job", id])).collect();
        let hashes = self.hgetall_many(&keys).await?;
        let mut out = Vec::new();
        let mut gone = Vec::new();
        for (id, h) in ids.iter().zip(hashes) {
            if h.is_empty() {
                gone.push(id.clone());
            } else if out.len() < limit {
                out.push(parse_job(&h)?);
            }
        }
        if !gone.is_empty() {
            let mut conn = self.conn.clone();
            let _: Result<(), _> = redis::cmd("ZREM")
                .arg(&key)
                .arg(&gone)
                .query_async(&mut conn)
                .await;
        }
        Ok(out)
    }

    pub(super) async fn read_tasks(&self, id: JobId) -> StoreResult<Vec<TaskRecord>> {
        self.job_record(id).await?;
        let ids = self.task_ids(id).await?;
        let keys: Vec<String> = ids.iter().map(|t| self.key(&["task", t])).collect();
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(1000) {
            for h in self.hgetall_many(chunk).await? {
                if !h.is_empty() {
                    out.push(parse_task(&h)?);
                }
            }
        }
        Ok(out)
    }

    pub(super) async fn read_running(&self, id: JobId) -> StoreResult<Vec<RunningTask>> {
        self.job_record(id).await?;
        let ids = self
            .smembers(self.key(&["job", &id.to_string(), "leased"]))
            .await?;
        let keys: Vec<String> = ids.iter().map(|t| self.key(&["task", t])).collect();
        let mut out = Vec::new();
        for h in self.hgetall_many(&keys).await? {
            if h.is_empty() {
                continue;
            }
            let t = parse_task(&h)?;
            if let Some(worker) = t.holder().cloned() {
                out.push(RunningTask {
                    task: t.id,
                    index: t.index,
                    step: t.step,
                    steps: t.recipe.steps,
                    worker,
                });
            }
        }
        out.sort_by_key(|r| r.index);
        Ok(out)
    }

    pub(super) async fn read_workers(&self) -> StoreResult<Vec<WorkerRecord>> {
        let ids = self.smembers(self.key(&["workers"])).await?;
        let keys: Vec<String> = ids.iter().map(|w| self.key(&["worker", w])).collect();
        let hashes = self.hgetall_many(&keys).await?;
        let mut out = Vec::new();
        for (id, h) in ids.iter().zip(hashes) {
            let Some(reg_json) = h.get("reg") else {
                continue;
            };
            let stored: StoredRegistration = serde_json::from_str(reg_json)
                .map_err(|e| StoreError::Corrupt(format!("worker {id}: {e}")))?;
            let running = self.smembers(self.key(&["worker", id, "running"])).await?;
            out.push(WorkerRecord {
                registration: WorkerRegistration {
                    id: WorkerId(id.clone()),
                    labels: stored.labels,
                    gpu_memory_bytes: stored.gpu_memory_bytes,
                    slots: stored.slots,
                    models: stored
                        .models
                        .into_iter()
                        .map(|(name, hash)| ModelInfo { name, hash })
                        .collect(),
                    determinism_class: stored.determinism_class,
                    version: stored.version,
                    assets: stored.assets,
                },
                draining: h.get("draining").map(String::as_str) == Some("1"),
                last_seen_ms: num(&h, "seen").unwrap_or(0),
                running: running.iter().filter_map(|t| t.parse().ok()).collect(),
                completed: num(&h, "completed").unwrap_or(0),
                failed: num(&h, "failed").unwrap_or(0),
            });
        }
        out.sort_by(|a, b| a.registration.id.cmp(&b.registration.id));
        Ok(out)
    }

    pub(super) async fn read_live_workers(&self) -> StoreResult<Vec<LiveWorker>> {
        // A script, so liveness is judged on the Redis clock by the prelude's `live`.
        let reply = items(self.invoke(&self.scripts.live, &[]).await?)?;
        let mut out = Vec::new();
        for row in reply.chunks(LIVE_FIELDS) {
            let [id, models, resident] = row else {
                return Err(StoreError::Corrupt("short live-workers reply".into()));
            };
            let id = text(id);
            let corrupt = |e: serde_json::Error| StoreError::Corrupt(format!("worker {id}: {e}"));
            let models: BTreeMap<String, String> =
                serde_json::from_str(&text(models)).map_err(corrupt)?;
            let resident: Vec<String> = serde_json::from_str(&text(resident)).map_err(corrupt)?;
            out.push(LiveWorker {
                id: WorkerId(id.clone()),
                models: models
                    .into_iter()
                    .map(|(name, hash)| ModelInfo { name, hash })
                    .collect(),
                resident,
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    pub(super) async fn read_pinned_tasks(&self) -> StoreResult<Vec<PinnedTasks>> {
        let reply = items(self.invoke(&self.scripts.pinned, &[]).await?)?;
        let mut pins: BTreeMap<(String, String), PinnedTasks> = BTreeMap::new();
        for row in reply.chunks(PIN_FIELDS) {
            let [model, hash, queued, running] = row else {
                return Err(StoreError::Corrupt("short pinned-tasks reply".into()));
            };
            let (model, hash) = (text(model), text(hash));
            let pin = pins
                .entry((model.clone(), hash.clone()))
                .or_insert_with(|| PinnedTasks {
                    model,
                    hash,
                    queued: 0,
                    running: 0,
                });
            pin.queued += parse_id::<u32>(&text(queued), "queued")?;
            pin.running += parse_id::<u32>(&text(running), "running")?;
        }
        Ok(pins.into_values().collect())
    }

    pub(super) async fn read_events(
        &self,
        id: JobId,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<Event>> {
        let job = id.to_string();
        let key = self.key(&["job", &job, "events"]);
        let reply: Value = self
            .retry("XRANGE", || {
                let mut conn = self.conn.clone();
                let key = key.clone();
                async move {
                    redis::cmd("XRANGE")
                        .arg(key)
                        .arg(format!("(0-{after}"))
                        .arg("+")
                        .arg("COUNT")
                        .arg(limit)
                        .query_async(&mut conn)
                        .await
                }
            })
            .await?;
        let entries = items(reply)?;
        if entries.is_empty() {
            // No events: tell a missing job from a quiet one.
            self.job_record(id).await?;
        }
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            let mut parts = items(entry)?.into_iter();
            let (Some(entry_id), Some(fields)) = (parts.next(), parts.next()) else {
                continue;
            };
            let entry_id = text(&entry_id);
            let seq: u64 = parse_id(entry_id.strip_prefix("0-").unwrap_or(&entry_id), "event id")?;
            let fields = items(fields)?;
            let mut f: HashMap<String, String> = HashMap::new();
            for pair in fields.chunks(2) {
                if let [name, value] = pair {
                    f.insert(text(name), text(value));
                }
            }
            let get = |n: &str| f.get(n).cloned().unwrap_or_default();
            let task = get("task");
            let worker = get("worker");
            out.push(Event {
                seq,
                at_ms: num(&f, "at")?,
                kind: named::<EventKind>(&get("kind"), "event kind")?,
                task: if task.is_empty() {
                    None
                } else {
                    Some(parse_id(&task, "task id")?)
                },
                index: num(&f, "index")?,
                worker: (!worker.is_empty()).then_some(WorkerId(worker)),
                epoch: Epoch(num(&f, "epoch")?),
                fault: fault(&get("fault"))?,
                message: get("msg"),
            });
        }
        Ok(out)
    }

    pub(super) async fn read_wait_events(
        &self,
        id: JobId,
        after: u64,
        timeout: Duration,
    ) -> StoreResult<()> {
        let deadline = Instant::now() + timeout;
        let mut rx = self.events.clone();
        let key = self.key(&["job", &id.to_string()]);
        loop {
            rx.borrow_and_update();
            let seq: Option<u64> = self
                .retry("HGET", || {
                    let mut conn = self.conn.clone();
                    let key = key.clone();
                    async move {
                        redis::cmd("HGET")
                            .arg(key)
                            .arg("seq")
                            .query_async(&mut conn)
                            .await
                    }
                })
                .await?;
            match seq {
                None => return Err(StoreError::JobNotFound(id)),
                Some(s) if s > after => return Ok(()),
                Some(_) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(());
            }
            Self::wake_or_timeout(&mut rx, (deadline - now).min(FALLBACK_POLL)).await;
        }
    }

    pub(super) async fn read_farm_counts(&self) -> StoreResult<FarmCounts> {
        let reply = self.invoke(&self.scripts.stats, &[]).await?;
        parse_farm_counts(&text(&reply))
    }

    pub(super) async fn read_ping(&self) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(())
    }
}

/// The JSON `stats.lua` answers.
#[derive(serde::Deserialize)]
struct StoredCounts {
    /// Model name -> [queued, running, workers].
    models: BTreeMap<String, [u64; 3]>,
    jobs: BTreeMap<String, u64>,
    workers: BTreeMap<String, u64>,
}

/// Reads the reply of `stats.lua`; every state appears, with zero when absent.
fn parse_farm_counts(json: &str) -> StoreResult<FarmCounts> {
    let stored: StoredCounts =
        serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("farm counts: {e}")))?;
    let mut counts = FarmCounts {
        models: stored
            .models
            .into_iter()
            .map(|(name, [queued, running, workers])| {
                (
                    name,
                    ModelLoad {
                        queued,
                        running,
                        workers,
                    },
                )
            })
            .collect(),
        jobs: JobState::ALL.iter().map(|s| (*s, 0)).collect(),
        workers: WorkerState::ALL.iter().map(|s| (*s, 0)).collect(),
    };
    for (name, n) in stored.jobs {
        counts
            .jobs
            .insert(named::<JobState>(&name, "job state")?, n);
    }
    for (name, n) in stored.workers {
        counts
            .workers
            .insert(named::<WorkerState>(&name, "worker state")?, n);
    }
    Ok(counts)
}
