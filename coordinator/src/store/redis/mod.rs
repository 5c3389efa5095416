//! The production store on Redis. Every state transition is one Lua script
//! (see `redis/*.lua`, each prefixed with constants generated from Rust and
//! `redis/prelude.lua`: `redis/scripts.rs`), so any number
//! of coordinators can serve and reap at once. All keys of a farm share one
//! hash tag (`{name}:...`), so every script is single-slot on Redis Cluster.
//! Lease deadlines come from Redis `TIME`.
//!
//! Completions and claims go through one script, `dispatch.lua`, and a
//! batcher (`batch.rs`) that sends the calls arriving while a run is in
//! flight together in the next run; a Complete that carries the worker's
//! next lease is one call of it (`complete_and_claim`).
//!
//! Connections: a `ConnectionManager` for commands (it reconnects by itself;
//! every call has a response timeout and transient failures are retried with
//! backoff for a bounded time), and a separate Pub/Sub connection that wakes
//! long-polling claims and watchers. Waiting on Pub/Sub instead of blocking
//! reads keeps one connection for all waiters; a missed message only costs
//! the one-second fallback poll.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use kiln_proto::ids::{Epoch, JobId, TaskId, WorkerId};
use kiln_proto::lora_set::ReadyLoraSet;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script, Value};
use tokio::sync::watch;
use tokio::time::Instant;

mod batch;
mod pubsub;
mod reads;
mod records;
mod scripts;

use self::batch::{Batcher, Link};
use self::pubsub::listen;
use self::records::*;
use self::scripts::{
    CLAIM_ARGS, COMPLETE_ARGS, DEDUPED_FIELDS, DELIVERY_FIELDS, LEASE_FIELDS, OP_CLAIM,
    OP_COMPLETE, OP_COMPLETE_CLAIM, PROGRESS_FIELDS, REAPED_FIELDS, RELEASED_FIELDS, Scripts,
    TASK_ARGS,
};
use super::policy::{task_batch_key, task_lora_set, task_needs};
use super::state::{AbandonReason, Fault};
use super::types::*;
use super::{Store, StoreError, StoreResult};

/// How long transient Redis failures are retried before a call fails.
const RETRY_BUDGET: Duration = Duration::from_secs(20);
/// Longest a long-polling claim or a watcher waits for a Pub/Sub wake-up before polling.
const FALLBACK_POLL: Duration = Duration::from_secs(1);
/// Leases reaped per script run, so one run never blocks Redis for long.
const REAP_BATCH: usize = 500;

/// How to reach a farm's Redis.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// `redis://HOST:PORT/DB` or `rediss://` for TLS.
    pub url: String,
    /// Farm name: keys are `{name}:...`, so several farms can share one Redis.
    pub name: String,
    /// How long a finished job's live keys are kept.
    pub retention: Duration,
}

/// The Redis [`Store`].
pub struct RedisStore {
    conn: ConnectionManager,
    /// `{name}`: the hash tag every key starts with.
    prefix: String,
    retention_ms: u64,
    scripts: Scripts,
    work: watch::Receiver<u64>,
    events: watch::Receiver<u64>,
    listener: tokio::task::JoinHandle<()>,
    /// Completions and claims, sent in runs of `dispatch.lua`.
    batcher: Batcher,
    /// Commands and pipelines sent, retries included: what a task costs in round trips.
    round_trips: Arc<AtomicU64>,
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

fn transient(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_unrecoverable_error()
        || matches!(
            e.kind(),
            redis::ErrorKind::Server(
                redis::ServerErrorKind::BusyLoading
                    | redis::ServerErrorKind::TryAgain
                    | redis::ServerErrorKind::ClusterDown
                    | redis::ServerErrorKind::MasterDown
            )
        )
        || e.to_string().contains("LOADING")
}

/// Returns a store URL without its credentials (`redis://***@host:6379/0`),
/// for logs and error messages: a password is never printed.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***{}", &url[..scheme], &url[at..])
        }
        _ => url.to_string(),
    }
}

