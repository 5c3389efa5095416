//! Group commit of completions and claims: while one run of `dispatch.lua`
//! is in flight, the calls that arrive wait, and the next run carries all of
//! them (up to [`MAX_CALLS`]). One call alone goes out at once, so a quiet
//! farm waits for nothing; a busy one pays Redis's per-script costs (the
//! round trip, the script lookup, the prelude, the clock, the wake-ups) once
//! per run instead of once per call. Each call stays atomic (Redis runs the
//! whole run alone) and gets its own reply.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use redis::aio::ConnectionManager;
use redis::{Script, Value};
use tokio::sync::{mpsc, oneshot};

use super::retry;
use crate::store::{StoreError, StoreResult};

/// Most calls in one run: bounds how long one run holds Redis (a claim and a
/// completion are some 60 commands).
pub(super) const MAX_CALLS: usize = 64;

/// One call of `dispatch.lua`: its op and its arguments.
struct Call {
    op: &'static str,
    args: Vec<Vec<u8>>,
    reply: oneshot::Sender<StoreResult<Value>>,
}

/// The handle the store's methods send calls through.
pub(super) struct Batcher {
    calls: mpsc::UnboundedSender<Call>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a run needs of the store: its connection, the script and the
/// common arguments.
pub(super) struct Link {
    pub(super) conn: ConnectionManager,
    pub(super) script: Script,
    /// The key every script names (the farm's hash tag decides the slot).
    pub(super) slot_key: String,
    pub(super) prefix: String,
    pub(super) retention_ms: u64,
    pub(super) round_trips: Arc<AtomicU64>,
}

impl Batcher {
    /// Starts the task that sends the runs.
    pub(super) fn start(link: Link) -> Self {
        let (calls, rx) = mpsc::unbounded_channel();
        Self {
            calls,
            task: tokio::spawn(run(link, rx)),
        }
    }

    /// Makes one call and returns its reply.
    ///
    /// # Cancel safety
    /// A call dropped before its run is sent is left out of it; one dropped
    /// later has its effect all the same, as a dropped script call would.
    pub(super) async fn call(&self, op: &'static str, args: Vec<Vec<u8>>) -> StoreResult<Value> {
        let (reply, answer) = oneshot::channel();
        self.calls
            .send(Call { op, args, reply })
            .map_err(|_| StoreError::Unavailable("the Redis store is shutting down".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the Redis store is shutting down".into()))?
    }
}

/// Sends runs until the store is dropped: the first waiting call and every
/// call that waits behind it, up to [`MAX_CALLS`].
async fn run(link: Link, mut rx: mpsc::UnboundedReceiver<Call>) {
    let mut calls: Vec<Call> = Vec::with_capacity(MAX_CALLS);
    while let Some(first) = rx.recv().await {
        calls.push(first);
        while calls.len() < MAX_CALLS {
            match rx.try_recv() {
                Ok(c) => calls.push(c),
                Err(_) => break,
            }
        }
        calls.retain(|c| !c.reply.is_closed());
        if calls.is_empty() {
            continue;
        }
        let reply = send(&link, &calls).await;
        match reply {
            Ok(Value::Array(replies)) if replies.len() == calls.len() => {
                for (c, r) in calls.drain(..).zip(replies) {
                    let _ = c.reply.send(Ok(r));
                }
            }
            Ok(other) => {
                for c in calls.drain(..) {
                    let _ = c.reply.send(Err(StoreError::Corrupt(format!(
                        "dispatch.lua answered {other:?}"
                    ))));
                }
            }
            Err(e) => {
                for c in calls.drain(..) {
                    let _ = c.reply.send(Err(same_error(&e)));
                }
            }
        }
    }
}

/// Runs `dispatch.lua` once over `calls`, retrying transient failures as
/// every script call does.
async fn send(link: &Link, calls: &[Call]) -> StoreResult<Value> {
    retry(&link.round_trips, "dispatch", || {
        let mut inv = link.script.prepare_invoke();
        inv.key(&link.slot_key)
            .arg(&link.prefix)
            .arg(link.retention_ms)
            .arg(calls.len());
        for c in calls {
            inv.arg(c.op);
            for a in &c.args {
                inv.arg(a.as_slice());
            }
        }
        let mut conn = link.conn.clone();
        async move { inv.invoke_async::<Value>(&mut conn).await }
    })
    .await
}

/// The error of a run, for each of its calls.
fn same_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
        StoreError::Corrupt(m) => StoreError::Corrupt(m.clone()),
        StoreError::Backend(m) => StoreError::Backend(m.clone()),
        other => StoreError::Backend(other.to_string()),
    }
}