impl RedisStore {
    /// Connects, checks that Redis cannot evict keys, and starts the Pub/Sub listener.
    ///
    /// # Errors
    /// `Misconfigured` for a bad URL or an evicting `maxmemory-policy`;
    /// `Unavailable` when Redis cannot be reached.
    pub async fn connect(config: &RedisConfig) -> StoreResult<Self> {
        // The farm name becomes every key's hash tag: kiln's one naming rule.
        kiln_proto::recipe::check_name("farm name", &config.name)
            .map_err(|e| StoreError::Misconfigured(e.to_string()))?;
        if config.url.starts_with("rediss://") {
            // rustls needs one process-wide crypto provider; a second install is a no-op.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = redis::Client::open(config.url.as_str()).map_err(|e| {
            StoreError::Misconfigured(format!(
                "invalid Redis URL {:?}: {e}",
                redacted(&config.url)
            ))
        })?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(3)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let conn = tokio::time::timeout(
            Duration::from_secs(15),
            ConnectionManager::new_with_config(client.clone(), manager_config),
        )
        .await
        .map_err(|_| {
            StoreError::Unavailable(format!(
                "no answer from {} within 15 s",
                redacted(&config.url)
            ))
        })?
        .map_err(|e| {
            StoreError::Unavailable(format!("cannot connect to {}: {e}", redacted(&config.url)))
        })?;
        let (work_tx, work) = watch::channel(0);
        let (events_tx, events) = watch::channel(0);
        let prefix = format!("{{{}}}", config.name);
        let scripts = Scripts::new();
        let round_trips: Arc<AtomicU64> = Default::default();
        let retention_ms = config.retention.as_millis() as u64;
        let batcher = Batcher::start(Link {
            conn: conn.clone(),
            script: scripts.dispatch.clone(),
            slot_key: format!("{prefix}:ready"),
            prefix: prefix.clone(),
            retention_ms,
            round_trips: round_trips.clone(),
        });
        let store = Self {
            conn,
            listener: tokio::spawn(listen(client, prefix.clone(), work_tx, events_tx)),
            prefix,
            retention_ms,
            scripts,
            work,
            events,
            batcher,
            round_trips,
        };
        store.check_policy(&redacted(&config.url)).await?;
        Ok(store)
    }

    /// Refuses a Redis that may evict keys: any policy but `noeviction`
    /// silently deletes queue keys under memory pressure.
    async fn check_policy(&self, url: &str) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        let reply: Result<Vec<String>, RedisError> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async(&mut conn)
            .await;
        match reply {
            Ok(pair) => match pair.get(1).map(String::as_str) {
                Some("noeviction") => Ok(()),
                Some(policy) => Err(StoreError::Misconfigured(format!(
                    "Redis at {url} has maxmemory-policy {policy}, which can evict queue keys and lose work; set it to noeviction (redis-cli CONFIG SET maxmemory-policy noeviction, and `maxmemory-policy noeviction` in redis.conf)"
                ))),
                None => Err(StoreError::Misconfigured(format!(
                    "Redis at {url} did not report its maxmemory-policy"
                ))),
            },
            Err(e) if transient(&e) => Err(StoreError::Unavailable(e.to_string())),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read maxmemory-policy (CONFIG disabled?); make sure it is noeviction");
                Ok(())
            }
        }
    }

    /// Returns how many commands and pipelines this store has sent to Redis.
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    /// Returns the CPU time the Redis server has used since it started
    /// (user plus system, `INFO cpu`), in seconds: benchmarks compare it
    /// before and after, a measure a busy machine skews less than wall time.
    ///
    /// # Errors
    /// When Redis cannot be reached or its answer lacks the fields.
    pub async fn server_cpu_s(&self) -> StoreResult<f64> {
        let info: String = self
            .retry("INFO", || {
                let mut conn = self.conn.clone();
                async move { redis::cmd("INFO").arg("cpu").query_async(&mut conn).await }
            })
            .await?;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse::<f64>().ok())
        };
        match (field("used_cpu_user"), field("used_cpu_sys")) {
            (Some(user), Some(sys)) => Ok(user + sys),
            _ => Err(StoreError::Backend(
                "INFO cpu has no used_cpu_user and used_cpu_sys".into(),
            )),
        }
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.prefix.clone();
        for p in parts {
            k.push(':');
            k.push_str(p);
        }
        k
    }

    /// Runs a script with the common arguments (prefix, retention) first,
    /// retrying transient failures within the retry budget.
    async fn invoke(&self, script: &Script, args: &[Arg<'_>]) -> StoreResult<Value> {
        self.retry("script", || {
            let mut inv = script.prepare_invoke();
            inv.key(self.key(&["ready"]))
                .arg(&self.prefix)
                .arg(self.retention_ms);
            for a in args {
                match a {
                    Arg::Str(s) => inv.arg(*s),
                    Arg::Bytes(b) => inv.arg(*b),
                    Arg::Int(i) => inv.arg(*i),
                };
            }
            let mut conn = self.conn.clone();
            async move { inv.invoke_async::<Value>(&mut conn).await }
        })
        .await
    }

    /// Retries `call` on transient errors with backoff, for at most [`RETRY_BUDGET`].
    async fn retry<T, F, Fut>(&self, what: &str, call: F) -> StoreResult<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        retry(&self.round_trips, what, call).await
    }

    /// Reads a claim's reply: `Claim`, or the worker's refusal as an error.
    async fn claim_of(&self, worker: &WorkerId, reply: Value, ttl: Duration) -> StoreResult<Claim> {
        let reply = items(reply)?;
        match reply.first().map(text).as_deref() {
            Some("unknown") => return Err(StoreError::UnknownWorker(worker.clone())),
            Some("bound") => return Err(StoreError::WorkerBound(worker.clone())),
            Some("drain") => {
                return Ok(Claim {
                    drain: true,
                    ..Default::default()
                });
            }
            Some("error") => return Err(script_error(&reply)),
            _ => {}
        }
        let count = |i: usize| -> StoreResult<usize> {
            parse_id(&reply.get(i).map(text).unwrap_or_default(), "count")
        };
        let (n_leases, n_deduped, n_finished) = (count(1)?, count(2)?, count(3)?);
        let mut rest = reply.get(4..).unwrap_or_default().iter();
        let mut claim = Claim::default();
        for _ in 0..n_leases {
            let v: Vec<String> = rest.by_ref().take(LEASE_FIELDS).map(text).collect();
            let [task, job, index, epoch, recipe, init, anchor, file] = v.as_slice() else {
                return Err(StoreError::Corrupt("short claim reply".into()));
            };
            let mut recipe: kiln_proto::recipe::Recipe = serde_json::from_str(recipe)
                .map_err(|e| StoreError::Corrupt(format!("recipe: {e}")))?;
            if !init.is_empty() {
                recipe.init_image = Some(init.clone());
            }
            claim.leases.push(Lease {
                task: parse_id(task, "task id")?,
                job: parse_id(job, "job id")?,
                index: parse_id(index, "index")?,
                epoch: Epoch(parse_id(epoch, "epoch")?),
                recipe,
                file_name: file.clone(),
                ttl,
                anchor: u32::try_from(parse_id::<i64>(anchor, "anchor index")?).ok(),
            });
        }
        for _ in 0..n_deduped {
            let v: Vec<String> = rest.by_ref().take(DEDUPED_FIELDS).map(text).collect();
            let [task, job, file, source, model] = v.as_slice() else {
                return Err(StoreError::Corrupt("short claim reply".into()));
            };
            claim.deduped.push(Deduped {
                task: parse_id(task, "task id")?,
                job: parse_id(job, "job id")?,
                file_name: file.clone(),
                source: source.clone(),
                model: model.clone(),
            });
        }
        for _ in 0..n_finished {
            let job: JobId = parse_id(&rest.next().map(text).unwrap_or_default(), "job id")?;
            claim.finished.push(self.job_record(job).await?);
        }
        Ok(claim)
    }

    /// Reads a completion's reply.
    async fn completion_of(
        &self,
        worker: &WorkerId,
        task: TaskId,
        reply: Value,
    ) -> StoreResult<CompleteOutcome> {
        let reply = items(reply)?;
        match reply.first().map(text).as_deref() {
            Some("bound") => Err(StoreError::WorkerBound(worker.clone())),
            Some("ok") => {
                let finished = reply.get(1).map(text).unwrap_or_default();
                let job_finished = if finished.is_empty() {
                    None
                } else {
                    let job = reply.get(2).map(text).unwrap_or_default();
                    Some(self.job_record(parse_id(&job, "job id")?).await?)
                };
                Ok(CompleteOutcome::Accepted { job_finished })
            }
            Some("stale") => Ok(CompleteOutcome::Stale {
                reason: reply.get(1).map(text).unwrap_or_default(),
            }),
            Some("error") => Err(script_error(&reply)),
            _ => Err(StoreError::TaskNotFound(task)),
        }
    }

    async fn hgetall(&self, key: String) -> StoreResult<HashMap<String, String>> {
        self.retry("HGETALL", || {
            let mut conn = self.conn.clone();
            let key = key.clone();
            async move { redis::cmd("HGETALL").arg(key).query_async(&mut conn).await }
        })
        .await
    }

    /// Reads many hashes in one pipeline.
    async fn hgetall_many(&self, keys: &[String]) -> StoreResult<Vec<HashMap<String, String>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.retry("HGETALL", || {
            let mut conn = self.conn.clone();
            let mut pipe = redis::pipe();
            for k in keys {
                pipe.cmd("HGETALL").arg(k);
            }
            async move { pipe.query_async(&mut conn).await }
        })
        .await
    }

    async fn job_record(&self, id: JobId) -> StoreResult<JobRecord> {
        let h = self.hgetall(self.key(&["job", &id.to_string()])).await?;
        if h.is_empty() {
            return Err(StoreError::JobNotFound(id));
        }
        parse_job(&h)
    }

    async fn task_ids(&self, id: JobId) -> StoreResult<Vec<String>> {
        let key = self.key(&["job", &id.to_string(), "tasks"]);
        self.retry("LRANGE", || {
            let mut conn = self.conn.clone();
            let key = key.clone();
            async move {
                redis::cmd("LRANGE")
                    .arg(key)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut conn)
                    .await
            }
        })
        .await
    }

    async fn smembers(&self, key: String) -> StoreResult<Vec<String>> {
        self.retry("SMEMBERS", || {
            let mut conn = self.conn.clone();
            let key = key.clone();
            async move { redis::cmd("SMEMBERS").arg(key).query_async(&mut conn).await }
        })
        .await
    }

    async fn finished(&self, job: &str, state: &str) -> StoreResult<Option<JobRecord>> {
        if state.is_empty() {
            return Ok(None);
        }
        let id = job
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("job id {job:?}")))?;
        self.job_record(id).await.map(Some)
    }

    /// Waits until `rx` changes or `limit` passes, whichever is first.
    async fn wake_or_timeout(rx: &mut watch::Receiver<u64>, limit: Duration) {
        let _ = tokio::time::timeout(limit, rx.changed()).await;
    }
}

/// Retries `call` on transient errors with backoff, for at most
/// [`RETRY_BUDGET`], counting every attempt in `round_trips`.
async fn retry<T, F, Fut>(round_trips: &AtomicU64, what: &str, mut call: F) -> StoreResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, RedisError>>,
{
    let start = Instant::now();
    let mut pause = Duration::from_millis(50);
    loop {
        round_trips.fetch_add(1, Ordering::Relaxed);
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if transient(&e) && start.elapsed() < RETRY_BUDGET => {
                tracing::warn!(what, error = %e, "Redis call failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            Err(e) if transient(&e) => {
                return Err(StoreError::Unavailable(format!("{what}: {e}")));
            }
            Err(e) => return Err(StoreError::Backend(format!("{what}: {e}"))),
        }
    }
}

/// The error a call of `dispatch.lua` raised (its reply `{'error', message}`).
fn script_error(reply: &[Value]) -> StoreError {
    StoreError::Backend(format!(
        "dispatch.lua: {}",
        reply.get(1).map(text).unwrap_or_default()
    ))
}

/// The arguments of a completion in `dispatch.lua` (`COMPLETE_ARGS`).
fn completion_args(
    worker: &WorkerId,
    owner: Option<&str>,
    task: TaskId,
    epoch: Epoch,
    result: TaskResult,
) -> StoreResult<Vec<Vec<u8>>> {
    let json = serde_json::to_string(&StoredResult {
        object: result.object,
        sha256: result.sha256,
        size: result.size,
        model_hash: result.model_hash,
        render_ms: result.render_ms,
        encode_ms: result.encode_ms,
        class: result.class,
    })
    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let args = vec![
        worker.as_str().into(),
        task.to_string().into_bytes(),
        epoch.0.to_string().into_bytes(),
        json.into_bytes(),
        owner.unwrap_or_default().into(),
    ];
    debug_assert_eq!(args.len(), COMPLETE_ARGS);
    Ok(args)
}

/// The arguments of a claim in `dispatch.lua` (`CLAIM_ARGS`), as a first
/// try: `Store::claim` marks its retries as waking (the last one).
fn claim_args(
    worker: &WorkerId,
    owner: Option<&str>,
    max: usize,
    ttl: Duration,
    resident: &[String],
    ready: &[ReadyLoraSet],
    caps: &RunningCaps,
) -> StoreResult<Vec<Vec<u8>>> {
    let corrupt = |e: serde_json::Error| StoreError::Corrupt(e.to_string());
    let resident = serde_json::to_string(resident).map_err(corrupt)?;
    // claim.lua reads the ready sets by model: {model: [set, ...]}.
    let mut by_model: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for r in ready {
        by_model.entry(&r.model).or_default().push(&r.set);
    }
    let ready = serde_json::to_string(&by_model).map_err(corrupt)?;
    let caps = serde_json::to_string(caps).map_err(corrupt)?;
    let args = vec![
        worker.as_str().into(),
        max.to_string().into_bytes(),
        ttl.as_millis().to_string().into_bytes(),
        resident.into_bytes(),
        owner.unwrap_or_default().into(),
        caps.into_bytes(),
        ready.into_bytes(),
        // Waking: "1" for a waiting claim's retries (`Store::claim`).
        b"0".to_vec(),
    ];
    debug_assert_eq!(args.len(), CLAIM_ARGS);
    Ok(args)
}

/// One script argument.
enum Arg<'a> {
    Str(&'a str),
    Bytes(&'a [u8]),
    Int(i64),
}

#[async_trait]
impl Store for RedisStore {
    async fn create_job(&self, job: NewJob) -> StoreResult<(JobRecord, bool)> {
        let id = job.id.to_string();
        let total = job.tasks.len().to_string();
        let idem = job.idempotency_key.clone().unwrap_or_default();
        let priority = i64::from(job.priority);
        let class = job.class.clone().unwrap_or_default();
        let verify_of = job.verify_of.map(|j| j.to_string()).unwrap_or_default();
        let traceparent = job.traceparent.clone().unwrap_or_default();
        let mut owned: Vec<String> = Vec::with_capacity(job.tasks.len() * TASK_ARGS);
        for t in &job.tasks {
            let corrupt = |e: serde_json::Error| StoreError::Corrupt(format!("task: {e}"));
            owned.push(t.id.to_string());
            owned.push(t.index.to_string());
            owned.push(t.recipe.model.clone());
            owned.push(t.recipe.model_hash.clone());
            owned.push(serde_json::to_string(&t.recipe).map_err(corrupt)?);
            owned.push(t.file_name.clone());
            owned.push(t.recipe.steps.to_string());
            owned.push(
                t.series
                    .as_ref()
                    .map(|s| s.name.clone())
                    .unwrap_or_default(),
            );
            owned.push(t.series.as_ref().map_or(0, |s| s.shot).to_string());
            owned.push(
                t.series
                    .as_ref()
                    .and_then(|s| s.depends_on)
                    .map_or(-1, i64::from)
                    .to_string(),
            );
            let avoid: Vec<&str> = t.avoid.iter().map(WorkerId::as_str).collect();
            owned.push(serde_json::to_string(&avoid).map_err(corrupt)?);
            let waits = t.series.as_ref().is_some_and(|s| s.depends_on.is_some());
            owned.push(task_batch_key(&t.recipe, waits));
            owned.push(serde_json::to_string(&task_needs(&t.recipe)).map_err(corrupt)?);
            // The dedupe key: the recipe's hash without its init image, then
            // the init image, so a shot's key is completed in Lua when its
            // anchor's image arrives (`release_dependents`). Equal keys still
            // mean equal recipes, and a recipe without one keeps its plain hash.
            let mut base = t.recipe.clone();
            owned.push(match base.init_image.take() {
                Some(sha) => format!("{}:{sha}", base.hash()),
                None => base.hash(),
            });
            owned.push(task_lora_set(&t.recipe));
        }
        // enqueue.lua reads TASK_ARGS values per task.
        debug_assert_eq!(owned.len(), job.tasks.len() * TASK_ARGS);
        let mut args = vec![
            Arg::Str(&id),
            Arg::Str(&job.project),
            Arg::Str(&idem),
            Arg::Str(&job.name),
            Arg::Int(priority),
            Arg::Int(i64::from(job.pin_class)),
            Arg::Str(&class),
            Arg::Int(i64::from(job.dedupe)),
            Arg::Str(&verify_of),
            Arg::Str(&traceparent),
            Arg::Str(&total),
        ];
        args.extend(owned.iter().map(|s| Arg::Str(s)));
        args.push(Arg::Int(job.blobs.len() as i64));
        for (sha, data) in &job.blobs {
            args.push(Arg::Str(sha));
            args.push(Arg::Bytes(data));
        }
        let notify = serde_json::to_string(&job.notify)
            .map_err(|e| StoreError::Corrupt(format!("webhook targets: {e}")))?;
        args.push(Arg::Str(&notify));
        let by = job.submitted_by.clone().unwrap_or_default();
        args.push(Arg::Str(&by));
        let reply = items(self.invoke(&self.scripts.enqueue, &args).await?)?;
        let created = reply.first().map(text).as_deref() == Some("1");
        let existing: JobId = parse_id(&reply.get(1).map(text).unwrap_or_default(), "job id")?;
        Ok((self.job_record(existing).await?, created))
    }

    async fn job(&self, id: JobId) -> StoreResult<JobRecord> {
        self.job_record(id).await
    }

    async fn jobs(&self, limit: usize) -> StoreResult<Vec<JobRecord>> {
        self.read_jobs(limit).await
    }

    async fn tasks(&self, id: JobId) -> StoreResult<Vec<TaskRecord>> {
        self.read_tasks(id).await
    }

    async fn task(&self, id: TaskId) -> StoreResult<TaskRecord> {
        let h = self.hgetall(self.key(&["task", &id.to_string()])).await?;
        if h.is_empty() {
            return Err(StoreError::TaskNotFound(id));
        }
        parse_task(&h)
    }

    async fn task_at(&self, job: JobId, index: u32) -> StoreResult<TaskRecord> {
        let key = self.key(&["job", &job.to_string(), "tasks"]);
        let id: Option<String> = self
            .retry("LINDEX", || {
                let mut conn = self.conn.clone();
                let key = key.clone();
                async move {
                    redis::cmd("LINDEX")
                        .arg(key)
                        .arg(index)
                        .query_async(&mut conn)
                        .await
                }
            })
            .await?;
        let Some(id) = id else {
            // Tell a missing job from an index past its end.
            self.job_record(job).await?;
            return Err(StoreError::NoTaskAt { job, index });
        };
        let h = self.hgetall(self.key(&["task", &id])).await?;
        if h.is_empty() {
            return Err(StoreError::NoTaskAt { job, index });
        }
        parse_task(&h)
    }

    async fn blobs(&self, id: JobId, sha256s: &[String]) -> StoreResult<Vec<(String, Bytes)>> {
        let key = self.key(&["job", &id.to_string(), "blobs"]);
        let values: Vec<Option<Vec<u8>>> = self
            .retry("HMGET", || {
                let mut conn = self.conn.clone();
                let key = key.clone();
                async move {
                    redis::cmd("HMGET")
                        .arg(key)
                        .arg(sha256s)
                        .query_async(&mut conn)
                        .await
                }
            })
            .await?;
        Ok(sha256s
            .iter()
            .zip(values)
            .filter_map(|(s, v)| v.map(|v| (s.clone(), Bytes::from(v))))
            .collect())
    }

    async fn running(&self, id: JobId) -> StoreResult<Vec<RunningTask>> {
        self.read_running(id).await
    }

    async fn cancel_job(&self, id: JobId) -> StoreResult<JobRecord> {
        let job = id.to_string();
        let reply = items(self.invoke(&self.scripts.cancel, &[Arg::Str(&job)]).await?)?;
        if reply.first().map(text).as_deref() == Some("missing") {
            return Err(StoreError::JobNotFound(id));
        }
        self.job_record(id).await
    }

    async fn pause_job(&self, id: JobId, paused: bool) -> StoreResult<JobRecord> {
        let job = id.to_string();
        let args = [Arg::Str(&job), Arg::Int(i64::from(paused))];
        let reply = items(self.invoke(&self.scripts.pause, &args).await?)?;
        if reply.first().map(text).as_deref() == Some("missing") {
            return Err(StoreError::JobNotFound(id));
        }
        self.job_record(id).await
    }

    async fn set_priority(&self, id: JobId, priority: i32) -> StoreResult<JobRecord> {
        let job = id.to_string();
        let args = [Arg::Str(&job), Arg::Int(i64::from(priority))];
        let reply = items(self.invoke(&self.scripts.priority, &args).await?)?;
        if reply.first().map(text).as_deref() == Some("missing") {
            return Err(StoreError::JobNotFound(id));
        }
        self.job_record(id).await
    }

    async fn retry_job(&self, id: JobId) -> StoreResult<(JobRecord, u32)> {
        let job = id.to_string();
        let reply = items(self.invoke(&self.scripts.retry, &[Arg::Str(&job)]).await?)?;
        if reply.first().map(text).as_deref() == Some("missing") {
            return Err(StoreError::JobNotFound(id));
        }
        let requeued: u32 = parse_id(&reply.get(1).map(text).unwrap_or_default(), "retry count")?;
        Ok((self.job_record(id).await?, requeued))
    }

    async fn usage(&self, since_day: i64) -> StoreResult<Vec<UsageRow>> {
        self.read_usage(since_day).await
    }

    async fn register_worker(
        &self,
        reg: WorkerRegistration,
        owner: Option<&str>,
    ) -> StoreResult<Vec<Reaped>> {
        let id = reg.id.to_string();
        let models: BTreeMap<&str, &str> = reg
            .models
            .iter()
            .map(|m| (m.name.as_str(), m.hash.as_str()))
            .collect();
        let stored = StoredRegistration {
            labels: reg.labels.clone(),
            gpu_memory_bytes: reg.gpu_memory_bytes,
            slots: reg.slots,
            models: reg
                .models
                .iter()
                .map(|m| (m.name.clone(), m.hash.clone()))
                .collect(),
            determinism_class: reg.determinism_class.clone(),
            version: reg.version.clone(),
            assets: reg.assets.clone(),
        };
        let reg_json =
            serde_json::to_string(&stored).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let models_json =
            serde_json::to_string(&models).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        // claim.lua looks a task's needs up in this set (policy::held_keys).
        let held: BTreeMap<String, bool> = super::policy::held_keys(&reg.assets)
            .into_iter()
            .map(|k| (k, true))
            .collect();
        let assets_json =
            serde_json::to_string(&held).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let reply = items(
            self.invoke(
                &self.scripts.register,
                &[
                    Arg::Str(&id),
                    Arg::Str(&reg_json),
                    Arg::Str(&models_json),
                    Arg::Str(&reg.determinism_class),
                    Arg::Str(owner.unwrap_or_default()),
                    Arg::Str(&assets_json),
                ],
            )
            .await?,
        )?;
        if is_bound(&reply) {
            return Err(StoreError::WorkerBound(reg.id));
        }
        let mut out = Vec::new();
        for r in reply.chunks(RELEASED_FIELDS) {
            let [task, job, epoch, finished] = r else {
                continue;
            };
            let job_s = text(job);
            out.push(Reaped {
                task: parse_id(&text(task), "task id")?,
                job: parse_id(&job_s, "job id")?,
                worker: reg.id.clone(),
                epoch: Epoch(parse_id(&text(epoch), "epoch")?),
                requeued: true,
                job_finished: self.finished(&job_s, &text(finished)).await?,
            });
        }
        Ok(out)
    }

    async fn workers(&self) -> StoreResult<Vec<WorkerRecord>> {
        self.read_workers().await
    }

    async fn drain_worker(&self, id: &WorkerId) -> StoreResult<WorkerRecord> {
        let reply = self
            .invoke(&self.scripts.drain, &[Arg::Str(id.as_str())])
            .await?;
        if text(&reply) != "1" {
            return Err(StoreError::UnknownWorker(id.clone()));
        }
        self.workers()
            .await?
            .into_iter()
            .find(|w| &w.registration.id == id)
            .ok_or_else(|| StoreError::UnknownWorker(id.clone()))
    }

    async fn live_workers(&self) -> StoreResult<Vec<LiveWorker>> {
        self.read_live_workers().await
    }

    async fn pinned_tasks(&self) -> StoreResult<Vec<PinnedTasks>> {
        self.read_pinned_tasks().await
    }

    async fn fail_unheld(&self, model: &str, hash: &str, message: &str) -> StoreResult<Unheld> {
        let reply = items(
            self.invoke(
                &self.scripts.fail_unheld,
                &[Arg::Str(model), Arg::Str(hash), Arg::Str(message)],
            )
            .await?,
        )?;
        let mut out = Unheld::default();
        if reply.first().map(text).as_deref() != Some("ok") {
            return Ok(out);
        }
        out.failed = parse_id(&reply.get(1).map(text).unwrap_or_default(), "count")?;
        for job in reply.iter().skip(2) {
            out.finished
                .push(self.job_record(parse_id(&text(job), "job id")?).await?);
        }
        Ok(out)
    }

    async fn claim(
        &self,
        worker: &WorkerId,
        owner: Option<&str>,
        max: usize,
        ttl: Duration,
        wait: Duration,
        resident: &[String],
        ready: &[ReadyLoraSet],
        caps: &RunningCaps,
    ) -> StoreResult<Claim> {
        let deadline = Instant::now() + wait;
        let mut args = claim_args(worker, owner, max, ttl, resident, ready, caps)?;
        let mut rx = self.work.clone();
        loop {
            rx.borrow_and_update();
            let reply = self.batcher.call(OP_CLAIM, args.clone()).await?;
            // The retries after the first try are a waiting claim's, no sign of life.
            if let Some(waking) = args.last_mut() {
                *waking = b"1".to_vec();
            }
            let claim = self.claim_of(worker, reply, ttl).await?;
            let now = Instant::now();
            if claim.drain
                || !claim.leases.is_empty()
                || !claim.deduped.is_empty()
                || max == 0
                || now >= deadline
            {
                return Ok(claim);
            }
            Self::wake_or_timeout(&mut rx, (deadline - now).min(FALLBACK_POLL)).await;
        }
    }

    async fn heartbeat(
        &self,
        worker: &WorkerId,
        owner: Option<&str>,
        progress: &[ProgressReport],
        ttl: Duration,
    ) -> StoreResult<HeartbeatOutcome> {
        let owned: Vec<String> = progress.iter().map(|p| p.task.to_string()).collect();
        let mut args = Vec::with_capacity(3 + progress.len() * PROGRESS_FIELDS);
        args.push(Arg::Str(worker.as_str()));
        args.push(Arg::Int(ttl.as_millis() as i64));
        args.push(Arg::Str(owner.unwrap_or_default()));
        for (p, id) in progress.iter().zip(&owned) {
            args.push(Arg::Str(id));
            args.push(Arg::Int(p.epoch.0 as i64));
            args.push(Arg::Int(i64::from(p.step)));
        }
        let reply = items(self.invoke(&self.scripts.heartbeat, &args).await?)?;
        if reply.first().map(text).as_deref() == Some("unknown") {
            return Err(StoreError::UnknownWorker(worker.clone()));
        }
        if is_bound(&reply) {
            return Err(StoreError::WorkerBound(worker.clone()));
        }
        let mut out = HeartbeatOutcome {
            drain: reply.first().map(text).as_deref() == Some("1"),
            ..Default::default()
        };
        for (p, verdict) in progress.iter().zip(reply.iter().skip(1)) {
            let verdict = text(verdict);
            if verdict == "ext" {
                out.extended.push(p.task);
            } else {
                let reason = AbandonReason::parse(&verdict)
                    .ok_or_else(|| StoreError::Corrupt(format!("heartbeat verdict {verdict:?}")))?;
                out.abandon.push((p.task, p.epoch, reason));
            }
        }
        Ok(out)
    }

    async fn put_preview(
        &self,
        worker: &WorkerId,
        task: TaskId,
        epoch: Epoch,
        preview: &Preview,
        ttl: Duration,
    ) -> StoreResult<bool> {
        let tid = task.to_string();
        let args = [
            Arg::Str(worker.as_str()),
            Arg::Str(&tid),
            Arg::Int(epoch.0 as i64),
            Arg::Int(i64::from(preview.step)),
            Arg::Bytes(&preview.png),
            Arg::Int(ttl.as_millis().max(1) as i64),
        ];
        let reply = self.invoke(&self.scripts.preview, &args).await?;
        Ok(matches!(reply, Value::Int(1)))
    }

    async fn preview(&self, task: TaskId) -> StoreResult<Option<Preview>> {
        let key = self.key(&["preview", &task.to_string()]);
        let (step, png): (Option<u32>, Option<Vec<u8>>) = self
            .retry("HMGET", || {
                let mut conn = self.conn.clone();
                let key = key.clone();
                async move {
                    redis::cmd("HMGET")
                        .arg(key)
                        .arg("step")
                        .arg("png")
                        .query_async(&mut conn)
                        .await
                }
            })
            .await?;
        Ok(match (step, png) {
            (Some(step), Some(png)) => Some(Preview { step, png }),
            _ => None,
        })
    }

    async fn complete(
        &self,
        worker: &WorkerId,
        owner: Option<&str>,
        task: TaskId,
        epoch: Epoch,
        result: TaskResult,
    ) -> StoreResult<CompleteOutcome> {
        let args = completion_args(worker, owner, task, epoch, result)?;
        let reply = self.batcher.call(OP_COMPLETE, args).await?;
        self.completion_of(worker, task, reply).await
    }

    async fn complete_and_claim(
        &self,
        worker: &WorkerId,
        owner: Option<&str>,
        task: TaskId,
        epoch: Epoch,
        result: TaskResult,
        next: NextClaim<'_>,
    ) -> StoreResult<(CompleteOutcome, Option<StoreResult<Claim>>)> {
        let mut args = completion_args(worker, owner, task, epoch, result)?;
        args.extend(claim_args(
            worker,
            owner,
            next.max,
            next.ttl,
            next.resident,
            next.ready,
            next.caps,
        )?);
        let reply = items(self.batcher.call(OP_COMPLETE_CLAIM, args).await?)?;
        let mut parts = reply.into_iter();
        let (Some(done), Some(claimed)) = (parts.next(), parts.next()) else {
            return Err(StoreError::Corrupt(
                "short reply of a completion with its next claim".into(),
            ));
        };
        // A call that raised an error answers {'error', message} alone.
        if text(&done) == "error" {
            return Err(script_error(&[done, claimed]));
        }
        let outcome = self.completion_of(worker, task, done).await?;
        let claim = match outcome {
            CompleteOutcome::Accepted { .. } => {
                Some(self.claim_of(worker, claimed, next.ttl).await)
            }
            CompleteOutcome::Stale { .. } => None,
        };
        Ok((outcome, claim))
    }

    async fn fail(
        &self,
        worker: &WorkerId,
        owner: Option<&str>,
        task: TaskId,
        epoch: Epoch,
        fault: Fault,
        message: &str,
        max_attempts: u32,
    ) -> StoreResult<FailOutcome> {
        let tid = task.to_string();
        let reply = items(
            self.invoke(
                &self.scripts.fail,
                &[
                    Arg::Str(worker.as_str()),
                    Arg::Str(&tid),
                    Arg::Int(epoch.0 as i64),
                    Arg::Str(fault.name()),
                    Arg::Str(message),
                    Arg::Int(i64::from(max_attempts)),
                    Arg::Str(owner.unwrap_or_default()),
                ],
            )
            .await?,
        )?;
        match reply.first().map(text).as_deref() {
            Some("bound") => Err(StoreError::WorkerBound(worker.clone())),
            Some("ok") => {
                let finished = reply.get(2).map(text).unwrap_or_default();
                let job_finished = if finished.is_empty() {
                    None
                } else {
                    Some(self.job_record(self.task(task).await?.job).await?)
                };
                Ok(FailOutcome::Recorded {
                    will_retry: reply.get(1).map(text).as_deref() == Some("1"),
                    job_finished,
                })
            }
            Some("stale") => Ok(FailOutcome::Stale {
                reason: reply.get(1).map(text).unwrap_or_default(),
            }),
            _ => Err(StoreError::TaskNotFound(task)),
        }
    }

    async fn reap(&self, max_attempts: u32) -> StoreResult<Vec<Reaped>> {
        let reply = items(
            self.invoke(
                &self.scripts.reap,
                &[
                    Arg::Int(i64::from(max_attempts)),
                    Arg::Int(REAP_BATCH as i64),
                ],
            )
            .await?,
        )?;
        let mut out = Vec::new();
        for r in reply.chunks(REAPED_FIELDS) {
            let [task, job, worker, epoch, requeued, finished] = r else {
                continue;
            };
            let job_s = text(job);
            out.push(Reaped {
                task: parse_id(&text(task), "task id")?,
                job: parse_id(&job_s, "job id")?,
                worker: WorkerId(text(worker)),
                epoch: Epoch(parse_id(&text(epoch), "epoch")?),
                requeued: text(requeued) == "1",
                job_finished: self.finished(&job_s, &text(finished)).await?,
            });
        }
        Ok(out)
    }

    async fn events(&self, id: JobId, after: u64, limit: usize) -> StoreResult<Vec<Event>> {
        self.read_events(id, after, limit).await
    }

    async fn wait_events(&self, id: JobId, after: u64, timeout: Duration) -> StoreResult<()> {
        self.read_wait_events(id, after, timeout).await
    }

    async fn farm_counts(&self) -> StoreResult<FarmCounts> {
        self.read_farm_counts().await
    }

    async fn ping(&self) -> StoreResult<()> {
        self.read_ping().await
    }

    async fn claim_deliveries(&self, max: usize, lease: Duration) -> StoreResult<Vec<Delivery>> {
        let reply = items(
            self.invoke(
                &self.scripts.deliveries,
                &[Arg::Int(max as i64), Arg::Int(lease.as_millis() as i64)],
            )
            .await?,
        )?;
        let mut out = Vec::new();
        for d in reply.chunks(DELIVERY_FIELDS) {
            let [job, attempt, pending, age] = d else {
                continue;
            };
            out.push(Delivery {
                job: parse_id(&text(job), "job id")?,
                attempt: parse_id(&text(attempt), "delivery attempt")?,
                pending: serde_json::from_str(&text(pending))
                    .map_err(|e| StoreError::Corrupt(format!("webhook targets: {e}")))?,
                age: Duration::from_millis(parse_id(&text(age), "delivery age")?),
            });
        }
        Ok(out)
    }

    async fn settle_delivery(
        &self,
        job: JobId,
        attempt: u32,
        done: &[String],
        retry_in: Option<Duration>,
    ) -> StoreResult<()> {
        let job = job.to_string();
        let done = serde_json::to_string(done)
            .map_err(|e| StoreError::Corrupt(format!("webhook targets: {e}")))?;
        self.invoke(
            &self.scripts.settle,
            &[
                Arg::Str(&job),
                Arg::Int(i64::from(attempt)),
                Arg::Str(&done),
                Arg::Int(i64::from(retry_in.is_some())),
                Arg::Int(retry_in.map_or(0, |d| d.as_millis() as i64)),
            ],
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kiln_proto::ids::{JobId, TaskId, WorkerId};
    use kiln_proto::recipe::{Recipe, Scheduler};

    use super::*;

    #[test]
    fn redacted_urls_keep_no_credentials() {
        assert_eq!(
            redacted("redis://:s3cret@10.0.0.5:6379/0"),
            "redis://***@10.0.0.5:6379/0"
        );
        assert_eq!(
            redacted("rediss://kiln:s3cret@redis.example:6380/1"),
            "rediss://***@redis.example:6380/1"
        );
        assert_eq!(
            redacted("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
    }

    fn one_task_job() -> NewJob {
        NewJob {
            id: JobId::new(),
            name: "retention".into(),
            project: "default".into(),
            priority: 0,
            idempotency_key: Some("k".into()),
            tasks: vec![NewTask {
                id: TaskId::new(),
                index: 0,
                recipe: Recipe {
                    model: "tiny".into(),
                    model_hash: String::new(),
                    prompt: "x".into(),
                    negative_prompt: String::new(),
                    seed: 1,
                    steps: 1,
                    guidance: 1.0,
                    width: 64,
                    height: 64,
                    scheduler: Scheduler::Ddim,
                    karras: false,
                    eta: 0.0,
                    strength: 1.0,
                    init_image: None,
                    mask: None,
                    noise_seed: None,
                    extras: Default::default(),
                },
                file_name: "00000-x.png".into(),
                series: None,
                avoid: Vec::new(),
            }],
            blobs: Vec::new(),
            pin_class: false,
            class: None,
            dedupe: true,
            verify_of: None,
            traceparent: None,
            notify: Vec::new(),
            submitted_by: None,
        }
    }

    #[tokio::test]
    async fn finished_jobs_are_listed_until_their_retention_ends() {
        let server = kiln_tests::redis::RedisServer::start().expect("redis-server");
        let store = RedisStore::connect(&RedisConfig {
            url: server.url(),
            name: "retention".into(),
            retention: Duration::from_millis(600),
        })
        .await
        .expect("connect");
        let w = WorkerId("w1".into());
        store
            .register_worker(
                WorkerRegistration {
                    id: w.clone(),
                    labels: Default::default(),
                    gpu_memory_bytes: 0,
                    slots: 1,
                    models: vec![ModelInfo {
                        name: "tiny".into(),
                        hash: "h".into(),
                    }],
                    determinism_class: "c".into(),
                    version: "t".into(),
                    assets: Default::default(),
                },
                None,
            )
            .await
            .unwrap();
        let (job, _) = store.create_job(one_task_job()).await.unwrap();
        let mut running = one_task_job();
        running.idempotency_key = None;
        store.create_job(running).await.unwrap();
        let lease = store
            .claim(
                &w,
                None,
                1,
                Duration::from_secs(30),
                Duration::ZERO,
                &[],
                &[],
                &RunningCaps::new(),
            )
            .await
            .unwrap()
            .leases
            .remove(0);
        assert_eq!(lease.job, job.id);
        let done = TaskResult {
            object: "x".into(),
            sha256: "00".repeat(32),
            size: 1,
            model_hash: "h".into(),
            render_ms: 1,
            encode_ms: 1,
            class: String::new(),
        };
        store
            .complete(&w, None, lease.task, lease.epoch, done)
            .await
            .unwrap();
        assert!(
            store.jobs(10).await.unwrap().iter().any(|j| j.id == job.id),
            "listed within retention"
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(matches!(
            store.job(job.id).await,
            Err(StoreError::JobNotFound(_))
        ));
        let listed = store.jobs(10).await.unwrap();
        assert!(
            !listed.iter().any(|j| j.id == job.id),
            "gone after retention"
        );
        assert_eq!(listed.len(), 1, "the running job stays");
    }

    #[tokio::test]
    async fn a_retried_job_is_kept_again_past_its_retention() {
        let server = kiln_tests::redis::RedisServer::start().expect("redis-server");
        let store = RedisStore::connect(&RedisConfig {
            url: server.url(),
            name: "retry".into(),
            retention: Duration::from_secs(600),
        })
        .await
        .expect("connect");
        let w = WorkerId("w1".into());
        let registration = WorkerRegistration {
            id: w.clone(),
            labels: Default::default(),
            gpu_memory_bytes: 0,
            slots: 1,
            models: vec![ModelInfo {
                name: "tiny".into(),
                hash: "h".into(),
            }],
            determinism_class: "c".into(),
            version: "t".into(),
            assets: Default::default(),
        };
        store.register_worker(registration, None).await.unwrap();
        let (job, _) = store.create_job(one_task_job()).await.unwrap();
        let lease = store
            .claim(
                &w,
                None,
                1,
                Duration::from_secs(30),
                Duration::ZERO,
                &[],
                &[],
                &RunningCaps::new(),
            )
            .await
            .unwrap()
            .leases
            .remove(0);
        store
            .fail(&w, None, lease.task, lease.epoch, Fault::BadInput, "no", 3)
            .await
            .unwrap();
        let id = job.id.to_string();
        let task = lease.task.to_string();
        let keys = [
            store.key(&["job", &id]),
            store.key(&["job", &id, "events"]),
            store.key(&["job", &id, "tasks"]),
            store.key(&["task", &task]),
        ];
        let pttl = |key: String| {
            let mut conn = store.conn.clone();
            async move {
                redis::cmd("PTTL")
                    .arg(key)
                    .query_async::<i64>(&mut conn)
                    .await
                    .unwrap()
            }
        };
        for k in &keys {
            assert!(pttl(k.clone()).await > 0, "{k} expires once the job failed");
        }
        let (record, requeued) = store.retry_job(job.id).await.unwrap();
        assert_eq!(
            (record.state, requeued),
            (crate::store::JobState::Running, 1)
        );
        for k in &keys {
            assert_eq!(
                pttl(k.clone()).await,
                -1,
                "{k} is kept while the job runs again"
            );
        }
    }
}
